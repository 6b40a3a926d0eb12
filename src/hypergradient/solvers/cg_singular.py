"""CG on a singular symmetric system: where a search direction is a null direction of ``A``.

A Hessian is singular along the parameters the inner loss does not see (a head only the
validation loss reads, frozen features) and along exact symmetries of an over-parametrized
model; the outer gradient ``b`` often has a part ``b_N`` there, outside the range of ``A``.
Then ``A x = b`` has no solution, and CG on it does not converge: its residuals keep
``b_N``, its step lengths ``r^T z / p^T A p`` count ``||b_N||^2`` and overshoot, and its
directions gather ``b_N`` until ``p^T A p`` falls to rounding level (an ``n = 4`` system
with a zero row: residual 265 times ``||b||`` at the third step, ``||x|| ~ 1e32`` at the
fourth; on larger ones this comes at about the iterations CG needs on the consistent
system). Such a stop used to return the start (``x = 0``), the hypergradient without its
implicit part.

The least-squares answer is well defined: ``x = A^+ b`` (what :class:`~hypergradient.Exact`
returns), whose hypergradient is the true one whenever the mixed derivatives do not see
the null space (a parameter the inner loss ignores has no mixed derivative; an exact
symmetry of the inner loss for every hyperparameter neither). In exact arithmetic every
Krylov vector of CG (and of a preconditioner that keeps the null space, as the Nystrom and
the recycled ones nearly do) has its null part along ``b_N``, so the direction ``p`` CG
stops at is ``b_N`` up to ``sqrt(eps kappa)``: :func:`null_direction` recognizes it
(``p^T A p`` and ``||A p||`` at rounding level, ``||A p|| <= NULL_ROUNDING sqrt(eps)
lambda ||p||``: a negative curvature stays one), and :func:`deflated_solve` solves again
from the start with ``P = I - W W^T`` (``W`` the null directions met, orthonormal): CG on
``A x = P b``, from ``P x0``, preconditioned by ``P M^{-1} P`` (deflated CG: every iterate
stays off ``W``, the operator is ``P A P``). The answer is the least-squares solution with
no part along ``W``: from ``x0 = 0``, the minimum-norm one; a warm start's null part off
``W`` is kept (as on a consistent singular system). Its ``||A (b - A x)||`` is read: the
directions deflated are null only to ``sqrt(eps kappa)``, and a converged claim needs it
within the tolerance.

Limits. The test needs a scale for ``||A||``: the largest ``||A p|| / ||p||`` of the run,
or a hint (NystromPCG's sketch and RecycledCG's space pass their largest Ritz value; a
restart the scale its null check found). When ``b`` is mostly off
the range (70 to 97 % of it in the tests) every direction of plain CG is mostly null, its
scale stays far under ``||A||`` and its iterates blow up before a direction reads as null;
such a run (:func:`blown_up`) has its last direction checked (:func:`probe_null`),
but may still end as before, ``max_iterations`` or ``negative_curvature`` with the start or
best iterate (and their warnings). NystromPCG finds the answer there. Costs: the first
run's products are lost (it may run to ``maxiter``), the restarts share ``maxiter`` more,
plus up to two products for a null check's scale and two for the answer's residuals.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._vocab import Status
from ..operators import LinearOperator, WrappingOperator
from .base import Solution, require_finite_product, safe_norm
from .cg_status import blame_preconditioner

__all__ = ["MAX_DEFLATIONS", "NULL_ROUNDING", "curvature_status", "deflated_solve"]
__all__ += ["blown_up", "null_direction", "probe_null"]

#: A direction ``p`` with ``|p^T A p| <= eps lambda ||p||^2`` is a null direction of ``A``
#: when also ``||A p|| <= NULL_ROUNDING sqrt(eps) lambda ||p||`` (``eps`` the products',
#: ``lambda`` the largest ``||A p|| / ||p||`` seen): for a positive semi-definite ``A``
#: ``||A p||^2 <= lambda_max p^T A p`` makes it ``sqrt(eps) lambda``, where an indefinite
#: one whose curvature cancels along ``p`` keeps ``||A p||`` at its eigenvalues' size.
NULL_ROUNDING = 10.0

#: Null directions deflated before a solve gives up (``negative_curvature``, as before):
#: one is enough in exact arithmetic for CG; a preconditioner that mixes the null space
#: with the range needs more.
MAX_DEFLATIONS = 4


def null_direction(run: Any, Ap: Tensor, pap: float, pnorm: float, apnorm: float) -> bool:
    """Stop a run whose curvature ``p^T A p / ||p||^2`` is below the products' rounding
    (``eps lambda_max``, ``lambda_max`` the largest seen): ``A`` is numerically singular
    along ``p``, and the step just taken (``||x||`` up to 1e15 on singular systems) is
    dropped: the status is negative curvature, whose answer is the best iterate; ``p`` is
    kept as a null direction to deflate (``run.null``) if it is one (:func:`_mark_null`)."""
    run.stats["curvature"] = pap / (pnorm * pnorm)
    run.status = Status.NEGATIVE_CURVATURE
    _mark_null(run, Ap, pap, pnorm, apnorm)
    return True


def curvature_status(run: Any, Ap: Tensor, pap: float) -> Status:
    """The status of a step whose ``p^T A p`` is not positive and finite (a null direction,
    :func:`_mark_null`, is kept in ``run.null``)."""
    blame_preconditioner(run)  # a user's preconditioner's NaN or zero: named
    if not math.isfinite(pap):  # a non-finite product, or an overflow
        require_finite_product(Ap)
        return Status.DIVERGED
    # A is not positive definite along p: a CG step here would move uphill.
    pnorm = safe_norm(run.p)
    run.stats["curvature"] = pap / (pnorm * pnorm) if pnorm > 0 else 0.0
    _mark_null(run, Ap, pap, pnorm, safe_norm(Ap))
    return Status.NEGATIVE_CURVATURE


def blown_up(run: Any) -> bool:
    """Whether a run stopped (``maxiter`` or negative curvature) with iterates past 1 % of
    what its products resolve: ``eps (1 + lambda max ||y||)`` above 1 % of the start's
    residual, where :func:`~.cg_status.recheck_exit` reads true residuals (a nonsingular
    system's ``||y|| <= 1 / lambda_min`` needs condition ``1 / (100 eps)`` for it)."""
    if run.status not in (Status.MAX_ITERATIONS, Status.NEGATIVE_CURVATURE):
        return False
    return bool(run.product_eps * (1.0 + run.lam_hat * run.xmax) > 0.01 * run.start_norm)


def probe_null(run: Any) -> None:
    """After a run that :func:`blown_up` without meeting a curvature at rounding level
    (every direction mostly null, ``||A p|| / ||p||`` far under ``||A||``: ``b`` 30 times
    off the range ran 100 iterations so; a Nystrom-preconditioned one to ``||x|| ~ 2e15``
    at 3 unknowns): its last direction, checked with one product (up to three with
    :func:`_mark_null`'s), is kept in ``run.null`` if it is null."""
    Ap = run.op.matvec(run.p)
    require_finite_product(Ap)
    pap = float(torch.dot(run.p, Ap))
    _mark_null(run, Ap, pap, safe_norm(run.p), safe_norm(Ap))


def _scale(run: Any) -> float:
    """``lambda``: the largest ``||A p|| / ||p||`` of the run, or the operator's
    :attr:`~hypergradient.HessianOperator.scale` (all its products) when larger."""
    scale = getattr(run.op, "scale", None)
    return max(run.lam_hat, run.hint, scale if isinstance(scale, float) else 0.0)


def _mark_null(run: Any, Ap: Tensor, pap: float, pnorm: float, apnorm: float) -> None:
    """``run.null = p / ||p||`` if ``p`` is a null direction: ``|p^T A p| <= eps lambda
    ||p||^2`` and ``||A p|| <= NULL_ROUNDING sqrt(eps) lambda ||p||``.

    ``lambda`` is the largest ``||A p|| / ||p||`` seen, which underestimates ``||A||`` when
    every direction is mostly null (``b`` 100 times outside the range: 400 times under); a
    direction whose ``|p^T A p|`` is within ``sqrt(eps) lambda ||p||^2`` but fails is checked
    again with ``||A q||``, ``q = A p / ||A p||`` (one product; ``A p`` lies in the range),
    then with a random vector's (one more). A negative curvature above that costs nothing
    more."""
    eps, scale = run.product_eps, _scale(run)

    def null(scale: float) -> bool:
        flat = abs(pap) <= eps * scale * pnorm * pnorm
        return flat and apnorm <= NULL_ROUNDING * math.sqrt(eps) * scale * pnorm

    if not pnorm > 0:
        return
    for probe in (Ap, None):  # A p / ||A p||, then a random unit vector
        if null(scale) or abs(pap) > math.sqrt(eps) * scale * pnorm * pnorm:
            break
        scale = max(scale, _norm_ratio(run.op, Ap if probe is not None else None))
    run.lam_hat = max(run.lam_hat, scale)  # (the scale the restarts' directions are read by)
    if null(scale):
        run.null = run.p / pnorm


def _norm_ratio(op: LinearOperator, v: Tensor | None) -> float:
    """``||A v|| / ||v||`` for ``v``, or for a fixed random vector (seed 0) when None: a
    lower bound of ``||A||`` that the run's directions cannot bias (``A p`` of a null ``p``
    can be its products' rounding, 1e-16 of ``||A||``). One product."""
    if v is None:
        g = torch.Generator(device=op.device).manual_seed(0)
        v = torch.randn(op.size, generator=g, dtype=op.dtype, device=op.device)
    vnorm = safe_norm(v)
    if not vnorm > 0:
        return 0.0
    Av = op.matvec(v)
    require_finite_product(Av)
    return safe_norm(Av) / vnorm


class _Deflated(WrappingOperator):
    """``P A P`` (``P = I - W W^T``): ``A`` with the null directions ``W`` made exact
    ones, so that a run's residual stays off ``W`` (with ``A`` itself, ``W^T (b - A x) =
    -(A W)^T x`` grew as ``x`` did until ``r^T P M^{-1} P r`` was 0: a float64 system of
    condition 1e12 divided by it). Products are counted on ``op``."""

    def __init__(self, op: LinearOperator, W: Tensor):
        super().__init__(op.size, op.dtype, op.device)
        self.base, self.W = op, W

    @property
    def scale(self) -> float | None:
        """The wrapped operator's :attr:`~hypergradient.HessianOperator.scale`, if any."""
        scale = getattr(self.base, "scale", None)
        return scale if isinstance(scale, float) else None

    def matvec(self, v: Tensor) -> Tensor:
        W = self.W
        w = self.base.matvec(v - W @ (W.T @ v))
        return w - W @ (W.T @ w)


def _projected(
    precondition: Callable[[Tensor], Tensor] | None, W: Tensor
) -> Callable[[Tensor], Tensor]:
    """``r -> P M^{-1} P r`` (``P = I - W W^T``; ``M^{-1} = I`` without a preconditioner)."""

    def apply(r: Tensor) -> Tensor:
        z = r if precondition is None else precondition(r - W @ (W.T @ r))
        return z - W @ (W.T @ z)

    apply.user = getattr(precondition, "user", False)  # type: ignore[attr-defined]
    return apply


def _added(W: Tensor, u: Tensor, b: Tensor, limit: float) -> Tensor | None:
    """``W`` with ``u`` (orthogonalized against it) appended, if ``b`` has a part along it
    above ``limit``; else None (nothing a deflation would change)."""
    u = u - W @ (W.T @ u)
    norm = safe_norm(u)
    if not norm > 0.5 or abs(float(u @ b)) <= limit * norm:
        return None
    return torch.cat([W, (u / norm)[:, None]], 1)


def deflated_solve(
    first: Any,
    sol: Solution,
    run: Callable[..., Any],
    b: Tensor,
    x0: Tensor | None,
    tol: float,
    atol: float,
) -> Solution:
    """After ``first`` (a CG run, ``_Run`` of :mod:`.cg`, whose answer is ``sol``) stopped at
    a null direction along which ``b`` has a part above its tolerance, the least-squares
    solve: CG again from the start on ``A x = P b``, ``P`` deflating the null directions
    met, until a run meets none along which ``P b`` has a part above its tolerance and
    ``NULL_ROUNDING sqrt(eps) ||P b||`` (the part a direction known to ``sqrt(eps kappa)``
    can show: a run that did not reach its tolerance then stopped where the deflation's
    accuracy ends, ``"max_iterations"``, ``stats["least_squares_stalled"]``). At most
    :data:`MAX_DEFLATIONS` directions; else ``negative_curvature``, as without deflation.

    ``run(op, b, x0, maxiter, tol, atol, precondition, bnorm, scale)`` makes a run (``scale``:
    the first run's ``||A||`` estimate, which a null first direction is measured against).
    The runs after ``first`` share ``maxiter`` iterations (so at most twice ``maxiter`` in
    all) and stop at ``||P b - A x|| <= max(tol ||P b||, atol)``. ``residual_norm`` is
    ``||b - A x||``, read with one more product (it keeps the part of ``b`` off the range),
    and a last one reads ``||A (b - A x)||``, which a converged answer keeps within the
    tolerance times ``lambda ||b||`` (else ``"max_iterations"``, stalled); ``stats``:
    ``null_space`` (the directions deflated), ``null_residual`` (``||W^T b|| / ||b||``),
    ``least_squares_residual`` (``||P b - A x|| / ||b||``, the last run's),
    ``normal_residual`` (``||A (b - A x)|| / (lambda ||b||)``) and ``deflation_hvps`` (the
    products before the last run).
    """
    op, bnorm, budget, iterations = first.op, first.bnorm, first.maxiter, first.iterations
    W, lam = _added(b.new_zeros((b.numel(), 0)), first.null, b, first.threshold * bnorm), 0.0
    if W is None:  # b has no part along it that the tolerance sees: a rounding artifact
        return sol
    while True:
        coef = W.T @ b
        Pb = b - W @ coef
        y0 = None if x0 is None else x0.to(b.dtype) - W @ (W.T @ x0.to(b.dtype))
        deflation_hvps = op.num_matvecs - first.start
        pbnorm = safe_norm(Pb)
        if pbnorm <= 10 * first.eps * bnorm:  # b lies along W (to rounding): x = 0
            sol = Solution(torch.zeros_like(b), 0, 0.0, True, Status.CONVERGED, 0)
            break
        pre = _projected(first.precondition, W)
        scale = max(lam, first.lam_hat, first.hint)
        again = run(_Deflated(op, W), Pb, y0, budget, tol, atol, pre, pbnorm, scale)
        sol = again.run()
        lam = max(lam, again.lam_hat)  # (its null check's scale included)
        iterations += again.iterations
        budget -= max(again.iterations, 1)
        if again.null is None:
            break
        limit = max(again.threshold, NULL_ROUNDING * math.sqrt(again.product_eps)) * pbnorm
        wider = _added(W, again.null, Pb, limit)
        if wider is None:  # stalled at the deflation's accuracy
            sol.status, sol.converged = Status.MAX_ITERATIONS, False
            sol.stats["least_squares_stalled"] = True
            break
        if wider.shape[1] > MAX_DEFLATIONS or budget < 1:
            break
        W = wider
    x = sol.value - W @ (W.T @ sol.value)  # (off W up to the runs' rounding: exactly)
    r, normal, rounding = _normal_residual(op, b, x, max(lam, _scale(first)), first.product_eps)
    residual, null, ls = safe_norm(r), safe_norm(coef), sol.residual_norm or 0.0
    stats = dict(sol.stats)  # (a warm start's start_residual was that of P b: dropped)
    stats.pop("start_residual", None)
    stats["normal_residual"] = normal
    if sol.status == Status.CONVERGED and normal > max(first.threshold, rounding):
        sol.status, sol.converged = Status.MAX_ITERATIONS, False
        stats["least_squares_stalled"] = True
    stats.update(null_space=W.shape[1], null_residual=null / bnorm)
    stats.update(least_squares_residual=ls / bnorm, relative_residual=residual / bnorm)
    stats["deflation_hvps"] = deflation_hvps
    hvps = op.num_matvecs - first.start
    message = _message(sol, W.shape[1], stats)
    return Solution(x, hvps, residual, sol.converged, sol.status, iterations, stats, message)


def _normal_residual(op: LinearOperator, b: Tensor, x: Tensor, lam: float, eps: float) -> Any:
    """``r = b - A x``, ``||A r|| / (lambda ||b||)`` (two products) and the rounding of that
    ratio, ``10 eps (1 + lambda ||x|| / ||b||)``: how far ``x`` is from a least-squares
    solution, ``A r = 0`` (``lambda``: the runs' largest ``||A p|| / ||p||`` or ``||A x||
    / ||x||``; a float32 answer as accurate as Exact's, 2e-5, read 8e-5). The deflated
    directions are null only to ``||A w|| ~ sqrt(eps kappa) lambda``, and the part of ``b``
    along them leaks into the range part of the answer: this is the measure of it
    (``b`` 30 times off the range, condition 1e3: 1e-5 relative error at ``tol=1e-10``)."""
    Ax = op.matvec(x)
    require_finite_product(Ax)
    r = b - Ax
    Ar = op.matvec(r)
    require_finite_product(Ar)
    xnorm, bnorm = safe_norm(x), safe_norm(b)
    lam = max(lam, safe_norm(Ax) / xnorm) if xnorm > 0 else lam
    if not lam > 0:
        return r, 0.0, 0.0
    return r, safe_norm(Ar) / (lam * bnorm), 10 * eps * (1.0 + lam * xnorm / bnorm)


def _message(sol: Solution, k: int, stats: dict[str, Any]) -> str:
    """What a least-squares solve's status means (see :func:`deflated_solve`)."""
    if sol.status == Status.CONVERGED:
        return (
            f"the operator is singular along {k} direction(s) where b has a part "
            f"({stats['null_residual']:.3g} of ||b||) that no x reaches: x is the "
            "least-squares solution with no part along them (the minimum-norm one from x0 = 0)"
        )
    if stats.get("least_squares_stalled"):
        return (
            "the least-squares residual stalled above the tolerance (normal-equation residual "
            f"||A (b - A x)|| / (lambda ||b||) = {stats['normal_residual']:.3g}): the null "
            "directions deflated are known to about sqrt(eps * condition number), which "
            "limits the attainable accuracy; loosen tol"
        )
    return sol.message
