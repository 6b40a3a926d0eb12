"""The truncated Neumann series, and the power iteration that picks its step."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from .. import _vocab
from .._vocab import NonFiniteHypergradientError, Status
from ..operators import LinearOperator
from .base import PRODUCT, RandomizedSolver, Solution, require_finite_product, safe_norm
from .spectrum import estimate_lambda_max, lanczos_extremes

__all__ = ["Neumann"]


class Neumann(RandomizedSolver):
    """Truncated Neumann series ``x = alpha * sum_{j=0}^{k} (I - alpha A)^j b``.

    This is the inverse-Hessian approximation of Lorraine et al. (2020), "Optimizing
    Millions of Hyperparameters by Implicit Differentiation", AISTATS. With ``k = maxiter``
    products it sums ``k + 1`` terms; the error contracts like ``|1 - alpha lambda|^(k+1)``
    per eigen-direction, so it converges iff ``0 < alpha < 2 / lambda_max`` and ``A`` is
    positive definite.

    Args:
        maxiter: number of products ``k`` (the series has ``k + 1`` terms). ``iters=`` is
            the deprecated name.
        alpha: step size, or ``"auto"``: ``1 / lambda_max`` with ``lambda_max`` estimated by
            ``power_iters`` Lanczos steps for a symmetric operator (power iterations for a
            non-symmetric one); their products are counted in ``num_hvps`` and
            ``stats["power_hvps"]``, the estimate is in ``stats["lambda_max"]``.
        tol: optional early stop once the partial sum's residual ``||(I - alpha A)^j b||``
            (known for free) drops below ``tol * ||b||``.
        power_iters: products of the ``lambda_max`` estimate for ``alpha="auto"``.
        seed / generator: randomness of the power iteration's start vector (see
            :class:`~hypergradient.solvers.base.RandomizedSolver`); only ``alpha="auto"``
            draws.
        divergence_factor: the solve is reported ``"diverged"`` (and ``hg.implicit`` raises)
            when the last term's norm exceeds this multiple of ``||b||``.

    Cost: ``maxiter`` products (+ ``power_iters``), O(n) memory.
    """

    def __init__(
        self,
        maxiter: int | None = None,
        alpha: float | str = 1.0,
        tol: float | None = None,
        power_iters: int = 20,
        seed: int | None = None,
        divergence_factor: float = 1e3,
        *,
        generator: torch.Generator | None = None,
        iters: int | None = None,
    ):
        if iters is not None:
            if maxiter is not None:
                raise ValueError("Pass `maxiter` only (`iters` is its deprecated name).")
            warnings.warn(
                "Neumann(iters=...) is deprecated; use Neumann(maxiter=...).",
                DeprecationWarning,
                stacklevel=2,
            )
            self.maxiter = _vocab.as_int(iters, "iters", min=1)
        else:
            self.maxiter = _vocab.as_int(20 if maxiter is None else maxiter, "maxiter", min=1)
        if isinstance(alpha, str):
            alpha = _vocab.as_choice(alpha, "alpha", ("auto",))
        else:
            alpha = _vocab.as_float(
                alpha, "alpha", min=0.0, open_min=True, hint=" Or pass alpha='auto'."
            )
        self.alpha: float | str = alpha
        self.tol = None if tol is None else _vocab.as_float(tol, "tol", min=0.0, open_min=True)
        self.power_iters = _vocab.as_int(power_iters, "power_iters", min=1)
        self.divergence_factor = _vocab.as_float(
            divergence_factor, "divergence_factor", min=0.0, open_min=True
        )
        self.init_generator(seed, generator, needed=alpha == "auto")

    @property
    def iters(self) -> int:
        """Deprecated name of :attr:`maxiter`."""
        warnings.warn(
            "Neumann.iters is deprecated; use Neumann.maxiter.", DeprecationWarning, stacklevel=2
        )
        return self.maxiter

    def config(self) -> dict[str, Any]:
        return {
            "maxiter": self.maxiter,
            "alpha": self.alpha,
            "tol": self.tol,
            "power_iters": self.power_iters,
            "seed": self.seed,
            "divergence_factor": self.divergence_factor,
        }

    def _step(self, op: LinearOperator, stats: dict[str, Any]) -> float:
        if self.alpha != "auto":
            return float(self.alpha)
        start = op.num_matvecs
        if op.symmetric:
            spectrum = lanczos_extremes(op, self.power_iters, self._rng, power_start=True)
            lam = spectrum.lambda_max
            stats["lambda_min"] = spectrum.lambda_min
        else:
            lam = estimate_lambda_max(op, self.power_iters, self._rng)
        stats.update(lambda_max=lam, power_hvps=op.num_matvecs - start)
        if not lam > 0:
            raise ValueError(
                f"Neumann(alpha='auto') estimated lambda_max = {lam:.3g} <= 0: the operator "
                "is not positive definite here. Add damping or pass alpha explicitly."
            )
        return 1.0 / lam

    def solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> Solution:
        self.validate(op, b, x0)
        start = op.num_matvecs
        stats: dict[str, Any] = {}
        alpha = self._step(op, stats)
        stats["alpha"] = alpha
        base = None
        if x0 is not None and bool(x0.any()):  # warm start: solve for the correction
            base = x0.to(b.dtype)
            Ax = op.matvec(base)
            require_finite_product(Ax)
            b = b - Ax
        bnorm = safe_norm(b)
        v = b.clone()
        total = b.clone()
        residual, converged, status, it = None, None, Status.FIXED_BUDGET, 0
        for it in range(1, self.maxiter + 1):  # noqa: B007
            w = op.matvec(v)
            require_finite_product(w)
            v = v - alpha * w  # v_j = (I - alpha A)^j b = residual of the partial sum
            if self.tol is not None:
                vnorm = safe_norm(v)
                if vnorm <= self.tol * bnorm:
                    residual, converged, status = vnorm, True, Status.CONVERGED
                    break
            total = total + v
        else:
            if self.tol is not None:
                converged, status = False, Status.MAX_ITERATIONS
            # v is the residual of the sum without its last term; a residual far larger than
            # b means (I - alpha A) has eigenvalues outside [-1, 1]: the series diverges.
            vnorm = safe_norm(v)
            growth = vnorm / max(bnorm, 1e-300)
            stats["residual_growth"] = growth
            if not growth <= self.divergence_factor:
                converged, status = False, Status.DIVERGED
        x = alpha * total if base is None else base + alpha * total
        if status != Status.DIVERGED and not _vocab.is_finite(x):
            raise NonFiniteHypergradientError(
                f"Neumann's partial sum is not finite ({PRODUCT} or the sum overflowed); "
                "check inner_loss at `params`, lower alpha or add damping.",
                "the solution",
            )
        return Solution(x, op.num_matvecs - start, residual, converged, status, it, stats)
