"""Extreme eigenvalues of an operator from a few products: power iteration and Lanczos."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import _vocab
from ..operators import LinearOperator
from .base import require_finite_product, safe_norm

__all__ = ["SpectrumEstimate", "estimate_lambda_max", "lanczos_extremes", "lanczos_safety"]


def check_operator(
    op: object, fn: str, generator: object = None, *, symmetric: bool = False
) -> LinearOperator:
    """``op`` as a :class:`LinearOperator` (symmetric if asked), ``generator`` a generator.

    Raises:
        ArgumentTypeError: ``op`` is not a LinearOperator, ``generator`` not a generator.
        ValueError: ``symmetric`` and ``op.symmetric`` is False.
    """
    if not isinstance(op, LinearOperator):
        raise _vocab.ArgumentTypeError(
            f"{fn}: `op` must be a LinearOperator (e.g. hg.MatrixOperator(A) or "
            f"hg.HessianOperator(...)), got {type(op).__name__}."
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise _vocab.ArgumentTypeError(
            f"{fn}: `generator` must be a torch.Generator or None, got "
            f"{type(generator).__name__}; for a seed use torch.Generator().manual_seed(seed)."
        )
    if symmetric and not op.symmetric:
        raise ValueError(
            f"{fn} needs a symmetric operator (a Hessian), and this one is not (a fixed-point "
            "map's I - J^T): its numbers would be meaningless."
        )
    return op


def _start_vector(op: LinearOperator, generator: torch.Generator | None) -> torch.Tensor:
    """A Gaussian unit vector drawn on the generator's device (the same on every device)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    v = torch.randn(op.size, generator=generator, dtype=op.dtype, device=gen_device).to(op.device)
    return v / torch.linalg.vector_norm(v)


def estimate_lambda_max(
    op: LinearOperator, iters: int = 20, generator: torch.Generator | None = None
) -> float:
    """Largest-magnitude eigenvalue of ``op`` by power iteration (``iters`` products).

    Returns the Rayleigh quotient of the last iterate, a lower bound of ``lambda_max`` for
    a symmetric positive semi-definite operator. The start vector is Gaussian, drawn from
    ``generator`` (torch's global generator if None) on the generator's device. Power
    iteration (von Mises & Pollaczek-Geiringer, 1929): the error of the estimate shrinks
    like ``(lambda_2 / lambda_1)^(2 k)`` for a symmetric operator; :func:`lanczos_extremes`
    converges much faster for the same products.

    Cost: at most ``iters`` products (fewer if a product is 0), two vectors of memory.

    Raises:
        ArgumentTypeError: ``op`` is not a LinearOperator or ``generator`` not a generator.
        NonFiniteHypergradientError: a product holds NaN or Inf.
    """
    check_operator(op, "estimate_lambda_max", generator)
    iters = _vocab.as_int(iters, "iters", min=1)
    v = _start_vector(op, generator)
    estimate = 0.0
    for _ in range(iters):
        w = op.matvec(v)
        require_finite_product(w)
        estimate = float(torch.dot(v, w))
        wnorm = safe_norm(w)
        if wnorm == 0.0:
            break
        v = w / wnorm
    return estimate


class SpectrumEstimate(NamedTuple):
    """Extreme Ritz values of a symmetric operator (Lanczos).

    ``lambda_max <= `` the largest eigenvalue and ``lambda_min >= `` the smallest (Cauchy
    interlacing; up to rounding), both converging fast from inside the spectrum.
    """

    lambda_max: float
    lambda_min: float
    num_hvps: int


def lanczos_extremes(
    op: LinearOperator,
    maxiter: int = 20,
    generator: torch.Generator | None = None,
    *,
    power_start: bool = False,
) -> SpectrumEstimate:
    """The extreme eigenvalues of a symmetric ``op`` by ``maxiter`` Lanczos steps.

    The three-term Lanczos recurrence (Lanczos, 1950) from a Gaussian start builds the
    tridiagonal ``T_k = V_k^T A V_k``; its extreme eigenvalues (Ritz values) bound those of
    ``A`` from inside and converge much faster than power iteration: for a random start
    the relative error of ``lambda_max`` exceeds ``eps`` with probability at most
    ``1.648 sqrt(n) exp(-sqrt(eps) (2k - 1))`` after ``k`` steps, against
    ``0.824 sqrt(n) (1 - eps)^(k - 1/2)`` for power iteration (Kuczynski & Wozniakowski,
    1992, "Estimating the largest eigenvalue by the power and Lanczos algorithms with a
    random start", SIAM J. Matrix Anal. Appl.). No reorthogonalization: the extreme Ritz
    values are reliable without it (Paige, 1976); the recurrence stops early when it finds
    an invariant subspace (then the Ritz values are eigenvalues).

    With ``power_start`` the recurrence starts from ``A v0 / ||A v0||`` (one power step,
    counted in ``maxiter``): the start leans toward the top of the spectrum, and under a
    process group whose operator averages products over ranks it is the same vector on
    every rank even if the ranks drew different ``v0``.

    Cost: at most ``min(maxiter, n)`` products, three vectors of memory.

    Raises:
        ArgumentTypeError: ``op`` is not a LinearOperator or ``generator`` not a generator.
        ValueError: ``op`` is not symmetric.
        NonFiniteHypergradientError: a product holds NaN or Inf.
    """
    check_operator(op, "lanczos_extremes", generator, symmetric=True)
    power_start = _vocab.as_bool(power_start, "power_start")
    # n steps span the whole space: more would only repeat eigenvalues (ghosts)
    maxiter = min(_vocab.as_int(maxiter, "maxiter", min=1), max(op.size, 1))
    start = op.num_matvecs
    v = _start_vector(op, generator)
    if power_start and maxiter > 1:
        w = op.matvec(v)
        require_finite_product(w)
        wnorm = safe_norm(w)
        if wnorm == 0.0:  # A v0 = 0: no information beyond lambda = 0 along v0
            return SpectrumEstimate(0.0, 0.0, op.num_matvecs - start)
        v, maxiter = w / wnorm, maxiter - 1
    v_prev = torch.zeros_like(v)
    alphas: list[float] = []
    betas: list[float] = []
    beta, scale = 0.0, 0.0
    eps = torch.finfo(op.dtype).eps
    for _ in range(maxiter):
        w = op.matvec(v)
        require_finite_product(w)
        w = w - beta * v_prev
        a = float(torch.dot(w, v))
        w = w - a * v
        alphas.append(a)
        beta = safe_norm(w)
        scale = max(scale, abs(a), beta)
        if beta <= 10 * eps * scale:  # invariant subspace (or the zero operator)
            break
        betas.append(beta)
        v_prev, v = v, w / beta
    k = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    ritz = torch.linalg.eigvalsh(T)
    return SpectrumEstimate(float(ritz[-1]), float(ritz[0]), op.num_matvecs - start)


def lanczos_safety(n: int, steps: int, delta: float = 1e-3) -> float:
    """Safety factor ``s`` such that ``alpha = 1 / (s lambda_est)`` is below ``2 / lambda_max``.

    For a PSD operator and a random start, Kuczynski & Wozniakowski (1992) bound the chance
    that ``steps`` Lanczos steps underestimate ``lambda_max`` by a relative ``eps`` or more:
    ``P <= 1.648 sqrt(n) exp(-sqrt(eps) (2 steps - 1))``. Setting it to ``delta`` gives
    ``eps* = (ln(1.648 sqrt(n) / delta) / (2 steps - 1))^2``; with probability ``1 - delta``,
    ``lambda_est >= (1 - eps*) lambda_max``, so ``s = 1 / (2 (1 - eps*))`` keeps
    ``alpha lambda_max < 2``. ``s`` is at least 1 (the step ``1 / lambda_est`` is the
    fastest for the top of the spectrum); 20 steps give ``s = 1`` up to ``n ~ 1e17``. With
    too few steps for the bound (``eps* >= 0.9``) ``s = 5``, and only the divergence check
    guards the series.
    """
    if steps < 1:
        return 5.0
    root = math.log(1.648 * math.sqrt(max(n, 1)) / delta) / (2 * steps - 1)
    eps = root * root
    if eps >= 0.9:
        return 5.0
    return max(1.0, 1.0 / (2.0 * (1.0 - eps)))


def growth_is_curvature(op: LinearOperator, alpha: float, steps: int, stats: dict) -> bool:
    """Whether a Neumann series of fixed step ``alpha`` on a symmetric ``op``, whose residual
    grew along a direction of Rayleigh quotient ``>= 0``, grew from negative curvature
    (not from a step too large): ``steps`` Lanczos products (from a fixed start: the global
    generator is untouched; ``stats["growth_hvps"]``) find a Ritz value below rounding, or a
    top one for which ``alpha lambda_max < 2`` (with probability ``1 - 1e-3``, as
    :func:`lanczos_safety`), where a positive semi-definite ``op`` cannot grow it. A
    Rayleigh quotient mixes both signs: a network's (eigenvalues in [-3.63, 3.46], alpha
    0.05, far below 2 / 3.46) read +4.3e-4 along the growing residual, and its series was
    called diverged, "lower the step size"."""
    spectrum = lanczos_extremes(op, steps, torch.Generator().manual_seed(0), power_start=True)
    stats["growth_hvps"] = spectrum.num_hvps
    if negative_beyond_rounding(op, spectrum):
        return True
    safety = 0.5 if spectrum.num_hvps < steps else lanczos_safety(op.size, steps - 1)
    return alpha * safety * spectrum.lambda_max < 1.0  # (lambda_max <= 2 s lambda_est)


def negative_beyond_rounding(op: LinearOperator, spectrum: SpectrumEstimate) -> bool:
    """Whether the smallest Ritz value is a negative eigenvalue, not rounding (Ritz values
    lie inside the spectrum; the products' rounding: a bfloat16 model's PSD Hessian read
    -3e-4 lambda_max)."""
    eps = max(100 * torch.finfo(op.dtype).eps, 4 * op.product_eps)
    return spectrum.lambda_min < -eps * abs(spectrum.lambda_max)
