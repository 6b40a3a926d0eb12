"""What a CG run reports when its tolerance is out of reach of the arithmetic (and the check
of a user's preconditioner).

The drift of CG's updated residual from the true ``b - A x`` is about
``eps (||b|| + ||A|| max ||x_k||)`` (Greenbaum, 1997), ``eps`` that of the products: a
bfloat16 model's Hessian products round at 3.9e-3 even though the iterates are float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import _vocab
from .._vocab import Status
from ..operators import LinearOperator
from .base import require_finite_product, safe_norm

__all__ = [
    "attainable_message",
    "blame_preconditioner",
    "checked_preconditioner",
    "product_eps",
    "recheck_exit",
    "relative_tol",
    "restore_start",
    "unit_rhs",
]


def relative_tol(tol: Any) -> float:
    """``tol`` checked as a relative residual tolerance, in ``[0, 1)``: ``||b - A x|| <= tol
    ||b||`` with ``tol >= 1`` holds at ``x = 0``, a solve of no product whose hypergradient
    is the direct term alone (reported "converged")."""
    v = _vocab.as_float(tol, "tol", min=0.0)
    if v >= 1.0:
        raise ValueError(
            f"`tol` must be a number >= 0 and < 1, got {v:g}: a relative residual tolerance of "
            "1 or more is met by x = 0 with no product; use e.g. 1e-6."
        )
    return v


def checked_preconditioner(pre: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``pre`` whose result must be a tensor shaped like ``r`` (a floating one in another
    dtype is cast to ``r``'s: a Jacobi diagonal kept in float64 for a float32 model raised
    torch's "dot : expected both vectors to have same dtype")."""

    def apply(r: Tensor) -> Tensor:
        z = pre(r)
        if isinstance(z, Tensor) and z.shape == r.shape and z.is_floating_point():
            return z if z.dtype == r.dtype and z.device == r.device else z.to(r)
        got = f"shape {tuple(z.shape)}, {z.dtype}" if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(
            f"CG's `preconditioner` must map r (shape {tuple(r.shape)}, {r.dtype}) to M^-1 r "
            f"of the same shape, a floating-point tensor; it returned {got}."
        )

    apply.user = True  # type: ignore[attr-defined]  # (blame_preconditioner: a user's)
    return apply


def blame_preconditioner(run: Any) -> None:
    """At a CG exit on ``p^T A p`` not positive and finite: raise ValueError if a user's
    preconditioner made the direction ``p`` NaN/Inf or zero (it is not symmetric positive
    definite), rather than report the Hessian's curvature or products."""
    if not getattr(run.precondition, "user", False):
        return
    finite = _vocab.is_finite(run.p)
    if finite and bool(run.p.any()):
        return
    raise ValueError(
        "CG's `preconditioner` returned M^-1 r "
        + ("with NaN or Inf" if not finite else "= 0 for a non-zero r")
        + ": it must be a symmetric positive-definite map r -> M^-1 r (e.g. r / d for a "
        "positive diagonal d); or pass preconditioner=None."
    )


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
        if getattr(run.op, "differenced", False):
            run.stats["finite_difference_products"] = True
            return (
                f"the updated residual met the tolerance but the true one was "
                f"{run.stats['attainable_residual']:.3g} ({run.rnorm:.3g} relative): the "
                "Hessian products are central differences of gradients (first-order "
                f"products), accurate to about {run.product_eps:.3g} relative, which limits "
                "the attainable residual to about that times ||A|| ||x||. Loosen tol to that "
                "level, or use double-backward products (hvp='double') or float64 parameters "
                "for a tighter solve"
            )
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
        f"rounding level of {run.r.dtype} for this system (about eps ||A|| ||x||); "
        "loosen tol, add damping, use a preconditioner (hg.NystromPCG) or float64"
    )


def recheck_exit(run: Any) -> None:
    """Never return an iterate worse than the start, nor report a residual that is not its
    own, after a ``maxiter`` or negative-curvature exit whose updated residuals may have
    drifted (Greenbaum's bound ``eps (1 + ||A|| max ||y_k||)`` above 1% of the start's
    residual or 10% of the reported one: float32 at ``tol=1e-6`` reported 1e-5 for a true
    0.13).

    On a singular system with ``b`` partly outside the range of ``A``, CG's steps along
    the null space blow up (``p^T A p`` at rounding level) while its updated residual stays
    small: ``hg.CG(maxiter=50)`` returned ``||x|| ~ 3e32``. Where the bound exceeds the
    start's residual, the iterates' products round by more than ``b`` itself and no
    residual of theirs means anything: the start is returned (``stats["unreliable"]``).
    Below that, the true residuals of the last and best iterates are read (one product
    each) and an iterate worse than the start is forgotten.
    """
    exits = (Status.MAX_ITERATIONS, Status.NEGATIVE_CURVATURE)
    if run.status not in exits or not run.iterations:
        return
    drift = run.product_eps * (1.0 + run.lam_hat * run.xmax)
    if drift <= 0.01 * run.start_norm and drift <= 0.1 * min(run.rnorm, run.best_norm):
        return  # the updated residuals are the true ones to 10%
    if drift >= run.start_norm:
        run.stats["unreliable"] = True
        run.rnorm, run.best_norm = math.inf, math.inf
        restore_start(run)
        return

    def true_norm(y: Any) -> float:
        w = run.op.matvec(y)
        require_finite_product(w)
        run.stats["verify_hvps"] = run.stats.get("verify_hvps", 0) + 1
        return safe_norm(unit_rhs(run) - w)

    last_is_best = run.best is run.y
    if run.checked is not run.y:  # (a check that stopped the run has read it already)
        run.rnorm = true_norm(run.y)
    if last_is_best:
        run.best_norm = run.rnorm
    elif run.best is not None:
        run.best_norm = true_norm(run.best)
    # a residual read within the products' rounding (``drift``) of the start's does not
    # prove the iterate better: another rounding of the same product (the caller's
    # ``A @ x``) gave 1.64 times ``||b||`` where this one read 1.0 (rank-1 A, ``||x||`` 7e18)
    if run.rnorm + drift > run.start_norm:
        run.rnorm = math.inf
    if run.best_norm + drift > run.start_norm:
        run.best_norm = math.inf
    restore_start(run)


def restore_start(run: Any) -> None:
    """Make the start the best iterate again if the best one's residual is worse."""
    if run.best_norm > run.start_norm:
        run.best, run.best_norm, run.best_ynorm = None, run.start_norm, run.start_ynorm


def next_iterate(run: Any) -> Tensor:
    """The buffer a CG step writes its iterate ``y`` to: one of the run's (at most three)
    that holds neither the current iterate nor the kept best one, so that ``y`` is never
    modified in place and the best iterate stays a reference. A new 0.8 MB tensor at
    every step (2e5 float32 entries) cost 0.1-0.6 ms, mostly page faults; the buffer a
    verified iterate (``run.checked``) was in forgets it."""
    for slot in run.slots:
        if slot is not run.y and slot is not run.best:
            break
    else:
        slot = torch.empty_like(run.r)
        run.slots.append(slot)
    if run.checked is slot:
        run.checked = None
    return slot


def unit_rhs(run: Any) -> Tensor:
    """``b / ||b||``, the right-hand side of a CG run's normalized system, made where it is
    needed (the start's residual, a check's true residual) rather than kept through the
    iterations: the same vector each time (two steps, so that neither factor overflows), and
    one vector less held while the products run (at 2e5 float32 entries, 0.8 MB whose
    pages a hyper-step otherwise faults in again)."""
    return torch.div(run.rhs, run.top).div_(run.bnorm / run.top)
