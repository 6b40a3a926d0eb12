"""A damping chosen from a curvature estimate: ``damping="auto"``."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _vocab
from ..operators import LinearOperator
from .spectrum import lanczos_extremes

__all__ = ["DampingEstimate", "auto_damping"]


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
