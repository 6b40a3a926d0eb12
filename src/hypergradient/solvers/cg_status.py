"""What a CG run reports when its tolerance is out of reach of the arithmetic.

The drift of CG's updated residual from the true ``b - A x`` is about
``eps (||b|| + ||A|| max ||x_k||)`` (Greenbaum, 1997), ``eps`` that of the products: a
bfloat16 model's Hessian products round at 3.9e-3 even though the iterates are float32.
"""

from __future__ import annotations

from typing import Any

from ..operators import LinearOperator

__all__ = ["attainable_message", "product_eps"]


def product_eps(op: LinearOperator) -> float:
    """The epsilon of the operator's products (0 when it does not say)."""
    eps = getattr(op, "product_eps", 0.0)
    return eps if isinstance(eps, float) else 0.0


def attainable_message(run: Any) -> str:
    """Why a run that met its tolerance on the updated residual stopped at maxiter."""
    if "attainable_residual" not in run.stats:
        return ""
    if run.product_eps > run.eps:  # half-precision products
        run.stats["precision_limited"] = True
        run.stats["product_eps"] = run.product_eps
        return (
            f"the updated residual met the tolerance but the true one was "
            f"{run.stats['attainable_residual']:.3g} ({run.rnorm:.3g} relative): the "
            f"Hessian products round at eps = {run.product_eps:.3g} (low-precision "
            "parameters or autocast), "
            "which limits the attainable residual to about eps ||A|| ||x||; the answer is "
            "as accurate as the products allow. Loosen tol to that level, or compute the "
            "products in float32 (a float32 copy of the model) for a tighter solve"
        )
    return (
        f"the updated residual met the tolerance but the true one was "
        f"{run.stats['attainable_residual']:.3g}: the tolerance is near or below the "
        f"rounding level of {run.b.dtype} for this system (about eps ||A|| ||x||); "
        "loosen tol, add damping, use a preconditioner (hg.NystromPCG) or float64"
    )
