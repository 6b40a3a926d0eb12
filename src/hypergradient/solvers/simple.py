"""The simplest solvers: a scaled identity, and Richardson's fixed-point iteration."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _vocab
from .._vocab import Status
from ..operators import LinearOperator
from .base import Solution, Solver, require_finite_product, safe_norm

__all__ = ["FixedPoint", "Identity"]


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
        return Solution(self.scale * b, 0, None, None, Status.FIXED_BUDGET, 0)


class FixedPoint(Solver):
    """Richardson / fixed-point iteration ``x <- x + omega (b - A x)``.

    The natural solver for ``theta*`` defined as a fixed point ``theta = T(theta, phi)``
    (``hg.implicit_fixed_point``): there ``A = I - J^T`` and with ``omega = 1`` the iteration
    is ``x <- b + J^T x``, the adjoint of the forward iteration, which converges whenever
    ``T`` is a contraction. For an argmin, ``omega`` plays the role of a step size
    (converges iff ``0 < omega < 2 / lambda_max``). The residual is known at every step, so
    it stops at ``||b - A x|| <= max(tol * ||b||, atol)`` and reports divergence.

    Args:
        maxiter: maximum products.
        tol: relative residual tolerance.
        omega: relaxation (step size).
        atol: absolute residual tolerance.

    Cost: one product and O(n) memory per iteration.
    """

    def __init__(
        self, maxiter: int = 100, tol: float = 1e-6, omega: float = 1.0, atol: float = 0.0
    ):
        self.maxiter = _vocab.as_int(maxiter, "maxiter", min=1)
        self.tol = _vocab.as_float(tol, "tol", min=0.0)
        self.omega = _vocab.as_float(omega, "omega", min=0.0, open_min=True)
        self.atol = _vocab.as_float(atol, "atol", min=0.0)

    def solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> Solution:
        self.validate(op, b, x0)
        start = op.num_matvecs
        bnorm = safe_norm(b)
        threshold = max(self.tol * bnorm, self.atol)
        if x0 is None:
            x, r = torch.zeros_like(b), b.clone()
        else:
            x = x0.to(b.dtype).clone()
            r = b - self._product(op, x)
        rnorm = safe_norm(r)
        scale = max(rnorm, bnorm, 1e-300)  # divergence is growth past the starting residual
        status, it = Status.MAX_ITERATIONS, 0
        for it in range(1, self.maxiter + 1):  # noqa: B007
            if rnorm <= threshold:
                status = Status.CONVERGED
                it -= 1
                break
            x = x + self.omega * r
            r = b - self._product(op, x)
            rnorm = safe_norm(r)
            if not math.isfinite(rnorm) or rnorm > 1e8 * scale:
                status = Status.DIVERGED
                break
        else:
            if rnorm <= threshold:
                status = Status.CONVERGED
        return Solution(x, op.num_matvecs - start, rnorm, status == Status.CONVERGED, status, it)

    @staticmethod
    def _product(op: LinearOperator, x: Tensor) -> Tensor:
        w = op.matvec(x)
        require_finite_product(w)
        return w
