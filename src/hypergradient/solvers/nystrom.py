"""Solvers built on a randomized Nystrom sketch: the direct solve and the preconditioned CG."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .. import _vocab
from .._vocab import HypergradientWarning, Status
from ..operators import DampedOperator, LinearOperator
from .base import (
    RandomizedSolver,
    Solution,
    check_generator_state,
    check_keys,
    check_tensor,
    convergence_rate,
    generator_state,
    require_finite_product,
    require_finite_solution,
)
from .cg import conjugate_gradient
from .cg_status import relative_tol
from .extremes import nonzero
from .sketch import SKETCHES, NystromApproximation, nystrom_sketch

__all__ = ["STALE_GROWTH", "Nystrom", "NystromPCG"]

#: ``NystromPCG(refresh_every="auto")`` sketches again once a solve converges this many
#: times slower (in ``-log(residual)`` per iteration) than the first solve with the sketch.
STALE_GROWTH = 1.5


class Nystrom(RandomizedSolver):
    """Nystrom approximation ``x = (A_nys + rho I)^{-1} b`` from ``rank`` products.

    Hataya & Yamada (2023), "Nystrom Method for Accurate and Scalable Implicit
    Differentiation", AISTATS. The sketch is either ``rank`` sampled Hessian columns (the
    paper's and the seed library's method) or a Gaussian sketch, which is usually more
    accurate at the same rank. The products are batched (one vmapped backward per
    ``chunk_size`` columns). The solve uses the stable eigen form (see
    :class:`NystromApproximation`), so small ``rho`` is safe in float32. With
    ``rank >= n`` and tiny ``rho`` it returns ``A^{-1} b``.

    On an indefinite operator (a saddle point) the sketch keeps its positive part ``A_+``
    and the solve is ``(A_+ + rho I)^{-1} b``; with no positive direction at all it is
    ``b / rho``. Both warn with a ``HypergradientWarning`` and set
    ``stats["indefinite"]``.

    Args:
        rank: sketch size r (products).
        rho: damping of the approximation, > 0.
        sketch: ``"column"`` or ``"gaussian"``.
        seed / generator: randomness of the sketch (see
            :class:`~hypergradient.solvers.base.RandomizedSolver`): each solve draws a new
            sketch from the solver's generator.
        chunk_size: products evaluated together (bounds memory: r x n for the sketch).

    Cost: r products (one more from a non-zero warm start ``x0``: the solve is then
    ``x0 + (A_nys + rho I)^{-1} (b - A x0)``), O(r n) memory, O(r^2 n) flops.
    """

    requires_symmetric = True

    def __init__(
        self,
        rank: int = 5,
        rho: float = 0.1,
        sketch: str = "column",
        seed: int | None = None,
        generator: torch.Generator | None = None,
        chunk_size: int | None = None,
    ):
        self.rank = _vocab.as_int(rank, "rank", min=1)
        self.rho = _vocab.as_float(rho, "rho", min=0.0, open_min=True)
        self.sketch = _vocab.as_choice(sketch, "sketch", SKETCHES)
        self.chunk_size = _vocab.as_optional_int(chunk_size, "chunk_size", min=1)
        self.init_generator(seed, generator)

    def config(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "rho": self.rho,
            "sketch": self.sketch,
            "seed": self.seed,
            "chunk_size": self.chunk_size,
        }

    def solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> Solution:
        self.validate(op, b, x0)
        start = op.num_matvecs
        approx = nystrom_sketch(op, self.rank, self.sketch, self._rng, self.chunk_size)
        if x0 is not None and nonzero(x0):  # warm start: approximate the correction
            Ax = op.matvec(x0.to(b.dtype))
            require_finite_product(Ax)
            x = x0.to(b.dtype) + approx.solve(b - Ax, self.rho)
        else:
            x = approx.solve(b, self.rho)
        require_finite_solution(x)
        stats = {"eigenvalues": approx.eigenvalues.detach().cpu(), "rank": approx.U.shape[1]}
        message = ""
        if approx.indefinite:
            stats["indefinite"] = True
            message = _warn_indefinite(approx, f"the solve is (A_+ + {self.rho:g} I)^-1 b")
        return Solution(
            x, op.num_matvecs - start, None, None, Status.FIXED_BUDGET, 1, stats, message
        )


def _warn_indefinite(approx: NystromApproximation, fallback: str) -> str:
    """Warn that the sketch met non-positive curvature; the message says what was done."""
    if approx.U.shape[1] == 0:
        what = (
            "the sketch found no positive curvature (the Hessian is negative or indefinite "
            "along every sampled direction), so the approximation is 0 and "
            + fallback.replace("A_+", "0")
        )
    else:
        what = (
            "the sketch found non-positive curvature (the Hessian is indefinite: not a "
            f"minimum); the approximation keeps its positive part (A_+), and {fallback}"
        )
    message = f"{what}. Add damping (hg.implicit(..., damping=...)) or use hg.CG()."
    warnings.warn(f"Nystrom: {message}", HypergradientWarning, stacklevel=3)
    return message


class NystromPCG(RandomizedSolver):
    """Conjugate gradient preconditioned by a randomized Nystrom sketch.

    Frangella, Tropp & Udell (2023), "Randomized Nystrom Preconditioning", SIAM J. Matrix
    Anal. Appl. With ``A_nys = U diag(lam) U^T`` the preconditioner is
    ``P^{-1} = (lam_r + mu) U (diag(lam) + mu I)^{-1} U^T + (I - U U^T)``, which maps the top
    r eigenvalues of ``A`` close to ``lam_r`` and leaves the rest as they are. On an
    indefinite operator the sketch keeps its positive part (see :func:`nystrom_sketch`);
    with no positive direction the preconditioner is the identity (a
    ``HypergradientWarning`` says so) and CG reports the negative curvature it meets. On a
    singular operator whose ``b`` leaves its range the answer is least squares, as
    :class:`~hypergradient.solvers.CG`'s.

    The sketch costs ``rank`` products and is kept across calls: it is rebuilt every
    ``refresh_every`` calls (1: every call), which pays off while the Hessian changes
    slowly, as in an outer optimization loop. With ``refresh_every="auto"`` it is rebuilt
    only when it stops helping: when a solve's convergence rate (``-log(final / start)`` of
    the relative residual per CG iteration, ``convergence_rate``: a warm start's head start
    is not counted) falls below ``1 / STALE_GROWTH`` (1/1.5) of the rate of the first solve
    with the current sketch (``stats["sketch_stale"]``; the next call sketches again). This
    works with a tolerance and with a fixed budget alike. ``reset()`` forces a rebuild. The
    stored sketch, the call counter, the reference rate and the generator are in
    :meth:`state_dict`.

    Args:
        rank, maxiter, tol, atol: sketch size and CG settings.
        mu: preconditioner regularization (default 0: the sketch's own eigenvalues).
        sketch, seed, generator, chunk_size: as in :class:`Nystrom` (default Gaussian).
        refresh_every: calls between sketches, or ``"auto"`` (rebuilt when it stops helping).

    Cost: ``rank`` products per sketch plus one per CG iteration; O(r n) memory.
    """

    requires_symmetric = True

    def __init__(
        self,
        rank: int = 10,
        maxiter: int = 100,
        tol: float = 1e-6,
        atol: float = 0.0,
        mu: float = 0.0,
        sketch: str = "gaussian",
        seed: int | None = None,
        generator: torch.Generator | None = None,
        chunk_size: int | None = None,
        refresh_every: int | str = 1,
    ):
        self.rank = _vocab.as_int(rank, "rank", min=1)
        self.maxiter = _vocab.as_int(maxiter, "maxiter", min=1)
        self.tol = relative_tol(tol)
        self.atol = _vocab.as_float(atol, "atol", min=0.0)
        self.mu = _vocab.as_float(mu, "mu", min=0.0)
        self.sketch = _vocab.as_choice(sketch, "sketch", SKETCHES)
        self.chunk_size = _vocab.as_optional_int(chunk_size, "chunk_size", min=1)
        if isinstance(refresh_every, str) and refresh_every != "auto":
            raise _vocab.ArgumentTypeError(
                f'`refresh_every` must be an integer >= 1 or "auto", got {refresh_every!r}.'
            )
        self.refresh_every: int | str = (
            "auto"
            if refresh_every == "auto"
            else _vocab.as_int(refresh_every, "refresh_every", min=1)
        )
        self.init_generator(seed, generator)
        self.reset()

    def config(self) -> dict[str, Any]:
        keys = ("rank", "maxiter", "tol", "atol", "mu", "sketch", "seed", "chunk_size")
        return {k: getattr(self, k) for k in (*keys, "refresh_every")}

    def reset(self) -> None:
        """Forget the stored sketch; the next call builds a new one."""
        self._approx: NystromApproximation | None = None
        self._calls = 0
        self._base: float | None = None  # convergence rate of the first solve with the sketch
        self._damping: float | None = None  # of the sketched operator (None: unknown)

    # -- checkpoints ------------------------------------------------------------------
    _KEYS: tuple[str, ...] = ("generator", "calls", "U", "eigenvalues", "full_rank")
    _KEYS += ("indefinite", "base_rate", "damping")

    def state_dict(self) -> dict[str, Any]:
        a = self._approx
        return {
            "generator": generator_state(self._rng),
            "calls": self._calls,
            "base_rate": self._base,
            "U": None if a is None else a.U.detach().clone(),
            "eigenvalues": None if a is None else a.eigenvalues.detach().clone(),
            "full_rank": None if a is None else bool(a.full_rank),
            "indefinite": None if a is None else bool(a.indefinite),
            "damping": self._damping,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if isinstance(state, Mapping):  # checkpoints from before "auto", damping, indefinite
            old: dict[str, Any] = {"base_rate": None, "damping": None}
            if "indefinite" not in state:
                old["indefinite"] = None if state.get("full_rank") is None else False
            state = {**old, **state}
        check_keys(state, self._KEYS, self)
        check_generator_state(state["generator"], self._rng, "generator", self)
        calls = _vocab.as_int(state["calls"], "calls", min=0)
        base = state["base_rate"]
        if base is not None:
            base = _vocab.as_float(base, "base_rate", min=0.0)
        damping = state["damping"]
        if damping is not None:
            damping = _vocab.as_float(damping, "damping", min=0.0)
        approx = self._check_sketch(state)
        self.set_generator_state(state["generator"])
        self._calls, self._base, self._damping = calls, base, damping
        self._approx = approx

    def _check_sketch(self, state: Mapping[str, Any]) -> NystromApproximation | None:
        U, lam, full = state["U"], state["eigenvalues"], state["full_rank"]
        if U is None and lam is None and full is None:
            return None
        U = check_tensor(U, "U", self, shape=(None, None), floating=True)
        if U.shape[1] > min(self.rank, U.shape[0]):
            raise ValueError(
                f"NystromPCG.load_state_dict: `U` has {U.shape[1]} columns, more than "
                f"rank={self.rank}; the checkpoint is from another solver."
            )
        lam = check_tensor(lam, "eigenvalues", self, dtype=U.dtype, shape=(U.shape[1],))
        if not isinstance(full, bool):
            raise ValueError(
                f"NystromPCG.load_state_dict: `full_rank` must be a bool, got {full!r}."
            )
        indefinite = state["indefinite"]
        if not isinstance(indefinite, bool):
            raise ValueError(
                f"NystromPCG.load_state_dict: `indefinite` must be a bool, got {indefinite!r}."
            )
        return NystromApproximation(U.clone(), lam.clone(), full, indefinite)

    # -- solve ------------------------------------------------------------------------
    def _preconditioner(self, approx: NystromApproximation) -> Callable[[Tensor], Tensor]:
        lam = approx.eigenvalues
        keep = lam > 1e-10 * lam.max().clamp(min=0.0) if lam.numel() else lam.bool()
        U, lam = approx.U[:, keep], lam[keep]
        if lam.numel() == 0:
            return lambda r: r
        scale = (lam.min() + self.mu) / (lam + self.mu)

        def apply(r: Tensor) -> Tensor:
            c = U.T @ r
            return r + U @ ((scale - 1.0) * c)

        return apply

    def _sketch(self, op: LinearOperator) -> NystromApproximation:
        stale = self._approx is None or self._approx.U.shape[0] != op.size
        every = self.refresh_every
        damping = float(op.damping) if isinstance(op, DampedOperator) else 0.0
        # a kept sketch of A + d0 I serves A + d I, d > d0, shifted by d - d0 (measured: fewer
        # iterations than a fresh sketch); for d < d0 the shifted one is worse than stale
        # (4x the iterations of a fresh sketch), so a lower damping sketches again
        stale = stale or (self._damping is not None and damping < self._damping)
        if stale or (isinstance(every, int) and self._calls % every == 0):
            self._approx = nystrom_sketch(op, self.rank, self.sketch, self._rng, self.chunk_size)
            self._calls, self._base, self._damping = 0, None, damping
        self._calls += 1
        approx = self._approx
        assert approx is not None
        shift = 0.0 if self._damping is None else damping - self._damping
        if shift or approx.U.dtype != op.dtype or approx.U.device != op.device:
            approx = NystromApproximation(
                approx.U.to(op.device, op.dtype),
                approx.eigenvalues.to(op.device, op.dtype) + shift,
                approx.full_rank,
                approx.indefinite,
            )
        return approx

    def _judge(self, sol: Solution) -> None:
        """``refresh_every="auto"``: drop the sketch once it stops helping."""
        rate = convergence_rate(sol)
        if rate is None:
            return
        if self._base is None:
            self._base = rate
        elif rate * STALE_GROWTH < self._base:
            self._approx = None  # the next call sketches again
            sol.stats["sketch_stale"] = True

    def solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> Solution:
        self.validate(op, b, x0)
        if not nonzero(b) and (x0 is None or not nonzero(x0)):
            return Solution(
                torch.zeros_like(b), 0, 0.0, True, Status.CONVERGED, 0, {"sketch_hvps": 0}
            )
        start = op.num_matvecs
        approx = self._sketch(op)
        sketch_hvps = op.num_matvecs - start
        if approx.indefinite and approx.U.shape[1] == 0 and sketch_hvps:
            _warn_indefinite(approx, "the preconditioner is the identity (plain CG)")
        lam = approx.eigenvalues  # (the largest, a lower bound of ||A||: cg_singular's scale)
        top = max(float(lam.max()), 0.0) if lam.numel() else 0.0
        pre = self._preconditioner(approx)
        sol = conjugate_gradient(op, b, x0, self.maxiter, self.tol, self.atol, pre, None, top)
        sol.num_hvps += sketch_hvps
        sol.stats["sketch_hvps"] = sketch_hvps
        if self.refresh_every == "auto" and not sol.stats.get("null_space"):
            self._judge(sol)  # (a least-squares solve's rate is not the sketch's)
        if approx.indefinite:
            sol.stats["indefinite"] = True
        return sol
