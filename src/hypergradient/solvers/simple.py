"""The simplest solvers: a scaled identity, and Richardson's fixed-point iteration."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _vocab
from .._vocab import Status
from ..operators import LinearOperator
from .base import Solution, Solver, require_finite_product, require_finite_solution, safe_norm
from .cg_status import relative_tol

__all__ = ["FixedPoint", "Identity"]

#: FixedPoint stagnates (below its rounding floor) only after this many iterations without a
#: new best residual: a slow iteration on noisy products rises now and then while it still
#: decreases (a bfloat16 model's stopped at 8 % of ||b||, 14 % off, where 0.3 % was reached).
STALL = 10


class Identity(Solver):
    """``A^{-1} ~ scale * I``: no products.

    With ``scale`` equal to the inner learning rate this is the one-step look-ahead
    hypergradient (T1-T2; Luketina et al., 2016, "Scalable Gradient-Based Tuning of
    Continuous Regularization Hyperparameters", ICML).

    Args:
        scale: the factor, > 0.

    Cost: no product, no memory beyond the result.
    """

    def __init__(self, scale: float = 1.0):
        self.scale = _vocab.as_float(scale, "scale", min=0.0, open_min=True)

    def solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> Solution:
        self.validate(op, b, x0)
        x = self.scale * b
        require_finite_solution(x)
        return Solution(x, 0, None, None, Status.FIXED_BUDGET, 0)


class FixedPoint(Solver):
    """Richardson / fixed-point iteration ``x <- x + omega (b - A x)``.

    The natural solver for ``theta*`` defined as a fixed point ``theta = T(theta, phi)``
    (``hg.implicit_fixed_point``): there ``A = I - J^T`` and with ``omega = 1`` the iteration
    is ``x <- b + J^T x``, the adjoint of the forward iteration, which converges whenever
    ``T`` is a contraction. For an argmin, ``omega`` plays the role of a step size
    (converges iff ``0 < omega < 2 / lambda_max``). The residual is known at every step, so
    it stops at ``||b - A x|| <= max(tol * ||b||, atol, 10 eps ||b||)`` (a tolerance below
    rounding level means "as far as the precision goes", as for CG) and reports
    divergence: for a symmetric operator as soon as the residual grows (``(I - omega A)^k
    r_0`` has non-decreasing norm ratios, so growth never stops) by more than the rounding
    of the products that read it (``2 eps ||b||``, ``eps`` that of the operator's products,
    e.g. bfloat16 for a bfloat16 model), unless the best residual is already at rounding
    level (at most ``max(sqrt(eps_b), 2 eps) ||b||``, ``eps_b`` that of ``b``'s dtype) and
    has not improved for ``STALL`` (10) iterations (the true residual then moves by noise:
    the run stops, ``stats["stagnated"]``, "converged" if the tolerance asked for is below
    rounding level); for a non-symmetric one past ``1e8`` times the starting residual
    (bfloat16 models: the residual of a slow iteration rises now and then by noise while
    it still decreases, which was called "diverged", or "converged" at 8 % of ``||b||``
    with a solution 14 % off where 0.3 % was within reach). It iterates on ``b / ||b||``
    (scale-safe) and returns the iterate with the smallest residual, never one worse than
    the start.

    Args:
        maxiter: maximum products.
        tol: relative residual tolerance.
        omega: relaxation (step size).
        atol: absolute residual tolerance.

    A start ``x0`` worse than ``x = 0`` (``||b - A x0|| > ||b||``) is dropped, as CG drops it
    (``stats["warm_start_dropped"]``; its product is counted).

    Cost: one product and O(n) memory per iteration.
    """

    def __init__(
        self, maxiter: int = 100, tol: float = 1e-6, omega: float = 1.0, atol: float = 0.0
    ):
        self.maxiter = _vocab.as_int(maxiter, "maxiter", min=1)
        self.tol = relative_tol(tol)
        self.omega = _vocab.as_float(omega, "omega", min=0.0, open_min=True)
        self.atol = _vocab.as_float(atol, "atol", min=0.0)

    def solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> Solution:
        self.validate(op, b, x0)
        start = op.num_matvecs
        bnorm = safe_norm(b)
        scale = bnorm if bnorm > 0.0 else 1.0  # iterate on b / ||b||: scale-safe
        bh = b / scale if bnorm > 0.0 else b
        eps = torch.finfo(b.dtype).eps
        # never below rounding level (as CG): tol=0 means "as far as the precision goes"
        asked = max(self.tol * bnorm / scale, self.atol / scale)
        threshold = max(asked, 10 * eps)
        x, r, rnorm, dropped = self._start(op, bh, x0, scale)
        x0 = None if dropped else x0
        limit = 1e8 * max(rnorm, bnorm / scale, 1e-300)  # non-symmetric: growth past this
        best, best_norm, improved, status, it, stagnated = self._iterate(
            op, bh, x, r, rnorm, threshold, limit
        )
        message = ""
        if stagnated:
            message = (
                f"the residual stopped decreasing at {best_norm:.3g} of ||b||, the rounding level "
                "of the operator's products; the best iterate is returned"
            )
        if status != Status.DIVERGED and (
            best_norm <= threshold or stagnated and asked < 10 * max(eps, op.product_eps)
        ):
            status = Status.CONVERGED  # (stagnated: to rounding level, which was asked for)
        if improved:
            value = best * scale
        else:  # the start is the best iterate: return it as given
            value = torch.zeros_like(b) if x0 is None else x0.to(b.dtype).clone()
        require_finite_solution(value)
        return Solution(
            value,
            op.num_matvecs - start,
            best_norm * scale,
            status == Status.CONVERGED,
            status,
            it,
            {
                k: True
                for k, on in (("stagnated", stagnated), ("warm_start_dropped", dropped))
                if on
            },
            message,
        )

    def _start(
        self, op: LinearOperator, bh: Tensor, x0: Tensor | None, scale: float
    ) -> tuple[Tensor, Tensor, float, bool]:
        """``(x, r, ||r||, dropped)`` of the start: ``x0`` (scaled), or 0 when there is none
        or it is worse than 0 (``||r|| > ||b||``: dropped, as CG drops it)."""
        if x0 is not None:
            x = x0.to(bh.dtype) / scale
            r = bh - self._product(op, x)
            if safe_norm(r) <= safe_norm(bh):
                return x, r, safe_norm(r), False
        return torch.zeros_like(bh), bh.clone(), safe_norm(bh), x0 is not None

    def _iterate(
        self,
        op: LinearOperator,
        bh: Tensor,
        x: Tensor,
        r: Tensor,
        rnorm: float,
        threshold: float,
        limit: float,
    ) -> tuple[Tensor, float, bool, Status, int, bool]:
        """The iteration from ``x`` (residual ``r``): the best iterate, its residual, whether
        it improved on the start, the status, the iterations, and whether it stagnated."""
        best, best_norm, previous, improved = x, rnorm, rnorm, False
        growth_tol = math.sqrt(torch.finfo(bh.dtype).eps)
        eps = max(torch.finfo(bh.dtype).eps, op.product_eps)
        floor = max(math.sqrt(torch.finfo(bh.dtype).eps), 2 * eps)  # rounding level
        # r = b - A x is read through the products, off by about their eps (||b|| = 1): a
        # bfloat16 model's rose by 3e-4 at 0.06 where it kept decreasing ("diverged")
        noise = 2 * eps
        status, it, best_at = Status.MAX_ITERATIONS, 0, 0
        while rnorm > threshold and it < self.maxiter:
            it += 1
            x = x + self.omega * r
            r = bh - self._product(op, x)
            rnorm = safe_norm(r)
            grew = rnorm > (1.0 + growth_tol) * previous if op.symmetric else rnorm > limit
            if grew and op.symmetric and best_norm <= floor and it - best_at >= STALL:
                # the true residual at its rounding floor moves by noise, not divergence
                return best, best_norm, improved, status, it, True
            if grew and op.symmetric:  # above the floor: divergence is growth beyond noise
                grew = rnorm > (1.0 + growth_tol) * previous + noise
            if grew or not math.isfinite(rnorm):
                return best, best_norm, improved, Status.DIVERGED, it, False
            if rnorm < best_norm:
                best, best_norm, improved, best_at = x, rnorm, True, it
            previous = rnorm
        return best, best_norm, improved, status, it, False

    @staticmethod
    def _product(op: LinearOperator, x: Tensor) -> Tensor:
        w = op.matvec(x)
        require_finite_product(w)
        return w
