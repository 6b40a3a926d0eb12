"""Randomized Nystrom sketches of a symmetric operator, in a numerically stable eigen form."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _tree, _vocab
from ..operators import LinearOperator
from .base import PRODUCT
from .spectrum import check_operator

__all__ = ["NystromApproximation", "nystrom_sketch"]

SKETCHES = ("column", "gaussian")


@dataclass
class NystromApproximation:
    """Eigen form ``A_nys = U diag(lam) U^T`` of a rank-r Nystrom approximation.

    ``U`` has orthonormal columns (n x r) and ``lam >= 0``. Solves and preconditioners use
    this form: no subtraction of nearly equal quantities, unlike the Woodbury formula
    ``x = b/rho - C (W + C^T C / rho)^{-1} C^T b / rho^2``, which loses all digits in float32
    when ``rho`` is small.
    """

    U: Tensor
    eigenvalues: Tensor
    #: ``U`` spans the whole space (a ``rank`` of at least the dimension, clamped to it):
    #: ``A_nys`` is ``A`` itself, and a solve needs no term for the complement of ``U``.
    full_rank: bool
    #: The sketch's core had non-positive curvature (``A`` is not positive semi-definite
    #: along the sketch): the approximation is that of ``A``'s positive part seen by the
    #: sketch, possibly of rank 0 (then ``A_nys = 0``).
    indefinite: bool = False

    def solve(self, b: Tensor, rho: float) -> Tensor:
        """``(A_nys + rho I)^{-1} b`` for a shift ``rho > 0`` (as :class:`Nystrom`'s).

        Raises:
            ValueError: ``rho`` is not a finite number > 0 (with ``rho <= 0``,
                ``A_nys + rho I`` is singular or indefinite wherever ``A_nys`` is 0).
        """
        rho = _vocab.as_float(rho, "rho", min=0.0, open_min=True)
        c = self.U.T @ b
        x = self.U @ (c / (self.eigenvalues + rho))
        if not self.full_rank:  # the orthogonal complement, where A_nys is zero
            x = x + (b - self.U @ c) / rho
        return x


def _rows_per_block(width: int) -> int:
    """Rows of a ``width``-column matrix in a block of about 4M numbers."""
    return max(1, (1 << 22) // max(1, width))


def _right_multiply_(B: Tensor, M: Tensor) -> Tensor:
    """``B[:, :k] = B @ M`` in place, by row blocks (``M`` is ``r x k``, ``k <= r``)."""
    k = M.shape[1]
    step = _rows_per_block(B.shape[1])
    for i in range(0, B.shape[0], step):
        B[i : i + step, :k] = B[i : i + step] @ M
    return B[:, :k]


def _eigen_form(B: Tensor, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``B B^T = U diag(lam) U^T`` with orthonormal ``U``, overwriting ``B`` (n x k, float64).

    Gram eigen-decomposition (``B^T B = V S^2 V^T``, ``B V S^{-1}`` orthonormal) followed by
    one CholeskyQR re-orthonormalization, so ``U`` is orthonormal to working precision
    (CholeskyQR2, Fukaya et al. 2014). Directions with ``s^2`` below ``r * eps * max s^2``
    (numerically zero eigenvalues) are dropped. Only ``k x k`` matrices are factored; the
    ``n x k`` work happens in place in ``B``, so the memory is ``B`` plus the returned ``U``.
    """
    eps = torch.finfo(B.dtype).eps
    if B.shape[1] == 0:
        return B.new_zeros(B.shape[0], 0, dtype=out_dtype), B.new_zeros(0, dtype=out_dtype)
    s2, V = torch.linalg.eigh(B.T @ B)
    keep = s2 > 10 * B.shape[1] * eps * float(s2.max().clamp_min(0.0))
    if not bool(keep.any()):
        return B.new_zeros(B.shape[0], 0, dtype=out_dtype), B.new_zeros(0, dtype=out_dtype)
    s2 = s2[keep]
    B1 = _right_multiply_(B, V[:, keep] / s2.sqrt())  # ~orthonormal, B B^T = B1 S^2 B1^T
    G = B1.T @ B1
    L, info = torch.linalg.cholesky_ex(0.5 * (G + G.T))
    if int(info) != 0:  # cannot happen for kept directions; keep the first pass
        lam, M = s2, torch.eye(s2.numel(), dtype=B.dtype, device=B.device)
    else:
        # B1 = Q L^T with Q orthonormal, so B B^T = Q (L^T S^2 L) Q^T; diagonalize the core.
        core = L.T @ (s2[:, None] * L)
        lam, W = torch.linalg.eigh(0.5 * (core + core.T))
        M = torch.linalg.solve_triangular(L.T, W, upper=True)  # U = B1 L^{-T} W
    U = torch.empty(B.shape[0], M.shape[1], dtype=out_dtype, device=B.device)
    step = _rows_per_block(B1.shape[1])
    for i in range(0, B.shape[0], step):
        U[i : i + step] = (B1[i : i + step] @ M).to(out_dtype)
    return U, lam


def _test_matrix(
    n: int, r: int, sketch: str, generator: torch.Generator | None, device: torch.device
) -> tuple[Tensor | None, Tensor | None]:
    """``(idx, Omega)``: sampled coordinates (column sketch) or orthonormal Gaussian columns."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if sketch == "column":
        return torch.randperm(n, generator=generator, device=gen_device)[:r].to(device), None
    work = _tree.wide_dtype(device)
    G = torch.randn(n, r, generator=generator, dtype=work, device=gen_device).to(device)
    return None, torch.linalg.qr(G).Q  # n x r, orthonormal columns


def _sketch_products(
    op: LinearOperator, r: int, idx: Tensor | None, Om: Tensor | None, chunk_size: int | None
) -> Tensor:
    """``Y = A Omega`` (n x r, float64), filled chunk by chunk of test vectors."""
    n = op.size
    Y = torch.empty(n, r, dtype=_tree.wide_dtype(op.device), device=op.device)
    step = r if chunk_size is None else max(1, int(chunk_size))
    for i in range(0, r, step):
        j = min(r, i + step)
        if idx is not None:
            block = torch.zeros(j - i, n, dtype=op.dtype, device=op.device)
            block[torch.arange(j - i, device=op.device), idx[i:j]] = 1.0
        else:
            assert Om is not None
            block = Om[:, i:j].T.to(op.dtype)
        Y[:, i:j] = op.matmat(block).T
        del block
    _vocab.require_finite(
        [Y],
        [f"{PRODUCT} (the Nystrom sketch A Omega)"],
        "",
        "Check inner_loss at `params`: its Hessian holds NaN or Inf.",
    )
    return Y


def nystrom_sketch(
    op: LinearOperator,
    rank: int,
    sketch: str = "column",
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> NystromApproximation:
    """Randomized Nystrom approximation of a symmetric PSD operator with ``rank`` products.

    ``sketch="column"`` samples ``rank`` coordinates without replacement (the columns of
    ``A`` at those indices; Hataya & Yamada, 2023); ``sketch="gaussian"`` uses an
    orthonormalized Gaussian test matrix (Tropp et al., 2017). The core is factored after a
    tiny shift, ``nu = eps * ||Y||`` (Tropp et al., 2017, Alg. 3), by Cholesky, with an
    eigendecomposition and PSD projection as fallback when ``A`` is indefinite (non-convex
    inner problems). Everything after the products runs in float64. A ``rank`` at least the
    dimension is clamped to it, and then the approximation is ``A`` itself.

    Indefinite operators (a saddle point, a non-convex inner problem): when the core
    ``Omega^T A Omega`` has an eigenvalue below ``-nu`` the approximation is built from its
    positive eigen-directions only, and flagged ``indefinite`` if that eigenvalue is below
    the products' rounding, ``-4 eps max|m|`` (``eps`` theirs: the core of a float32 or
    bfloat16 model's PSD singular Hessian reads down to ``-0.5 eps max|m|``, which is no
    saddle); with no positive direction at all (e.g. the 1 x 1 operator ``[[-1]]``) it is
    the zero approximation of rank 0, so that a solve gives ``b / rho`` and a
    preconditioner is the identity. Eigenvalues that overflow the operator's dtype are
    clamped to its largest finite value.

    Memory: the sketch ``Y = A Omega`` in float64 (``8 r n`` bytes; the Gaussian test matrix
    adds as much), the returned ``U`` (``r n`` numbers in the operator's dtype) and, while
    the products run, ``chunk_size`` rows of test vectors and results. The column sketch
    never materializes its test matrix, and the factorization works in place.

    Raises:
        ArgumentTypeError: ``op`` is not a LinearOperator or ``generator`` not a generator.
        ValueError: ``op`` is not symmetric.
        NonFiniteHypergradientError: a product of the sketch holds NaN or Inf.
    """
    check_operator(op, "nystrom_sketch", generator, symmetric=True)
    rank = _vocab.as_int(rank, "rank", min=1)
    sketch = _vocab.as_choice(sketch, "sketch", SKETCHES)
    chunk_size = _vocab.as_optional_int(chunk_size, "chunk_size", min=1)
    n = op.size
    r = min(rank, n)
    idx, Om = _test_matrix(n, r, sketch, generator, op.device)
    Y = _sketch_products(op, r, idx, Om, chunk_size)
    work = Y.dtype
    eps = torch.finfo(work).eps
    nu = eps * float(torch.linalg.matrix_norm(Y, ord="fro")) * math.sqrt(n)
    if nu == 0.0:  # A Omega = 0
        return _empty(op)
    if idx is None:
        assert Om is not None  # the Gaussian sketch has a test matrix
        core = Om.T @ Y  # Omega^T Y
    else:
        core = Y[idx]
    core = 0.5 * (core + core.T)
    shifted = core + nu * torch.eye(r, dtype=work, device=op.device)  # Omega^T (Y + nu Omega)
    L, info = torch.linalg.cholesky_ex(shifted)
    if int(info) == 0:
        # Y_nu = Y + nu Omega; B = Y_nu L^{-T}, so B B^T = Y_nu (Omega^T Y_nu)^{-1} Y_nu^T.
        if idx is not None:
            Y[idx, torch.arange(r, device=op.device)] += nu
        elif Om is not None:
            Y.add_(Om, alpha=nu)
        del Om
        rows = _rows_per_block(r)
        for i in range(0, n, rows):
            Y[i : i + rows] = torch.linalg.solve_triangular(
                L.T, Y[i : i + rows], upper=True, left=False
            )
        U, s2 = _eigen_form(Y, op.dtype)
        lam = (s2 - nu).clamp_min(0.0)
        indefinite = False
    else:
        # Indefinite core: Nystrom of the PSD part, A_nys = Y M_+^+ Y^T.
        del Om
        m, V = torch.linalg.eigh(core)
        keep = m > eps * r * m.abs().max()
        indefinite = bool(m[0] < -4 * op.product_eps * m.abs().max())  # beyond rounding
        if not bool(keep.any()):  # no positive curvature in the sketch at all
            return _empty(op, indefinite=True)
        Z = _right_multiply_(Y, V[:, keep] / m[keep].sqrt())
        U, lam = _eigen_form(Z, op.dtype)
    top = torch.finfo(op.dtype).max
    return NystromApproximation(
        U.contiguous(),
        lam.clamp(max=top).to(op.dtype),
        full_rank=bool(U.shape[1] >= n),
        indefinite=indefinite,
    )


def _empty(op: LinearOperator, indefinite: bool = False) -> NystromApproximation:
    return NystromApproximation(
        torch.zeros(op.size, 0, dtype=op.dtype, device=op.device),
        torch.zeros(0, dtype=op.dtype, device=op.device),
        full_rank=False,
        indefinite=indefinite,
    )
