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

__all__ = ["Exact"]

_F32_EPS = torch.finfo(torch.float32).eps


class Exact(Solver):
    """Materialize ``A`` (``n`` products) and solve densely: the reference solver.

    Symmetric operators are solved through an eigendecomposition in float64 with a
    pseudo-inverse cut at ``max(rcond, 10 eps) * max|lambda|``, ``eps`` that of the
    products, at most float32's (so parameters that do not enter ``f``, whose Hessian rows
    are zero, get zero instead of NaN, and the rounding noise of a float32 model's singular
    Hessian, eigenvalues near ``eps * max|lambda|``: measured 0.2 to 2.4 eps up to ``n =
    2000``, is not inverted; a bfloat16 or float16 model's real eigenvalues lie within a
    few of its eps of the largest, so its singular Hessian's noise is inverted as before);
    others by LU, falling back to the
    minimum-norm least-squares solution (SVD pseudo-inverse cut at the same level) when
    ``A`` is singular at that level (an LU solution longer than ``||b|| / (cut ||A||_F /
    sqrt(n))`` proves it). The status is ``"exact"``; ``residual_norm`` is ``||b - A x||`` in
    float64, ``A`` symmetrized for a symmetric operator (non-zero when ``b`` has a part
    outside the range of a singular ``A``). For a symmetric operator the eigendecomposition
    also tells where the point is: ``stats["lambda_min"]`` and
    ``stats["negative_eigenvalues"]`` (below minus the cut). The solve is exact either way;
    at a saddle (an indefinite Hessian) the implicit derivative is that of the stationary
    point, which training does not stay at, where the iterative solvers report
    ``negative_curvature``.

    Args:
        max_size: refuse operators larger than this (the matrix has ``n^2`` entries).
        chunk_size: products evaluated together while materializing (bounds memory).
        rcond: relative cut of the pseudo-inverse (never below the products' rounding
            level ``10 eps``, at most float32's: the default 1e-13 is float64's).

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
        if op.symmetric:  # the matrix solved, and the residual's: its asymmetry is rounding
            A64 = 0.5 * (A64 + A64.T)  # (a float16 model's read 5e-5: "singular" warnings)
        # eigenvalues below the products' rounding (10 eps relative) are noise: a float32
        # model's singular Hessian read 1e-8 where float64 read 1e-18, and inverting them
        # gave a hypergradient 11 times too large. Not above float32's: 10 eps of bfloat16
        # cut the real eigenvalues of a ridge model of condition 100 (96 % off)
        rcond = max(self.rcond, 10 * min(op.product_eps, _F32_EPS))
        x64, evals = _dense_solve(A64, b64, op.symmetric, rcond)
        residual = float(torch.linalg.vector_norm(b64 - A64 @ x64))
        stats: dict[str, Any] = {"matrix": A}
        if evals is not None:
            cut = rcond * float(evals.abs().max())
            stats["lambda_min"] = float(evals[0])
            stats["negative_eigenvalues"] = int((evals < -cut).sum())
        x = x64.to(b.dtype)
        require_finite_solution(x)
        return Solution(x, op.num_matvecs - start, residual, True, Status.EXACT, 1, stats)


def _dense_solve(
    A: Tensor, b: Tensor, symmetric: bool, rcond: float
) -> tuple[Tensor, Tensor | None]:
    """``A^+ b`` by eigendecomposition (symmetric: with the ascending eigenvalues) or LU
    with a least-squares fallback (eigenvalues None)."""
    if symmetric:  # (symmetrized by the caller)
        evals, evecs = torch.linalg.eigh(A)
        cut = rcond * evals.abs().max().clamp_min(torch.finfo(A.dtype).tiny)
        inv = torch.where(evals.abs() > cut, 1.0 / evals, torch.zeros_like(evals))
        return evecs @ (inv * (evecs.T @ b)), evals
    try:
        x = torch.linalg.solve(A, b)
        # ||x|| <= ||b|| / sigma_min and sigma_max >= ||A||_F / sqrt(n): a larger x proves
        # sigma_min below the cut (LU of a singular float32 I - J^T, invertible by its
        # rounding, gave ||x|| ~ 1e9 and a hypergradient 6 times the minimum-norm one)
        sigma = float(torch.linalg.matrix_norm(A)) / math.sqrt(A.shape[0])
        bound = float(torch.linalg.vector_norm(b)) / (rcond * sigma) if rcond * sigma else math.inf
        if _vocab.is_finite(x) and float(torch.linalg.vector_norm(x)) <= bound:
            return x, None
    except RuntimeError:  # singular (torch.linalg.LinAlgError)
        pass
    # Minimum-norm least squares through the SVD: ``torch.linalg.lstsq``'s default driver
    # returns zeros on rank-deficient input on some builds, and CUDA offers only "gels",
    # which needs full rank.
    return torch.linalg.pinv(A, rtol=rcond) @ b, None
