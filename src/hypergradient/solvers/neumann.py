"""The truncated Neumann series, and the power iteration that picks its step."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from .. import _tree, _vocab
from .._norms import in_rows, row_norms
from .._vocab import Status
from ..operators import DampedOperator, LinearOperator
from . import spectrum
from .base import (
    RandomizedSolver,
    Solution,
    non_default,
    require_finite_product,
    require_finite_solution,
    safe_norm,
)
from .extremes import max_abs, nonzero

__all__ = ["Neumann"]


class Neumann(RandomizedSolver):
    """Truncated Neumann series ``x = alpha * sum_{j=0}^{k} (I - alpha A)^j b``.

    This is the inverse-Hessian approximation of Lorraine et al. (2020), "Optimizing
    Millions of Hyperparameters by Implicit Differentiation", AISTATS. With ``k = maxiter``
    products it sums ``k + 1`` terms; the error contracts like ``|1 - alpha lambda|^(k+1)``
    per eigen-direction, so it converges iff ``0 < alpha < 2 / lambda_max`` and ``A`` is
    positive definite.

    Args:
        maxiter: number of products ``k`` (the series has ``k + 1`` terms; None: 20;
            ``iters=`` is the deprecated name).
        alpha: step size (default 1.0), or ``"auto"``: ``1 / (s lambda_est)``. For a
            symmetric operator ``lambda_est`` is the top Ritz value of ``power_iters``
            products (one power step, then Lanczos), a lower bound of ``lambda_max``, and
            ``s`` a safety factor from the Kuczynski-Wozniakowski bound (:func:`lanczos_safety`)
            that makes ``alpha < 2 / lambda_max`` with probability >= 0.999 for a PSD operator
            (``s = 1`` for ``power_iters >= 20`` whatever the size; exact if Lanczos finds an
            invariant subspace). A non-symmetric operator uses power iterations and ``s = 1``.
            Products are counted in ``num_hvps`` and ``stats["power_hvps"]``; the estimate,
            ``s`` and the step are in ``stats["lambda_max"]``, ``["safety"]``, ``["alpha"]``.
        tol: optional early stop once the partial sum's residual ``||(I - alpha A)^j b||``
            (known for free) drops below ``tol * ||b||``.
        power_iters: products of the ``lambda_max`` estimate for ``alpha="auto"``.
        seed / generator: randomness of the power iteration's start vector (see
            :class:`~hypergradient.solvers.base.RandomizedSolver`); only ``alpha="auto"``
            draws.
        divergence_factor: for a non-symmetric operator, the solve is reported
            ``"diverged"`` (and ``hg.implicit`` raises) once a term's norm exceeds this
            multiple of ``||b||``. For a symmetric one any growth of the residual proves
            divergence: the solve stops there and returns the partial sum with the smallest
            residual (``x = 0`` if the first term grows).
        alpha_max: with ``alpha="auto"``, an upper bound of the step (e.g. the inner
            learning rate, Lorraine et al.'s choice): ``alpha = min(alpha_max, 1 / (s
            lambda_est))``, the paper's step whenever it is provably safe.
        refresh_every: with ``alpha="auto"``, solves between two estimates of
            ``lambda_max`` (the Hessian changes slowly along an outer loop, so 10 costs
            ``power_iters / 10`` products per solve). A solve that diverges with a cached
            estimate re-estimates at once and solves again (``stats["refreshed"]``). An
            operator of another size or damping (a ``DampedOperator``: ``damping="auto"``
            raising its shift) has another spectrum: it is estimated at once.

    Cost: ``maxiter`` products (+ ``power_iters`` per estimate), O(n) memory. State (in
    :meth:`state_dict`): the generator, the cached estimate and the solve counter.
    """

    def __init__(
        self,
        maxiter: int | None = None,
        alpha: float | str = 1.0,
        tol: float | None = None,
        power_iters: int = 20,
        seed: int | None = None,
        divergence_factor: float = 1e3,
        *,
        generator: torch.Generator | None = None,
        iters: int | None = None,
        alpha_max: float | None = None,
        refresh_every: int = 1,
    ):
        if iters is not None:
            if maxiter is not None:
                raise ValueError("Pass `maxiter` only (`iters` is its deprecated name).")
            warnings.warn(
                "Neumann(iters=...) is deprecated; use Neumann(maxiter=...).",
                DeprecationWarning,
                stacklevel=2,
            )
            self.maxiter = _vocab.as_int(iters, "iters", min=1)
        else:
            self.maxiter = _vocab.as_int(20 if maxiter is None else maxiter, "maxiter", min=1)
        if isinstance(alpha, str):
            alpha = _vocab.as_choice(alpha, "alpha", ("auto",))
        else:
            alpha = _vocab.as_float(
                alpha, "alpha", min=0.0, open_min=True, hint=" Or pass alpha='auto'."
            )
        self.alpha: float | str = alpha
        self.tol = None if tol is None else _vocab.as_float(tol, "tol", min=0.0, open_min=True)
        self.power_iters = _vocab.as_int(power_iters, "power_iters", min=1)
        self.divergence_factor = _vocab.as_float(
            divergence_factor, "divergence_factor", min=0.0, open_min=True
        )
        self.alpha_max = (
            None
            if alpha_max is None
            else _vocab.as_float(alpha_max, "alpha_max", min=0.0, open_min=True)
        )
        self.refresh_every = _vocab.as_int(refresh_every, "refresh_every", min=1)
        self.init_generator(seed, generator, needed=alpha == "auto")
        _fixed_step_settings(alpha, alpha_max, power_iters, seed, generator, refresh_every)
        self._cached: tuple[float, float] | None = None  # (lambda_est, safety)
        self._calls = 0
        self._indefinite = False  # the last estimate's Ritz value was negative
        self._system: tuple[int, float] | None = None  # the estimate's (size, damping)

    @property
    def iters(self) -> int:
        """Deprecated name of :attr:`maxiter`."""
        warnings.warn(
            "Neumann.iters is deprecated; use Neumann.maxiter.", DeprecationWarning, stacklevel=2
        )
        return self.maxiter

    def config(self) -> dict[str, Any]:
        return {
            "maxiter": self.maxiter,
            "alpha": self.alpha,
            "tol": self.tol,
            "power_iters": self.power_iters,
            "seed": self.seed,
            "divergence_factor": self.divergence_factor,
            "alpha_max": self.alpha_max,
            "refresh_every": self.refresh_every,
        }

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.alpha == "auto":
            lam, safety = self._cached if self._cached is not None else (0.0, 1.0)  # 0: none
            state.update(calls=self._calls, lambda_est=lam, safety=safety)
            state["indefinite"] = self._indefinite
            state["system"] = None if self._system is None else list(self._system)
        return state

    def load_state_dict(self, state: Any) -> None:
        if self.alpha != "auto":
            super().load_state_dict(state)
            return
        indefinite = _vocab.as_bool(state.get("indefinite", False), "state['indefinite']")
        system = _system(state.get("system"))  # (older: absent, unknown)
        state = {k: v for k, v in state.items() if k not in ("indefinite", "system")}
        extra = {k: state[k] for k in ("calls", "lambda_est", "safety") if k in state}
        if len(extra) != 3:
            raise ValueError(
                f"{type(self).__name__}(alpha='auto') state needs 'calls', 'lambda_est' and "
                f"'safety'; got {sorted(state)}."
            )
        calls = _vocab.as_int(extra["calls"], "state['calls']", min=0)
        lam = _vocab.as_float(extra["lambda_est"], "state['lambda_est']", min=0.0)
        safety = _vocab.as_float(extra["safety"], "state['safety']", min=1.0)
        super().load_state_dict({k: v for k, v in state.items() if k not in extra})
        self._calls, self._indefinite, self._system = calls, indefinite, system
        self._cached = None if lam == 0.0 else (lam, safety)

    def _step(self, op: LinearOperator, stats: dict[str, Any], fresh: bool = False) -> float:
        if self.alpha != "auto":
            return float(self.alpha)
        stale = fresh or self._cached is None or self._calls % self.refresh_every == 0
        system = (op.size, float(op.damping) if isinstance(op, DampedOperator) else 0.0)
        stale = stale or self._system not in (None, system)  # another spectrum
        if stale or self._cached is None:
            self._cached, self._system = self._estimate(op, stats), system
        lam, safety = self._cached
        stats.update(lambda_max=lam, safety=safety, estimated=stale)
        step = 1.0 / (safety * lam)
        return step if self.alpha_max is None else min(step, self.alpha_max)

    def _estimate(self, op: LinearOperator, stats: dict[str, Any]) -> tuple[float, float]:
        """``(lambda_est, safety)`` from ``power_iters`` products (see ``alpha``)."""
        start = op.num_matvecs
        if op.symmetric:
            ritz = spectrum.lanczos_extremes(op, self.power_iters, self._rng, power_start=True)
            lam, exact = ritz.lambda_max, ritz.num_hvps < self.power_iters
            stats["lambda_min"] = ritz.lambda_min
            # a negative Ritz value: the series cannot approximate H^-1 along it, however short
            self._indefinite = spectrum.negative_beyond_rounding(op, ritz)
            safety = 1.0 if exact else spectrum.lanczos_safety(op.size, self.power_iters - 1)
        else:
            lam, safety = spectrum.estimate_lambda_max(op, self.power_iters, self._rng), 1.0
        stats["power_hvps"] = stats.get("power_hvps", 0) + op.num_matvecs - start
        if not lam > 0:
            raise ValueError(
                f"Neumann(alpha='auto') estimated lambda_max = {lam:.3g} <= 0: the operator "
                "is not positive definite here. Add damping or pass alpha explicitly."
            )
        return lam, safety

    def solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> Solution:
        self.validate(op, b, x0)
        start = op.num_matvecs
        stats: dict[str, Any] = {}
        cached = self.alpha == "auto" and self._cached is not None
        solution = self._solve(op, b, x0, stats, start, fresh=False)
        if solution.status == Status.DIVERGED and cached and not stats.get("estimated"):
            # The cached estimate is stale (the Hessian's top grew): estimate and solve again.
            stats["refreshed"] = True
            solution = self._solve(op, b, x0, stats, start, fresh=True)
        self._calls += 1
        return solution

    def _correction(
        self, op: LinearOperator, b: Tensor, x0: Tensor | None, stats: dict[str, Any]
    ) -> tuple[Tensor | None, Tensor, float, float | None]:
        """``(x0, b - A x0, its norm, tol)`` for a warm start (else ``(None, b, ||b||,
        tol)``); the series on the correction meets ``tol ||b||`` at ``tol ||b|| / ||b - A
        x0||`` of its own right-hand side. A start worse than ``x = 0`` (``||b - A x0|| >
        ||b||``) is dropped, as CG drops it (``stats["warm_start_dropped"]``)."""
        if x0 is None or not nonzero(x0):
            return None, b, safe_norm(b), self.tol
        base, full = x0.to(b.dtype), safe_norm(b)
        Ax = op.matvec(base)
        require_finite_product(Ax)
        r = b - Ax
        bnorm = safe_norm(r)
        if bnorm > full:  # (its product is counted)
            stats["warm_start_dropped"] = True
            return None, b, full, self.tol
        b = r
        tol = self.tol if self.tol is None or bnorm == 0.0 else self.tol * full / bnorm
        return base, b, bnorm, tol

    def _solve(
        self,
        op: LinearOperator,
        b: Tensor,
        x0: Tensor | None,
        stats: dict[str, Any],
        start: int,
        fresh: bool,
    ) -> Solution:
        alpha = self._step(op, stats, fresh)
        stats["alpha"] = alpha
        base, b, bnorm, tol = self._correction(op, b, x0, stats)
        if bnorm == 0.0 or (tol is not None and tol >= 1.0):  # (the start meets tol)
            x = torch.zeros_like(b) if base is None else base.clone()
            done = Status.FIXED_BUDGET if tol is None else Status.CONVERGED
            ok = None if tol is None else True
            return Solution(x, op.num_matvecs - start, bnorm, ok, done, 0, stats)
        run = _Series(op, _unit(b, bnorm), alpha, self, dict(stats), tol)
        run.run()
        stats.update(run.stats)
        if run.status in (Status.FIXED_BUDGET, Status.MAX_ITERATIONS) and self._indefinite:
            # the estimate's negative Ritz value (this call's, or one of the last
            # refresh_every calls': re-estimating each call would double IFT's cost)
            run.status = Status.NEGATIVE_CURVATURE
            stats["indefinite_estimate"] = "this call" if stats.get("estimated") else "cached"
        x = (alpha * bnorm) * run.total
        x = x if base is None else base + x
        require_finite_solution(x)
        residual = None if run.residual is None else run.residual * bnorm
        converged = None if run.status == Status.FIXED_BUDGET else run.status == Status.CONVERGED
        return Solution(
            x, op.num_matvecs - start, residual, converged, run.status, run.iterations, stats
        )


def _system(value: Any) -> tuple[int, float] | None:
    """A checkpoint's ``system``: None or ``[size, damping]`` of the estimated operator."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"Neumann state['system'] must be None or [size, damping], got {value!r}.")
    size = _vocab.as_int(value[0], "state['system'][0]", min=0)
    return size, _vocab.as_float(value[1], "state['system'][1]", min=0.0)


def _unit(b: Tensor, bnorm: float) -> Tensor:
    """``b / ||b||`` in two steps, so that neither factor overflows."""
    top = max_abs(b)
    return (b / top) / (bnorm / top)


class _Series:
    """The partial sums ``S_k = sum_{j<=k} v_j``, ``v_j = (I - alpha A)^j b`` (``||b|| = 1``).

    ``v_j`` is the residual of ``alpha S_{j-1}``, known for free. For a symmetric operator
    the ratios ``||v_{j+1}|| / ||v_j||`` never decrease (``||M^j b||^2`` is log-convex in
    ``j``), so one ratio above 1 proves that the series diverges: the run stops there (up
    to a rounding allowance ``sqrt(eps)``; not tested once ``||v_j||`` is near the subnormal
    range, where rounding is no longer relative) and keeps the partial sum with the smallest
    residual (``x = 0`` if the first term already grows). A non-symmetric operator can
    grow transiently; it is declared divergent past ``divergence_factor``. On the CPU the
    norms of large float32 terms are read by float32 rows (:mod:`.norms`, ~1e-7 relative).
    """

    def __init__(
        self,
        op: LinearOperator,
        b: Tensor,
        alpha: float,
        solver: Neumann,
        stats_in: dict[str, Any] | None = None,
        tol: float | None = None,
    ):
        self.op, self.alpha, self.solver = op, alpha, solver
        self.stats_in = {} if stats_in is None else stats_in  # the step's estimate
        self.tol = tol  # relative to ||b|| = 1
        self.v, self.total = b, b.clone()
        self.best, self.best_norm = torch.zeros_like(b), 1.0
        self.residual: float | None = None
        self.status, self.iterations = Status.FIXED_BUDGET, 0
        self.stats: dict[str, Any] = {}
        info = torch.finfo(b.dtype)
        self.growth_tol = math.sqrt(info.eps)
        # below this norm the terms' entries are near or below the subnormal range of their
        # dtype, too imprecise for the growth test (false "diverged" after 1855 float32 steps)
        self.floor = math.sqrt(b.numel()) * info.tiny / self.growth_tol
        self.wide = _tree.wide_dtype(b.device)  # safe_norm's accumulator, chosen once
        self.by_rows = b.device.type == "cpu" and in_rows(b, self.wide)  # see norms.py

    def _diverged(self, vnorm: float, previous: float) -> bool:
        if self.op.symmetric:
            return vnorm > (1.0 + self.growth_tol) * previous
        return not vnorm <= self.solver.divergence_factor

    def _why(self, w: Tensor, vnorm: float) -> Status:
        """Why the residual grew: ``negative_curvature`` (no step cures it: not at a minimum;
        the best partial sum is kept) when the Rayleigh quotient ``q = v^T A v / ||v||^2``
        along the growing residual is negative or, with a fixed ``alpha``, when
        :func:`.growth_is_curvature` says so; else ``alpha`` is too large (``diverged``)."""
        if not self.op.symmetric:
            return Status.DIVERGED
        q = float(torch.dot(self.v, w)) / max(vnorm * vnorm, 1e-300)
        self.stats["rayleigh_quotient"] = q
        # With a step from this call's own lambda_max estimate (safe: alpha < 2 /
        # lambda_max), a PSD operator cannot grow the residual, so growth proves negative
        # curvature; so does a negative Lanczos lambda_min or Rayleigh quotient. A cached
        # estimate proves nothing: the operator's top may have grown since (diverged, and
        # the solver estimates again); nor does one of too few steps for the bound (s = 5).
        bounded = self.stats_in.get("safety", 1.0) < spectrum.lanczos_safety(1, 0)
        estimated = bool(self.stats_in.get("estimated")) and bounded
        indefinite = q < 0 or self.stats_in.get("lambda_min", 0.0) < 0 or estimated
        if not indefinite and self.solver.alpha != "auto":  # a fixed step: find out
            steps = self.solver.power_iters
            indefinite = spectrum.growth_is_curvature(self.op, self.alpha, steps, self.stats)
        return Status.NEGATIVE_CURVATURE if indefinite else Status.DIVERGED

    def run(self) -> None:
        tol, previous = self.tol, 1.0
        for it in range(1, self.solver.maxiter + 1):
            w = self.op.matvec(self.v)
            v = torch.add(self.v, w, alpha=-self.alpha)  # the residual of alpha * total
            read = row_norms((v,), self.wide) if self.by_rows else None
            vnorm = read[0] if read is not None else safe_norm(v, self.wide)
            if not math.isfinite(vnorm):  # a NaN or Inf in w makes ||v|| non-finite
                require_finite_product(w)
            self.iterations = it
            if tol is not None and vnorm <= tol:
                self.residual, self.status = vnorm, Status.CONVERGED
                return
            if vnorm > self.floor and self._diverged(vnorm, previous):
                self.status, self.total = self._why(w, previous), self.best
                self.residual = self.best_norm
                self.stats["residual_growth"] = vnorm / previous
                return
            if vnorm < self.best_norm:
                self.best_norm = vnorm
                self.best = self.total  # never modified in place: replaced below
            self.total = self.total + v
            self.v, previous = v, vnorm
        if tol is not None:
            self.status = Status.MAX_ITERATIONS
        self.stats["residual_growth"] = previous


def _fixed_step_settings(alpha: Any, *given: Any) -> None:
    """Refuse the settings of the estimated step with a fixed ``alpha`` (never dropped):
    ``given`` is ``alpha_max, power_iters, seed, generator, refresh_every``."""
    names = ("alpha_max", "power_iters", "seed", "generator", "refresh_every")
    defaults = (None, 20, None, None, 1)
    named = [] if alpha == "auto" else non_default(**dict(zip(names, zip(given, defaults))))
    if named:
        raise ValueError(
            f"Neumann(alpha={alpha:g}) does not use {', '.join(named)}: they configure "
            "alpha='auto' (the step estimated from lambda_max). Pass alpha='auto', or drop them."
        )
