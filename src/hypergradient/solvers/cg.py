"""Conjugate gradient, and the CG kernel that the Nystrom-preconditioned solver reuses."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import _vocab
from .._vocab import Status
from ..operators import LinearOperator
from .base import Solution, Solver, require_finite_product, safe_norm

__all__ = ["CG", "conjugate_gradient"]


def conjugate_gradient(
    op: LinearOperator,
    b: Tensor,
    x0: Tensor | None,
    maxiter: int,
    tol: float,
    atol: float,
    precondition: Callable[[Tensor], Tensor] | None = None,
) -> Solution:
    """(Preconditioned) conjugate gradient on a validated system; see :class:`CG`."""
    start = op.num_matvecs
    bnorm = safe_norm(b)
    if bnorm == 0.0:  # A x = 0: x = 0
        return Solution(torch.zeros_like(b), 0, 0.0, True, Status.CONVERGED, 0)
    # Never iterate below rounding level: past it the residual only shrinks by rounding
    # noise until p^T A p underflows to 0, which would read as false negative curvature.
    floor = 10 * torch.finfo(b.dtype).eps * bnorm
    threshold = max(tol * bnorm, atol, floor)
    if x0 is None or not bool(x0.any()):
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        x = x0.to(b.dtype).clone()
        Ax = op.matvec(x)
        require_finite_product(Ax)
        r = b - Ax
    rnorm = safe_norm(r)
    status, it = Status.MAX_ITERATIONS, 0
    if rnorm <= threshold:
        status = Status.CONVERGED
    else:
        z = precondition(r) if precondition is not None else r
        p = z.clone()
        rz = torch.dot(r, z)
        for it in range(1, maxiter + 1):  # noqa: B007 (it is reported)
            Ap = op.matvec(p)
            pAp = torch.dot(p, Ap)
            if not _vocab.is_finite(pAp):
                require_finite_product(Ap)
                status = Status.DIVERGED
                break
            if float(pAp) <= 0.0:
                # A is not positive definite along p: a CG step here would move uphill.
                status = Status.NEGATIVE_CURVATURE
                it -= 1  # this direction was not taken
                break
            alpha = rz / pAp
            x.add_(p, alpha=alpha)
            r.sub_(Ap, alpha=alpha)
            rnorm = safe_norm(r)
            if rnorm <= threshold:
                status = Status.CONVERGED
                break
            z = precondition(r) if precondition is not None else r
            rz_new = torch.dot(r, z)
            p.mul_(rz_new / rz).add_(z)
            rz = rz_new
    return Solution(
        x,
        op.num_matvecs - start,
        rnorm,
        status == Status.CONVERGED,
        status,
        it,
        {"relative_residual": rnorm / bnorm},
    )


class CG(Solver):
    """Conjugate gradient for symmetric positive-definite ``A`` (Hestenes & Stiefel, 1952).

    Stops when ``||b - A x|| <= max(tol * ||b||, atol)`` or after ``maxiter`` products (and
    always once the residual is at rounding level, ``10 eps ||b||``, even with ``tol=0``).
    Starts from ``x0`` when given (warm start; costs one extra product). If a search
    direction has non-positive curvature ``p^T A p <= 0`` (the inner problem is not at a
    minimum, or ``A`` is singular along ``p``) it stops and reports
    ``status="negative_curvature"`` with the last iterate, instead of stepping uphill; add
    damping (``hg.implicit(..., damping=...)``) in that case.

    Args:
        maxiter: maximum number of products.
        tol: relative residual tolerance.
        atol: absolute residual tolerance.
        preconditioner: optional callable ``r -> M^{-1} r`` for a symmetric positive-definite
            ``M``.

    Cost: one product and O(n) memory per iteration. With exact arithmetic it solves an
    ``n``-dimensional system in at most ``n`` iterations.
    """

    requires_symmetric = True

    def __init__(
        self,
        maxiter: int = 100,
        tol: float = 1e-6,
        atol: float = 0.0,
        preconditioner: Callable[[Tensor], Tensor] | None = None,
    ):
        self.maxiter = _vocab.as_int(maxiter, "maxiter", min=1)
        self.tol = _vocab.as_float(tol, "tol", min=0.0)
        self.atol = _vocab.as_float(atol, "atol", min=0.0)
        if preconditioner is not None:
            _vocab.as_callable(preconditioner, "preconditioner", "r -> M^{-1} r")
        self.preconditioner = preconditioner

    def config(self) -> dict[str, object]:
        pre = self.preconditioner
        return {
            "maxiter": self.maxiter,
            "tol": self.tol,
            "atol": self.atol,
            "preconditioner": None if pre is None else getattr(pre, "__qualname__", repr(pre)),
        }

    def solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> Solution:
        self.validate(op, b, x0)
        return conjugate_gradient(op, b, x0, self.maxiter, self.tol, self.atol, self.preconditioner)
