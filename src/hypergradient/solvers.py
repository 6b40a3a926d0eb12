"""Interchangeable solvers for the linear system ``A x = b`` of implicit differentiation.

``A`` is the inner Hessian (or ``I - J^T`` for a fixed point), seen only through a
:class:`~hypergradient.operators.LinearOperator`; ``b`` is the gradient of the outer loss
with respect to the parameters. Every solver is a small object with one method,
``solve(operator, b, x0=None) -> Solution``, so any of them fits ``hg.implicit(solver=...)``
and the hyper-optimizer.

=================  ============================================  ====================
solver             approximation of ``A^{-1} b``                 products
=================  ============================================  ====================
``Exact``          dense matrix, symmetric eigen/LU solve         n (the dimension)
``CG``             conjugate gradient (optionally preconditioned) <= maxiter
``Neumann``        ``alpha sum_{j<=k} (I - alpha A)^j b``          k (+ power iters)
``Nystrom``        ``(A_nys + rho I)^{-1} b``, rank-r sketch       r
``NystromPCG``     CG preconditioned by a Nystrom sketch           r (per refresh) + it
``Identity``       ``scale * b`` (one-step / T1-T2)               0
``FixedPoint``     ``x <- x + omega (b - A x)`` (Richardson)       <= maxiter
=================  ============================================  ====================
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import _tree
from .operators import LinearOperator

__all__ = [
    "Solution",
    "Solver",
    "Exact",
    "CG",
    "Neumann",
    "Nystrom",
    "NystromApproximation",
    "NystromPCG",
    "Identity",
    "FixedPoint",
    "estimate_lambda_max",
    "nystrom_sketch",
]


@dataclass
class Solution:
    """Result of a linear solve.

    Attributes:
        value: the approximate solution ``x`` (1-D).
        num_hvps: operator products used, everything included (power iterations, sketches).
        residual_norm: ``||b - A x||`` when the solver knows it at no extra cost, else None.
        converged: True/False for solvers with a stopping criterion, None for fixed budgets.
        status: "converged", "max_iterations", "fixed_budget", "negative_curvature",
            "diverged" or "exact".
        iterations: iterations performed.
        stats: solver-specific extras (e.g. Neumann's ``alpha``, Nystrom's eigenvalues).
    """

    value: Tensor
    num_hvps: int
    residual_norm: float | None
    converged: bool | None
    status: str
    iterations: int = 0
    stats: dict[str, Any] = field(default_factory=dict)


def _as_int(value: Any) -> int | None:
    """``value`` as an int if it is an integer (numpy integers included, bools excluded)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _positive_int(value: Any, name: str) -> int:
    v = _as_int(value)
    if v is None or v <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return v


def _nonneg_int(value: Any, name: str) -> int:
    v = _as_int(value)
    if v is None or v < 0:
        raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}.")
    return v


def _positive_float(value: Any, name: str, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be a finite number {bound}, got {value!r}.")
    return value


def _check_system(op: LinearOperator, b: Tensor, x0: Tensor | None) -> None:
    if b.dim() != 1 or b.numel() != op.size:
        raise ValueError(f"`b` must be a 1-D tensor of {op.size} elements, got {tuple(b.shape)}.")
    if x0 is not None and (x0.dim() != 1 or x0.numel() != op.size):
        raise ValueError(f"`x0` must be a 1-D tensor of {op.size} elements, got {tuple(x0.shape)}.")


def _make_generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    if generator is not None and seed is not None:
        raise ValueError("Pass either `seed` or `generator`, not both.")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator, got {type(generator)}.")
        return generator
    if seed is not None:
        g = torch.Generator()
        g.manual_seed(int(seed))
        return g
    return None  # torch's global generator


class Solver:
    """Base class. Subclasses implement ``solve(operator, b, x0=None) -> Solution``."""

    requires_symmetric = False

    def solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> Solution:
        raise NotImplementedError

    def _check(self, op: LinearOperator, b: Tensor, x0: Tensor | None) -> None:
        if not isinstance(op, LinearOperator):
            raise TypeError(f"`op` must be a LinearOperator, got {type(op).__name__}.")
        _check_system(op, b, x0)
        if self.requires_symmetric and not op.symmetric:
            raise ValueError(
                f"{type(self).__name__} needs a symmetric operator, and this one is not "
                "(a fixed-point map's I - J^T). Use hg.FixedPoint(), hg.Exact() or hg.Neumann()."
            )

    def config(self) -> dict[str, Any]:
        """Every setting as plain data (for repr, logs and distributed consistency checks)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def state_dict(self) -> dict[str, Any]:
        """State carried across solves (a generator's state, a cached sketch); {} if none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; validates everything before assigning anything."""
        if state:
            raise ValueError(
                f"{type(self).__name__} has no state, but the checkpoint holds {sorted(state)}."
            )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


# --------------------------------------------------------------------------- Exact


class Exact(Solver):
    """Materialize ``A`` (``n`` products) and solve densely: the reference solver.

    Symmetric operators are solved through an eigendecomposition in float64 with a
    pseudo-inverse cut at ``rcond * max|lambda|`` (so parameters that do not enter ``f``,
    whose Hessian rows are zero, get zero instead of NaN); others by LU with a least-squares
    fallback. Cost: ``n`` products, O(n^2) memory, O(n^3) time; refused above ``max_size``.
    """

    def __init__(self, max_size: int = 20_000, chunk_size: int | None = None, rcond: float = 1e-13):
        self.max_size = _positive_int(max_size, "max_size")
        self.chunk_size = None if chunk_size is None else _positive_int(chunk_size, "chunk_size")
        self.rcond = _positive_float(rcond, "rcond", allow_zero=True)

    def solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> Solution:
        self._check(op, b, x0)
        if op.size > self.max_size:
            raise ValueError(
                f"Exact() would materialize a {op.size} x {op.size} matrix (max_size="
                f"{self.max_size}); use hg.CG() or hg.NystromPCG(), or raise max_size."
            )
        start = op.num_matvecs
        A = op.dense(self.chunk_size)
        work = torch.float64 if A.device.type != "mps" else A.dtype
        A64, b64 = A.to(work), b.to(work)
        if op.symmetric:
            A64 = 0.5 * (A64 + A64.T)
            evals, evecs = torch.linalg.eigh(A64)
            cut = self.rcond * evals.abs().max().clamp_min(torch.finfo(work).tiny)
            inv = torch.where(evals.abs() > cut, 1.0 / evals, torch.zeros_like(evals))
            x64 = evecs @ (inv * (evecs.T @ b64))
        else:
            try:
                x64 = torch.linalg.solve(A64, b64)
            except RuntimeError:
                x64 = torch.linalg.lstsq(A64, b64.unsqueeze(1)).solution.squeeze(1)
        residual = float(torch.linalg.vector_norm(b64 - A64 @ x64))
        return Solution(
            x64.to(b.dtype), op.num_matvecs - start, residual, True, "exact", 1, {"matrix": A}
        )


# --------------------------------------------------------------------------- CG


def _cg(
    op: LinearOperator,
    b: Tensor,
    x0: Tensor | None,
    maxiter: int,
    tol: float,
    atol: float,
    precondition: Callable[[Tensor], Tensor] | None,
) -> Solution:
    start = op.num_matvecs
    bnorm = float(torch.linalg.vector_norm(b))
    if bnorm == 0.0:
        return Solution(torch.zeros_like(b), 0, 0.0, True, "converged", 0)
    # Never iterate below rounding level: past it the residual only shrinks by rounding
    # noise until p^T A p underflows to 0, which would read as false negative curvature.
    floor = 10 * torch.finfo(b.dtype).eps * bnorm
    threshold = max(tol * bnorm, atol, floor)
    if x0 is None or not bool(x0.any()):
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        x = x0.to(b.dtype).clone()
        r = b - op.matvec(x)
    rnorm = float(torch.linalg.vector_norm(r))
    status, it = "max_iterations", 0
    if rnorm <= threshold:
        status = "converged"
    else:
        z = precondition(r) if precondition is not None else r
        p = z.clone()
        rz = torch.dot(r, z)
        for it in range(1, maxiter + 1):  # noqa: B007 (it is reported)
            Ap = op.matvec(p)
            pAp = torch.dot(p, Ap)
            if not bool(torch.isfinite(pAp)):
                status = "diverged"
                break
            if float(pAp) <= 0.0:
                # A is not positive definite along p: a CG step here would move uphill.
                status = "negative_curvature"
                it -= 1  # this direction was not taken
                break
            alpha = rz / pAp
            x.add_(p, alpha=alpha)
            r.sub_(Ap, alpha=alpha)
            rnorm = float(torch.linalg.vector_norm(r))
            if rnorm <= threshold:
                status = "converged"
                break
            z = precondition(r) if precondition is not None else r
            rz_new = torch.dot(r, z)
            p.mul_(rz_new / rz).add_(z)
            rz = rz_new
    return Solution(
        x,
        op.num_matvecs - start,
        rnorm,
        status == "converged",
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
        self.maxiter = _positive_int(maxiter, "maxiter")
        self.tol = _positive_float(tol, "tol", allow_zero=True)
        self.atol = _positive_float(atol, "atol", allow_zero=True)
        if preconditioner is not None and not callable(preconditioner):
            raise TypeError("`preconditioner` must be a callable r -> M^{-1} r.")
        self.preconditioner = preconditioner

    def solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> Solution:
        self._check(op, b, x0)
        return _cg(op, b, x0, self.maxiter, self.tol, self.atol, self.preconditioner)


# --------------------------------------------------------------------------- Neumann


def estimate_lambda_max(
    op: LinearOperator, iters: int = 20, generator: torch.Generator | None = None
) -> float:
    """Largest-magnitude eigenvalue of ``op`` by power iteration (``iters`` products).

    Returns the Rayleigh quotient of the last iterate, a lower bound of ``lambda_max`` for
    a symmetric positive semi-definite operator.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    v = torch.randn(op.size, generator=generator, dtype=op.dtype, device=gen_device).to(op.device)
    v = v / torch.linalg.vector_norm(v)
    estimate = 0.0
    for _ in range(iters):
        w = op.matvec(v)
        estimate = float(torch.dot(v, w))
        wnorm = torch.linalg.vector_norm(w)
        if float(wnorm) == 0.0 or not math.isfinite(float(wnorm)):
            break
        v = w / wnorm
    return estimate


class Neumann(Solver):
    """Truncated Neumann series ``x = alpha * sum_{j=0}^{k} (I - alpha A)^j b``.

    This is the inverse-Hessian approximation of Lorraine et al. (2020), "Optimizing
    Millions of Hyperparameters by Implicit Differentiation", AISTATS. With ``k = iters``
    products it sums ``k + 1`` terms; the error contracts like ``|1 - alpha lambda|^(k+1)``
    per eigen-direction, so it converges iff ``0 < alpha < 2 / lambda_max`` and ``A`` is
    positive definite.

    Args:
        iters: number of products ``k`` (the series has ``k + 1`` terms).
        alpha: step size, or ``"auto"``: ``1 / lambda_max`` with ``lambda_max`` estimated by
            ``power_iters`` power iterations (their products are counted in ``num_hvps`` and
            ``stats["power_hvps"]``; the estimate is in ``stats["lambda_max"]``).
        tol: optional early stop once the partial sum's residual ``||(I - alpha A)^j b||``
            (known for free) drops below ``tol * ||b||``.
        power_iters: power iterations for ``alpha="auto"``.
        seed: seed of the power iteration's start vector.
        divergence_factor: the solve is reported ``"diverged"`` (and ``hg.implicit`` raises)
            when the last term's norm exceeds this multiple of ``||b||``.
    """

    def __init__(
        self,
        iters: int = 20,
        alpha: float | str = 1.0,
        tol: float | None = None,
        power_iters: int = 20,
        seed: int = 0,
        divergence_factor: float = 1e3,
    ):
        self.iters = _positive_int(iters, "iters")
        self.divergence_factor = _positive_float(divergence_factor, "divergence_factor")
        if alpha != "auto":
            alpha = _positive_float(alpha, "alpha")
        self.alpha = alpha
        self.tol = None if tol is None else _positive_float(tol, "tol")
        self.power_iters = _positive_int(power_iters, "power_iters")
        self.seed = int(seed)

    def solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> Solution:
        self._check(op, b, x0)
        start = op.num_matvecs
        stats: dict[str, Any] = {}
        if self.alpha == "auto":
            g = torch.Generator().manual_seed(self.seed)
            lam = estimate_lambda_max(op, self.power_iters, g)
            stats.update(lambda_max=lam, power_hvps=op.num_matvecs - start)
            if not lam > 0:
                raise ValueError(
                    f"Neumann(alpha='auto') estimated lambda_max = {lam:.3g} <= 0: the operator "
                    "is not positive definite here. Add damping or pass alpha explicitly."
                )
            alpha = 1.0 / lam
        else:
            alpha = float(self.alpha)
        stats["alpha"] = alpha
        base = None
        if x0 is not None and bool(x0.any()):  # warm start: solve for the correction
            base = x0.to(b.dtype)
            b = b - op.matvec(base)
        bnorm = float(torch.linalg.vector_norm(b))
        v = b.clone()
        total = b.clone()
        residual, converged, status, it = None, None, "fixed_budget", 0
        for it in range(1, self.iters + 1):  # noqa: B007
            v = v - alpha * op.matvec(v)  # v_j = (I - alpha A)^j b = residual of the partial sum
            if self.tol is not None:
                vnorm = float(torch.linalg.vector_norm(v))
                if vnorm <= self.tol * bnorm:
                    residual, converged, status = vnorm, True, "converged"
                    break
            total = total + v
        else:
            if self.tol is not None:
                converged, status = False, "max_iterations"
            # v is the residual of the sum without its last term; a residual far larger than
            # b means (I - alpha A) has eigenvalues outside [-1, 1]: the series diverges.
            growth = float(torch.linalg.vector_norm(v)) / max(bnorm, 1e-300)
            stats["residual_growth"] = growth
            if not growth <= self.divergence_factor:
                converged, status = False, "diverged"
        return Solution(
            alpha * total if base is None else base + alpha * total,
            op.num_matvecs - start,
            residual,
            converged,
            status,
            it,
            stats,
        )


# --------------------------------------------------------------------------- Nystrom


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
    full_rank: bool

    def solve(self, b: Tensor, rho: float) -> Tensor:
        """``(A_nys + rho I)^{-1} b``."""
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

    Memory: the sketch ``Y = A Omega`` in float64 (``8 r n`` bytes; the Gaussian test matrix
    adds as much), the returned ``U`` (``r n`` numbers in the operator's dtype) and, while
    the products run, ``chunk_size`` rows of test vectors and results. The column sketch
    never materializes its test matrix, and the factorization works in place.
    """
    n = op.size
    r = min(rank, n)
    work = _tree.wide_dtype(op.device)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    Om: Tensor | None = None
    idx: Tensor | None = None
    if sketch == "column":
        idx = torch.randperm(n, generator=generator, device=gen_device)[:r].to(op.device)
    elif sketch == "gaussian":
        G = torch.randn(n, r, generator=generator, dtype=work, device=gen_device).to(op.device)
        Om = torch.linalg.qr(G).Q  # n x r, orthonormal columns
        del G
    else:
        raise ValueError(f"`sketch` must be 'column' or 'gaussian', got {sketch!r}.")
    # Y = A Omega (n x r, float64), filled chunk by chunk of test vectors.
    Y = torch.empty(n, r, dtype=work, device=op.device)
    step = r if chunk_size is None else max(1, int(chunk_size))
    for i in range(0, r, step):
        j = min(r, i + step)
        if idx is not None:
            block = torch.zeros(j - i, n, dtype=op.dtype, device=op.device)
            block[torch.arange(j - i, device=op.device), idx[i:j]] = 1.0
        else:
            block = Om[:, i:j].T.to(op.dtype)
        Y[:, i:j] = op.matmat(block).T
        del block
    eps = torch.finfo(work).eps
    nu = eps * float(torch.linalg.matrix_norm(Y, ord="fro")) * math.sqrt(n)
    if nu == 0.0:  # A Omega = 0
        return NystromApproximation(
            torch.zeros(n, 0, dtype=op.dtype, device=op.device),
            torch.zeros(0, dtype=op.dtype, device=op.device),
            full_rank=False,
        )

    core = Y[idx] if idx is not None else Om.T @ Y  # Omega^T Y
    core = 0.5 * (core + core.T)
    shifted = core + nu * torch.eye(r, dtype=work, device=op.device)  # Omega^T (Y + nu Omega)
    L, info = torch.linalg.cholesky_ex(shifted)
    if int(info) == 0:
        # Y_nu = Y + nu Omega; B = Y_nu L^{-T}, so B B^T = Y_nu (Omega^T Y_nu)^{-1} Y_nu^T.
        if idx is not None:
            Y[idx, torch.arange(r, device=op.device)] += nu
        else:
            Y.add_(Om, alpha=nu)
        del Om
        rows = _rows_per_block(r)
        for i in range(0, n, rows):
            Y[i : i + rows] = torch.linalg.solve_triangular(
                L.T, Y[i : i + rows], upper=True, left=False
            )
        U, s2 = _eigen_form(Y, op.dtype)
        lam = (s2 - nu).clamp_min(0.0)
    else:
        # Indefinite core: Nystrom of the PSD part, A_nys = Y M_+^+ Y^T.
        del Om
        m, V = torch.linalg.eigh(core)
        keep = m > eps * r * m.abs().max()
        Z = _right_multiply_(Y, V[:, keep] / m[keep].sqrt())
        U, lam = _eigen_form(Z, op.dtype)
    return NystromApproximation(U.contiguous(), lam.to(op.dtype), full_rank=bool(U.shape[1] >= n))


class Nystrom(Solver):
    """Nystrom approximation ``x = (A_nys + rho I)^{-1} b`` from ``rank`` products.

    Hataya & Yamada (2023), "Nystrom Method for Accurate and Scalable Implicit
    Differentiation", AISTATS. The sketch is either ``rank`` sampled Hessian columns (the
    paper's and the seed library's method) or a Gaussian sketch, which is usually more
    accurate at the same rank. The products are batched (one vmapped backward per
    ``chunk_size`` columns). The solve uses the stable eigen form (see
    :class:`NystromApproximation`), so small ``rho`` is safe in float32. With
    ``rank >= n`` and tiny ``rho`` it returns ``A^{-1} b``.

    Args:
        rank: sketch size r (products).
        rho: damping of the approximation, > 0.
        sketch: ``"column"`` or ``"gaussian"``.
        seed / generator: randomness (default: torch's global generator, like ``torch.randperm``).
        chunk_size: products evaluated together (bounds memory: r x n for the sketch).

    Cost: r products, O(r n) memory, O(r^2 n) flops.
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
        self.rank = _positive_int(rank, "rank")
        self.rho = _positive_float(rho, "rho")
        if sketch not in ("column", "gaussian"):
            raise ValueError(f"`sketch` must be 'column' or 'gaussian', got {sketch!r}.")
        self.sketch = sketch
        self.chunk_size = None if chunk_size is None else _positive_int(chunk_size, "chunk_size")
        self._generator = _make_generator(seed, generator)
        self.seed = seed

    def solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> Solution:
        self._check(op, b, x0)
        start = op.num_matvecs
        approx = nystrom_sketch(op, self.rank, self.sketch, self._generator, self.chunk_size)
        if x0 is not None and bool(x0.any()):  # warm start: approximate the correction
            x = x0.to(b.dtype) + approx.solve(b - op.matvec(x0.to(b.dtype)), self.rho)
        else:
            x = approx.solve(b, self.rho)
        return Solution(
            x,
            op.num_matvecs - start,
            None,
            None,
            "fixed_budget",
            1,
            {"eigenvalues": approx.eigenvalues.detach().cpu(), "rank": approx.U.shape[1]},
        )


class NystromPCG(Solver):
    """Conjugate gradient preconditioned by a randomized Nystrom sketch.

    Frangella, Tropp & Udell (2023), "Randomized Nystrom Preconditioning", SIAM J. Matrix
    Anal. Appl. With ``A_nys = U diag(lam) U^T`` the preconditioner is
    ``P^{-1} = (lam_r + mu) U (diag(lam) + mu I)^{-1} U^T + (I - U U^T)``, which maps the top
    r eigenvalues of ``A`` close to ``lam_r`` and leaves the rest as they are.

    The sketch costs ``rank`` products and is kept across calls: it is rebuilt every
    ``refresh_every`` calls (1: every call), which pays off while the Hessian changes
    slowly, as in an outer optimization loop. ``reset()`` forces a rebuild.

    Args:
        rank, maxiter, tol, atol: sketch size and CG settings.
        mu: preconditioner regularization (default 0: the sketch's own eigenvalues).
        sketch, seed, generator, chunk_size: as in :class:`Nystrom` (default Gaussian).
        refresh_every: calls between sketches.
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
        refresh_every: int = 1,
    ):
        self.rank = _positive_int(rank, "rank")
        self.maxiter = _positive_int(maxiter, "maxiter")
        self.tol = _positive_float(tol, "tol", allow_zero=True)
        self.atol = _positive_float(atol, "atol", allow_zero=True)
        self.mu = _positive_float(mu, "mu", allow_zero=True)
        if sketch not in ("column", "gaussian"):
            raise ValueError(f"`sketch` must be 'column' or 'gaussian', got {sketch!r}.")
        self.sketch = sketch
        self.chunk_size = None if chunk_size is None else _positive_int(chunk_size, "chunk_size")
        self.refresh_every = _positive_int(refresh_every, "refresh_every")
        self._generator = _make_generator(seed, generator)
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        """Forget the stored sketch; the next call builds a new one."""
        self._approx: NystromApproximation | None = None
        self._calls = 0

    def _preconditioner(self, approx: NystromApproximation) -> Callable[[Tensor], Tensor]:
        lam = approx.eigenvalues
        keep = lam > 1e-10 * lam.max() if lam.numel() else lam.bool()
        U, lam = approx.U[:, keep], lam[keep]
        if lam.numel() == 0:
            return lambda r: r
        scale = (lam.min() + self.mu) / (lam + self.mu)

        def apply(r: Tensor) -> Tensor:
            c = U.T @ r
            return r + U @ ((scale - 1.0) * c)

        return apply

    def solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> Solution:
        self._check(op, b, x0)
        if not bool(b.any()) and (x0 is None or not bool(x0.any())):
            return Solution(torch.zeros_like(b), 0, 0.0, True, "converged", 0, {"sketch_hvps": 0})
        start = op.num_matvecs
        stale = self._approx is None or self._approx.U.shape[0] != op.size
        if stale or self._calls % self.refresh_every == 0:
            self._approx = nystrom_sketch(
                op, self.rank, self.sketch, self._generator, self.chunk_size
            )
            self._calls = 0
        self._calls += 1
        approx = self._approx
        if approx.U.dtype != op.dtype or approx.U.device != op.device:
            approx = NystromApproximation(
                approx.U.to(op.device, op.dtype),
                approx.eigenvalues.to(op.device, op.dtype),
                approx.full_rank,
            )
        sketch_hvps = op.num_matvecs - start
        sol = _cg(op, b, x0, self.maxiter, self.tol, self.atol, self._preconditioner(approx))
        sol.num_hvps += sketch_hvps
        sol.stats["sketch_hvps"] = sketch_hvps
        return sol


# --------------------------------------------------------------------------- Identity


class Identity(Solver):
    """``A^{-1} ~ scale * I``: no products.

    With ``scale`` equal to the inner learning rate this is the one-step look-ahead
    hypergradient (T1-T2; Luketina et al., 2016, "Scalable Gradient-Based Tuning of
    Continuous Regularization Hyperparameters", ICML).
    """

    def __init__(self, scale: float = 1.0):
        self.scale = _positive_float(scale, "scale")

    def solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> Solution:
        self._check(op, b, x0)
        return Solution(self.scale * b, 0, None, None, "fixed_budget", 0)


# --------------------------------------------------------------------------- FixedPoint


class FixedPoint(Solver):
    """Richardson / fixed-point iteration ``x <- x + omega (b - A x)``.

    The natural solver for ``theta*`` defined as a fixed point ``theta = T(theta, phi)``
    (``hg.implicit_fixed_point``): there ``A = I - J^T`` and with ``omega = 1`` the iteration
    is ``x <- b + J^T x``, the adjoint of the forward iteration, which converges whenever
    ``T`` is a contraction. For an argmin, ``omega`` plays the role of a step size
    (converges iff ``0 < omega < 2 / lambda_max``). The residual is known at every step, so
    it stops at ``||b - A x|| <= tol * ||b||`` and reports divergence.

    Args:
        maxiter: maximum products.
        tol: relative residual tolerance.
        omega: relaxation (step size).
    """

    def __init__(self, maxiter: int = 100, tol: float = 1e-6, omega: float = 1.0):
        self.maxiter = _positive_int(maxiter, "maxiter")
        self.tol = _positive_float(tol, "tol", allow_zero=True)
        self.omega = _positive_float(omega, "omega")

    def solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> Solution:
        self._check(op, b, x0)
        start = op.num_matvecs
        bnorm = float(torch.linalg.vector_norm(b))
        if x0 is None:
            x, r = torch.zeros_like(b), b.clone()
        else:
            x = x0.to(b.dtype).clone()
            r = b - op.matvec(x)
        rnorm = float(torch.linalg.vector_norm(r))
        scale = max(rnorm, bnorm, 1e-300)  # divergence is growth past the starting residual
        status, it = "max_iterations", 0
        for it in range(1, self.maxiter + 1):  # noqa: B007
            if rnorm <= self.tol * bnorm:
                status = "converged"
                it -= 1
                break
            x = x + self.omega * r
            r = b - op.matvec(x)
            rnorm = float(torch.linalg.vector_norm(r))
            if not math.isfinite(rnorm) or rnorm > 1e8 * scale:
                status = "diverged"
                break
        else:
            if rnorm <= self.tol * bnorm:
                status = "converged"
        return Solution(x, op.num_matvecs - start, rnorm, status == "converged", status, it, {})
