"""The reference solver: materialize the operator and solve densely."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import _vocab
from .._vocab import Status
from ..operators import LinearOperator
from .base import PRODUCT, Solution, Solver, require_finite_solution

__all__ = ["NOISE", "Exact"]

_F32 = torch.finfo(torch.float32).eps

#: An eigenvalue is inverted only above this many times the rounding along its eigenvector
#: (see ``_dense_solve``): measured at most 4.4 for noise, at least 26 for real ones.
NOISE = 10.0


class Exact(Solver):
    """Materialize ``A`` (``n`` products) and solve densely: the reference solver.

    Symmetric operators are solved through an eigendecomposition in float64 of the
    symmetrized matrix, inverting the eigenvalues above ``rcond * max|lambda|`` and above
    ``NOISE`` (10) times the rounding the matrix's antisymmetric part shows along their
    eigenvector (a pseudo-inverse: parameters that do not enter ``f``, whose Hessian rows
    are zero, get zero instead of NaN, and the zero eigenvalues of a float32 model's
    singular Hessian, read as 2e-8 of the largest, are not inverted; a matrix given
    exactly symmetric, e.g. a ``MatrixOperator``, shows no rounding: ``rcond`` alone);
    others by LU, falling back to the minimum-norm least-squares solution (SVD
    pseudo-inverse cut at ``max(rcond, 10 eps)``, ``eps`` that of the products, at most
    float32's) when ``A`` is singular at that level (an LU solution longer than ``||b|| /
    (cut ||A||_F / sqrt(n))`` proves it). The status is ``"exact"``; ``residual_norm`` is
    ``||b - A x||`` in float64, ``A`` symmetrized for a symmetric operator (non-zero when
    ``b`` has a part outside the range of a singular ``A``). For a symmetric operator the
    eigendecomposition also tells where the point is: ``stats["lambda_min"]`` and
    ``stats["negative_eigenvalues"]`` (the inverted negative ones). The solve is exact
    either way; at a saddle (an indefinite Hessian) the implicit derivative is that of the
    stationary point, which training does not stay at, where the iterative solvers report
    ``negative_curvature`` (the implicit methods warn about the negative eigenvalues).
    With finite-difference products (``hvp="first_order"``) the matrix is the differenced
    Hessian, accurate to about ``product_eps`` (2.4e-5 relative
    in float32, 3.7e-11 in float64): the residual is that matrix's, and ``stats`` says
    ``precision_limited``, ``finite_difference_products`` and ``product_eps``. Likewise with
    half-precision products (bfloat16 or float16 parameters, or autocast), the matrix is
    the one rounded at their ``product_eps``: ``stats`` says ``precision_limited``,
    ``product_eps`` and ``error_bound`` (the condition number of the inverted eigen- or
    singular values times ``product_eps``, the first-order bound of the solution's
    relative error), and the implicit methods warn when that bound exceeds 0.1 (measured: a
    bfloat16 quadratic of condition number 3.2e3 gave a hypergradient 11 % off, bound 34;
    its fixed-point form, ``I - J^T`` solved by LU, 4.9 times off).

    Args:
        max_size: refuse operators larger than this (the matrix has ``n^2`` entries).
        chunk_size: products evaluated together while materializing (bounds memory).
        rcond: relative cut of the pseudo-inverse.

    Cost: ``n`` products, O(n^2) memory, O(n^3) time. A NaN or Inf in the matrix raises
    :class:`~hypergradient.NonFiniteHypergradientError` (never a ``LinAlgError``).
    """

    def __init__(self, max_size: int = 20_000, chunk_size: int | None = None, rcond: float = 1e-13):
        self.max_size = _vocab.as_int(max_size, "max_size", min=1)
        self.chunk_size = _vocab.as_optional_int(chunk_size, "chunk_size", min=1)
        self.rcond = _vocab.as_float(rcond, "rcond", min=0.0)

    def solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> Solution:
        self.validate(op, b, x0)
        if op.size > self.max_size:
            raise ValueError(
                f"Exact() would materialize a {op.size} x {op.size} matrix (max_size="
                f"{self.max_size}); use hg.CG() or hg.NystromPCG(), or raise max_size."
            )
        start = op.num_matvecs
        A = op.dense(self.chunk_size)
        _vocab.require_finite(
            [A],
            [f"{PRODUCT} (a column of the dense matrix)"],
            "",
            "Check inner_loss at `params`: its Hessian holds NaN or Inf.",
        )
        work = torch.float64 if A.device.type != "mps" else A.dtype
        A64, b64 = A.to(work), b.to(work)
        skew = None
        if op.symmetric:  # the matrix solved, and the residual's: its asymmetry is rounding
            skew = 0.5 * (A64 - A64.T)  # (a float16 model's read 5e-5: "singular" warnings)
            A64 = 0.5 * (A64 + A64.T)
        # non-symmetric: no noise estimate of its own; singular values below 10 eps of the
        # products (at most float32's) are noise
        rcond = self.rcond if skew is not None else max(self.rcond, 10 * min(op.product_eps, _F32))
        x64, evals, kept = _dense_solve(A64, b64, skew, rcond)
        residual = float(torch.linalg.vector_norm(b64 - A64 @ x64))
        stats: dict[str, Any] = {"matrix": A}
        if evals is not None and kept is not None:
            stats["lambda_min"] = float(evals[0])
            stats["negative_eigenvalues"] = int(((evals < 0) & kept).sum())
        if op.differenced:  # the residual is the differenced matrix's, not the Hessian's
            stats.update(precision_limited=True, finite_difference_products=True)
            stats["product_eps"] = op.product_eps
        elif op.product_eps > _F32:
            # half-precision products (bfloat16/float16 parameters, autocast): the matrix is
            # the Hessian (or I - J^T) rounded at their eps, and the residual above is that
            # matrix's (~1e-14). First-order perturbation bound of the solution's relative
            # error: cond * eps, cond that of the inverted eigen- (singular) values.
            if evals is not None and kept is not None:
                inverted = evals[kept].abs()
            else:
                sv = torch.linalg.svdvals(A64)
                inverted = sv[sv > rcond * sv[0]]
            if inverted.numel():
                stats["error_bound"] = float(inverted.max() / inverted.min()) * op.product_eps
            stats.update(precision_limited=True, product_eps=op.product_eps)
        x = x64.to(b.dtype)
        require_finite_solution(x)
        return Solution(x, op.num_matvecs - start, residual, True, Status.EXACT, 1, stats)


def _dense_solve(
    A: Tensor, b: Tensor, skew: Tensor | None, rcond: float
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``A^+ b`` by eigendecomposition (symmetric, ``skew`` its antisymmetric rounding: with
    the ascending eigenvalues and which were inverted) or LU with a least-squares fallback.

    An eigenvalue is inverted if it exceeds ``rcond * max|lambda|`` and ``NOISE`` times the
    rounding the skew part shows along its eigenvector, ``||skew u||``: a float32 model's
    singular Hessian read its zero eigenvalues as 2e-8 of the largest, at most 3.2 times
    that rounding (inverted, the hypergradient was 11 times too large), where a real one
    of 1.8e-8 stood 26 times above it (a ReLU network's, exact to 1e-6 in float32)."""
    if skew is not None:
        evals, evecs = torch.linalg.eigh(A)
        top = evals.abs().max().clamp_min(torch.finfo(A.dtype).tiny)
        # in units of the top eigenvalue: the squares of a rounding ~1e-16 of a Hessian of
        # 1e180 overflowed (every eigenvalue read as noise: x = 0, "singular")
        noise = top * torch.linalg.vector_norm((skew / top) @ evecs, dim=0)
        kept = (evals.abs() > rcond * top) & (evals.abs() > NOISE * noise)
        inv = torch.where(kept, 1.0 / evals, torch.zeros_like(evals))
        return evecs @ (inv * (evecs.T @ b)), evals, kept
    try:
        x = torch.linalg.solve(A, b)
        # ||x|| <= ||b|| / sigma_min and sigma_max >= ||A||_F / sqrt(n): a larger x proves
        # sigma_min below the cut (LU of a singular float32 I - J^T, invertible by its
        # rounding, gave ||x|| ~ 1e9 and a hypergradient 6 times the minimum-norm one)
        sigma = float(torch.linalg.matrix_norm(A)) / math.sqrt(A.shape[0])
        bound = float(torch.linalg.vector_norm(b)) / (rcond * sigma) if rcond * sigma else math.inf
        if _vocab.is_finite(x) and float(torch.linalg.vector_norm(x)) <= bound:
            return x, None, None
    except RuntimeError:  # singular (torch.linalg.LinAlgError)
        pass
    # Minimum-norm least squares through the SVD: ``torch.linalg.lstsq``'s default driver
    # returns zeros on rank-deficient input on some builds, and CUDA offers only "gels",
    # which needs full rank.
    return torch.linalg.pinv(A, rtol=rcond) @ b, None, None
