"""A damping chosen from a curvature estimate: ``damping="auto"``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import _vocab
from .._vocab import Status
from ..operators import DampedOperator, LinearOperator
from .base import Solution, Solver, check_generator_state, check_keys, generator_state
from .spectrum import lanczos_extremes

__all__ = ["AutoDamping", "DampingEstimate", "auto_damping", "damped_solve"]

_DAMPING_HINT = " Pass a number >= 0 or an AutoDamping (damping='auto')."

#: Solves repeated with a larger damping after negative curvature (:func:`damped_solve`).
RETRIES = 3


class DampingEstimate(NamedTuple):
    """The damping :func:`auto_damping` picked, what it cost and what it saw.

    Attributes:
        damping: the shift ``lambda >= 0`` to solve ``(H + lambda I) x = b`` with.
        num_hvps: products spent on the estimate.
        lambda_max, lambda_min: the extreme Ritz values of ``H`` (inner bounds of its
            spectrum: ``lambda_min`` over-estimates the smallest eigenvalue).
    """

    damping: float
    num_hvps: int
    lambda_max: float
    lambda_min: float


def auto_damping(
    op: LinearOperator,
    maxiter: int = 20,
    rel: float = 1e-3,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> DampingEstimate:
    """Pick a damping that makes ``H + lambda I`` positive definite and well conditioned.

    ``maxiter`` Lanczos steps (:func:`~hypergradient.solvers.spectrum.lanczos_extremes`)
    estimate the extreme eigenvalues of the symmetric ``H``; the damping is

        ``lambda = max(0, -lambda_min) + rel * max(lambda_max, |lambda_min|)``

    so that ``H + lambda I`` has its smallest eigenvalue near ``rel`` times the spectral
    radius (a condition number of about ``1 / rel``) on the directions the estimate saw.

    Bias: the hypergradient is then that of the damped system ``(H + lambda I) x = b``,
    not ``H x = b``: along an eigenvector of ``H`` with eigenvalue ``mu > 0`` the solution
    shrinks by ``mu / (mu + lambda)`` (a relative bias of ``lambda / (mu + lambda)``), and
    directions of negative curvature are counted with the positive eigenvalue
    ``mu + lambda``, as a trust region or Levenberg-Marquardt step would. The Ritz value
    ``lambda_min`` over-estimates the smallest eigenvalue (the estimate sees the extremes
    from inside), so a little negative curvature may remain when Lanczos has not converged;
    the ``rel`` margin usually covers it, and CG's curvature check remains the safeguard.

    Args:
        op: the symmetric operator (``HessianOperator``, ``MatrixOperator``, ...).
        maxiter: Lanczos steps (products), >= 1.
        rel: the margin, as a fraction of the spectral radius, in ``[0, 1]``.
        seed / generator: the start vector's randomness (as for the randomized solvers;
            neither: a generator seeded from torch's global one).

    Returns:
        :class:`DampingEstimate` ``(damping, num_hvps, lambda_max, lambda_min)``.

    Cost: ``maxiter`` products (fewer if the spectrum has fewer distinct eigenvalues),
    three vectors of memory.

    Raises:
        ValueError: a non-symmetric operator.
        NonFiniteHypergradientError: a product holds NaN or Inf.
    """
    if not isinstance(op, LinearOperator):
        raise _vocab.ArgumentTypeError(f"`op` must be a LinearOperator, got {type(op).__name__}.")
    if not op.symmetric:
        raise ValueError(
            "auto_damping needs a symmetric operator (a Hessian); a fixed-point operator "
            "I - J^T is not one."
        )
    maxiter = _vocab.as_int(maxiter, "maxiter", min=1)
    rel = _vocab.as_float(rel, "rel", min=0.0, max=1.0)
    rng = _vocab.as_generator(seed, generator)
    est = lanczos_extremes(op, maxiter, rng)
    radius = max(est.lambda_max, abs(est.lambda_min), 0.0)
    damping = max(0.0, -est.lambda_min) + rel * radius
    return DampingEstimate(float(damping), est.num_hvps, est.lambda_max, est.lambda_min)


class AutoDamping:
    """``damping="auto"``: :func:`auto_damping`, cached across the calls of a method.

    The Hessian changes slowly along an outer loop, so the estimate (``maxiter`` Lanczos
    products) is renewed every ``refresh_every`` calls, at once for an operator of another
    size (another model), and at once when a solve with the cached damping meets negative
    curvature (the Hessian's smallest eigenvalue moved below ``-damping``). A solve that
    meets negative curvature with a fresh estimate (the Ritz value ``lambda_min``
    over-estimates the smallest eigenvalue) is re-estimated with ``max(4 maxiter, 20)``
    Lanczos steps, and any new damping exceeds the curvature the solver saw,
    ``lambda >= -q + rel * radius`` with ``q`` the Rayleigh quotient of ``H`` along the
    offending direction; then it solves again (at most three more solves:
    :func:`damped_solve`).

    Bias: as :func:`auto_damping` (the solution of the damped system; relative bias
    ``lambda / (mu + lambda)`` along an eigen-direction of eigenvalue ``mu``).

    Args:
        maxiter, rel: as :func:`auto_damping`.
        refresh_every: calls between two estimates (1: every call).
        seed / generator: the Lanczos start vectors (as the randomized solvers; neither: a
            generator seeded from torch's global one at construction).

    Cost: ``maxiter`` products every ``refresh_every`` calls, plus an estimate and a second
    solve when a cached damping meets negative curvature. State (:meth:`state_dict`): the
    cached estimate, the size of the operator it is of, the call counter and the generator.
    """

    def __init__(
        self,
        maxiter: int = 20,
        rel: float = 1e-3,
        refresh_every: int = 10,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ):
        self.maxiter = _vocab.as_int(maxiter, "maxiter", min=1)
        self.rel = _vocab.as_float(rel, "rel", min=0.0, max=1.0)
        self.refresh_every = _vocab.as_int(refresh_every, "refresh_every", min=1)
        self.seed = None if seed is None else _vocab.as_int(seed, "seed", min=0)
        self._rng = _vocab.as_generator(self.seed, generator)
        self._cached: DampingEstimate | None = None
        self._calls = 0
        self._size: int | None = None  # of the estimated operator (None: unknown)

    @property
    def estimate(self) -> DampingEstimate | None:
        """The cached estimate (None before the first call)."""
        return self._cached

    def config(self) -> dict[str, Any]:
        """The settings as plain data (``AutoDamping(**config)`` rebuilds it)."""
        return {
            "maxiter": self.maxiter,
            "rel": self.rel,
            "refresh_every": self.refresh_every,
            "seed": self.seed,
        }

    def __repr__(self) -> str:
        return "AutoDamping(" + ", ".join(f"{k}={v!r}" for k, v in self.config().items()) + ")"

    def damping(self, op: LinearOperator, stats: dict[str, Any]) -> float:
        """The damping of this call (estimating if the cache is stale); fills ``stats``."""
        stale = self._cached is None or self._calls % self.refresh_every == 0
        stale = stale or self._size not in (None, op.size)  # another model: its own spectrum
        self._calls += 1
        if stale:
            self._estimate(op, stats)
        assert self._cached is not None
        stats["damping_estimated"] = stats.get("damping_estimated", False) or stale
        stats.update(damping=self._cached.damping)
        return self._cached.damping

    def _estimate(self, op: LinearOperator, stats: dict[str, Any], steps: int = 0) -> None:
        est = auto_damping(op, steps or self.maxiter, self.rel, generator=self._rng)
        self._cached, self._size = est, op.size
        stats["damping_hvps"] = stats.get("damping_hvps", 0) + est.num_hvps
        stats.update(lambda_max=est.lambda_max, lambda_min=est.lambda_min)

    def retry(self, op: LinearOperator, used: float, curvature: float | None, stats: dict) -> float:
        """The damping of another solve after ``used`` met negative curvature.

        ``curvature``: the Rayleigh quotient ``q = p^T (H + used I) p / ||p||^2 <= 0`` along
        the direction the solver met (None if unknown). A cached damping is re-estimated
        (``maxiter`` products); a fresh one that missed is re-estimated with
        ``max(4 maxiter, 20)`` Lanczos steps; later retries double the shift. Each new
        damping is at least ``used - q + rel * radius``, past the curvature met.
        """
        if not stats.get("damping_estimated"):
            self._estimate(op, stats)
            stats["damping_estimated"] = True
        elif not stats.get("damping_thorough"):
            self._estimate(op, stats, steps=max(4 * self.maxiter, 20))
            stats["damping_thorough"] = True
        assert self._cached is not None
        est = self._cached
        radius = max(est.lambda_max, abs(est.lambda_min), 0.0)
        margin = max(self.rel * radius, 1e-3 * abs(used))
        damping = est.damping
        if curvature is not None and math.isfinite(curvature):
            damping = max(damping, used - curvature + margin)
        if damping <= used:  # the estimates saw nothing new: double the shift
            damping = max(2.0 * used, used + margin, 1e-12)
        self._cached = est._replace(damping=float(damping))
        stats["damping"] = float(damping)
        return float(damping)

    # -- checkpoints --------------------------------------------------------------------
    def snapshot(self) -> Any:
        """The state, for :meth:`restore` after a failed call."""
        return self._calls, self._cached, generator_state(self._rng), self._size

    def restore(self, snapshot: Any) -> None:
        """Return to the state of :meth:`snapshot`."""
        self._calls, self._cached, rng, self._size = snapshot
        if rng is not None:
            self._rng.set_state(rng)

    def state_dict(self) -> dict[str, Any]:
        """The call counter, the cached estimate, the size of the operator it is of and
        the generator (plain data, tensors)."""
        est = self._cached
        return {
            "calls": self._calls,
            "estimate": None if est is None else [float(v) for v in est],
            "generator": generator_state(self._rng),
            "size": self._size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; a malformed one raises ValueError, changing nothing."""
        if isinstance(state, Mapping) and "size" not in state:  # (older: unknown)
            state = {**state, "size": None}
        check_keys(state, ("calls", "estimate", "generator", "size"), self)
        size = state["size"]
        size = None if size is None else _vocab.as_int(size, "state['size']", min=0)
        calls = _vocab.as_int(state["calls"], "state['calls']", min=0)
        est = state["estimate"]
        if est is not None:
            if not isinstance(est, (list, tuple)) or len(est) != 4:
                raise ValueError(
                    "AutoDamping.load_state_dict: `estimate` must be None or "
                    f"[damping, num_hvps, lambda_max, lambda_min], got {est!r}."
                )
            values = [_vocab.as_float(v, "state['estimate']") for v in est]
            if values[0] < 0:
                raise ValueError("AutoDamping.load_state_dict: the damping must be >= 0.")
            est = DampingEstimate(values[0], int(values[1]), values[2], values[3])
        check_generator_state(state["generator"], self._rng, "generator", self)
        if state["generator"] is not None:
            self._rng.set_state(state["generator"].clone())
        self._calls, self._cached, self._size = calls, est, size


def _checked(solver: Solver, sol: Any, b: Tensor) -> Solution:
    """``sol``, after checking that it is a :class:`Solution` whose value is a floating-point
    tensor shaped like ``b`` (a solver of one's own that gets it wrong is named, not met
    later as an operator's shape error)."""
    x = getattr(sol, "value", None)
    if isinstance(sol, Solution) and isinstance(x, Tensor) and x.is_floating_point():
        if x.shape == b.shape:
            return sol
    got = type(sol).__name__ if not isinstance(sol, Solution) else f"value {type(x).__name__}"
    got += f" of shape {tuple(x.shape)}, {x.dtype}" if isinstance(x, Tensor) else ""
    raise ValueError(
        f"{solver!r}.solve(op, b, x0) must return a Solution whose value is a floating-point "
        f"tensor shaped like b, {tuple(b.shape)}; it returned {got}."
    )


def _met_negative_curvature(sol: Solution) -> bool:
    """The solve met negative curvature: an iterative solver's status, or a dense solve
    (``Exact``) that inverted negative eigenvalues of the damped matrix (its status is
    ``"exact"``, the system it solved still indefinite)."""
    return sol.status == Status.NEGATIVE_CURVATURE or bool(sol.stats.get("negative_eigenvalues"))


def damped_solve(
    solver: Solver,
    op: LinearOperator,
    b: Tensor,
    x0: Tensor | None,
    damping: float | AutoDamping,
) -> tuple[Solution, LinearOperator, dict[str, Any]]:
    """``(H + damping I)^{-1} b`` by ``solver``: the solution, the system, and stats.

    With an :class:`AutoDamping`, the damping comes from its (cached) estimate; a solve
    that meets negative curvature (an ``Exact`` solve: negative eigenvalues of the damped
    matrix) is repeated with the damping :meth:`AutoDamping.retry` returns (a fresh
    estimate, then past the curvature met), at most :data:`RETRIES` times.
    ``stats["damping"]`` is the damping of the returned solve; ``stats["damping_retries"]``
    counts the repeated solves.

    Cost: the solver's products, plus those of an :class:`AutoDamping` estimate when it is
    renewed, times at most ``1 + RETRIES`` solves after negative curvature.

    Raises:
        ArgumentTypeError: ``solver`` is not a :class:`Solver`, ``damping`` not a number or
            an :class:`AutoDamping`.
        ValueError: ``damping`` is negative, NaN or infinite.
    """
    stats: dict[str, Any] = {}
    auto = damping if isinstance(damping, AutoDamping) else None
    if not isinstance(solver, Solver):
        raise _vocab.ArgumentTypeError(
            f"`solver` must be a hypergradient solver such as hg.CG(), got {type(solver).__name__}."
        )
    if auto is None:
        value = _vocab.as_float(damping, "damping", min=0.0, hint=_DAMPING_HINT)
    else:
        value = auto.damping(op, stats)
    system = DampedOperator(op, value) if value else op
    sol = _checked(solver, solver.solve(system, b, x0), b)
    first = sol.num_hvps
    retries = 0
    while auto is not None and _met_negative_curvature(sol) and retries < RETRIES:
        curvature = sol.stats.get("curvature", sol.stats.get("rayleigh_quotient"))
        if curvature is None:  # Exact: the smallest eigenvalue of the damped matrix
            curvature = sol.stats.get("lambda_min")
        value = auto.retry(op, value, curvature, stats)
        system = DampedOperator(op, value)
        sol = _checked(solver, solver.solve(system, b, x0), b)
        retries += 1
    if retries:
        stats.update(first_solve_hvps=first, damping_retries=retries)
    stats["damping"] = value
    return sol, system, stats
