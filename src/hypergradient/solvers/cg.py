"""Conjugate gradient, and the CG kernel that the Nystrom-preconditioned solver reuses."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import _tree, _vocab
from .._norms import in_rows, row_norms
from .._vocab import Status
from ..operators import LinearOperator
from .base import Solution, Solver, require_finite_product, require_finite_solution, safe_norm
from .cg_singular import blown_up, curvature_status, deflated_solve, null_direction, probe_null
from .cg_status import (
    attainable_message,
    checked_preconditioner,
    next_iterate,
    product_eps,
    recheck_exit,
    relative_tol,
    restore_start,
    unit_rhs,
)
from .extremes import max_abs, nonzero

__all__ = ["CG", "conjugate_gradient"]


@functools.cache
def _finfo(dtype: torch.dtype) -> torch.finfo:
    return torch.finfo(dtype)


#: Residual replacements (verifications that failed) before CG gives up on its tolerance.
MAX_REPLACEMENTS = 3


class _Run:
    """One CG solve on the normalized system ``A y = b / ||b||`` (``x = ||b|| y``).

    Normalizing makes the iteration scale-safe: ``||b||^2`` and ``r^T z`` cannot overflow
    or underflow whatever the scale of ``b``. The run keeps the iterate with the smallest
    known residual (``x = 0``, residual 1, to start with; :meth:`_solution` says which it
    returns). The norms of ``A p``, ``p``, ``r``, ``y`` take one reduction and, with ``p^T A
    p``, one host synchronization per step (:meth:`_norms`; on the CPU large float32 systems
    read by float32 rows, :mod:`.norms`, ~1e-7 relative)."""

    def __init__(
        self,
        op: LinearOperator,
        b: Tensor,
        x0: Tensor | None,
        maxiter: int,
        tol: float,
        atol: float,
        precondition: Callable[[Tensor], Tensor] | None,
        bnorm: float | None = None,
        scale: float = 0.0,
    ) -> None:
        self.op, self.maxiter, self.precondition = op, maxiter, precondition
        self.start, self.eps = op.num_matvecs, _finfo(b.dtype).eps
        self.bnorm = safe_norm(b) if bnorm is None else bnorm
        self.product_eps = max(self.eps, product_eps(op))  # bf16 products: 3.9e-3 (_verified)
        self.rhs, self.top = b, max_abs(b)  # b / ||b||: unit_rhs, made where needed
        # tolerance on the normalized residual; never below rounding level (past it the residual
        # only shrinks by noise until p^T A p underflows to 0: false negative curvature)
        asked = max(tol, atol / self.bnorm)
        self.threshold = max(asked, 10 * self.eps)
        self.at_rounding = asked < 10 * self.eps  # "as far as the precision goes"
        self.checked: Tensor | None = None  # the iterate whose rnorm is its true residual
        self.null: Tensor | None = None  # a null direction met (.cg_singular), to deflate
        self.stats: dict[str, Any] = {}
        self.status, self.iterations, self.replacements = Status.MAX_ITERATIONS, 0, 0
        self.lam_hat, self.xmax = 0.0, 0.0  # max ||A p|| / ||p|| (<= ||A||), max ||y||
        self.hint = scale  # a known lower bound of ||A||, for the null test only (.cg_singular)
        self.wide = _tree.wide_dtype(b.device)
        self.rows: Tensor | None = None  # the (4, n) buffer, allocated at first use
        self.by_rows = b.device.type == "cpu" and in_rows(b.contiguous(), self.wide)
        # CPU: p^T A p read alone (free; a step whose curvature is not positive stops before
        # its update); an accelerator reads p^T A p and the 4 norms in one synchronization
        self.on_host = b.device.type == "cpu"
        if not self.on_host:
            self.host = torch.empty(5, dtype=self.wide, device=b.device)
            self.host_pap, self.host_norms = self.host[0], self.host[1:]
        self.ynorm, self.best_ynorm = 0.0, 0.0  # ||y|| and ||best|| (bound the solution)
        self.slots: list[Tensor] = []  # y's buffers (.cg_status.next_iterate)
        self.defer = getattr(op, "defer_scale_sample", None)  # a HessianOperator's scale
        self.settle = getattr(op, "settle_scale_sample", None)  # sample takes a step's norms
        self._initial_guess(x0)

    # -- setup --------------------------------------------------------------------------
    def _product(self, v: Tensor) -> Tensor:
        w = self.op.matvec(v)
        require_finite_product(w)
        return w

    def _initial_guess(self, x0: Tensor | None) -> None:
        self.r = unit_rhs(self)  # the residual of y = 0 (no copy of b / ||b|| is kept)
        self.y = torch.zeros_like(self.r)
        self.rnorm = 1.0
        self.x0: Tensor | None = None  # the warm start as given, returned if never improved
        if x0 is not None and nonzero(x0):
            y0 = x0.to(self.r.dtype) / self.bnorm
            r0 = self.r - self._product(y0)
            r0norm = safe_norm(r0)
            if r0norm <= 1.0:
                self.y, self.r, self.rnorm = y0.clone(), r0, r0norm
                self.stats["start_residual"] = r0norm  # relative: the rate's starting point
                self.xmax = self.ynorm = self.best_ynorm = safe_norm(y0)
                self.x0 = x0.to(self.r.dtype)
            else:  # worse than x = 0: drop it (its product is counted)
                self.stats["warm_start_dropped"] = True
        self.best: Tensor | None = None  # copied out at its first improvement (the start)
        self.best_norm, self.start_norm, self.start_ynorm = self.rnorm, self.rnorm, self.ynorm

    def _restart_direction(self) -> None:
        self.z = self.precondition(self.r) if self.precondition is not None else self.r
        self.p = self.z.clone()
        rz = torch.dot(self.r, self.z)
        self.rz: Tensor | float = float(rz) if self.on_host else rz

    # -- iteration ----------------------------------------------------------------------
    def _norms(self, vectors: tuple[Tensor, ...], pAp: Tensor | None) -> list[float]:
        """The norms of ``vectors`` (``A p``, ``p``, ``r``, ``y``) over the reused ``(4, n)``
        buffer; on an accelerator ``pAp`` is read with them (one synchronization) and
        returned first. Norms accumulate in float64 (float32 on MPS); the rare ones that
        over- or underflow there are recomputed by :func:`safe_norm`."""
        if self.rows is None:  # not on the float32-rows path (which reads them in place)
            self.rows = torch.empty((4, self.r.numel()), dtype=self.r.dtype, device=self.r.device)
        torch.stack(vectors, out=self.rows)
        if pAp is None:
            values = torch.linalg.vector_norm(self.rows, dim=1, dtype=self.wide).tolist()
            norms, first = values, 0
        else:
            torch.linalg.vector_norm(self.rows, dim=1, dtype=self.wide, out=self.host_norms)
            self.host_pap.copy_(pAp)
            values = self.host.tolist()
            norms, first = values[1:], 1
        if not (min(norms) > 0.0 and math.isfinite(sum(norms))):  # NaN or Inf fail too
            for i, v in enumerate(vectors, start=first):
                if not 0.0 < values[i] < math.inf:
                    values[i] = safe_norm(v)
        return values

    def _update(self, Ap: Tensor) -> tuple[float, list[float]]:
        """``y += alpha p``, ``r -= alpha A p`` with ``alpha = r^T z / p^T A p``; returns
        ``p^T A p`` and the norms ``[||A p||, ||p||, ||r||, ||y||]``. On the CPU ``p^T A p``
        is read first, a step whose curvature is not positive and finite stops before its
        update (no norms), ``alpha`` a Python float (a 0-d tensor's roundings); on an
        accelerator with the norms (one read). ``y``: :func:`.cg_status.next_iterate`."""
        p, r = self.p, self.r
        if self.on_host:  # Python scalars: the same roundings as 0-d tensors, fewer kernels
            pap = torch.dot(p, Ap).item()
            if not 0.0 < pap < math.inf:
                return pap, []
            alpha = float(self.rz) / pap
            self.y = y = torch.add(self.y, p, alpha=alpha, out=next_iterate(self))
            r.add_(Ap, alpha=-alpha)
            norms = row_norms((Ap, p, r, y), self.wide) if self.by_rows else None  # no copy
            return pap, norms if norms is not None else self._norms((Ap, p, r, y), None)
        pAp = torch.dot(p, Ap)
        alpha_t = self.rz / pAp
        self.y = y = torch.addcmul(self.y, p, alpha_t, out=next_iterate(self))
        r.addcmul_(Ap, alpha_t, value=-1.0)
        values = self._norms((Ap, p, r, y), pAp)
        return values[0], values[1:]

    def _step(self) -> bool:
        """One CG step; True when the run must stop (status set)."""
        if self.defer is not None:
            self.defer()
        Ap = self.op.matvec(self.p)
        pap, norms = self._update(Ap)
        if self.settle is not None:  # no norms (a curvature exit): the operator reads them
            self.settle(*norms[:2])
        if not 0.0 < pap < math.inf:
            self.status = curvature_status(self, Ap, pap)
            return True
        apnorm, pnorm, rnorm, ynorm = norms
        if pap <= self.product_eps * max(self.lam_hat, self.hint) * pnorm * pnorm:
            return null_direction(self, Ap, pap, pnorm, apnorm)
        self.lam_hat = max(self.lam_hat, apnorm / pnorm)
        self.iterations += 1
        self.rnorm, self.ynorm = rnorm, ynorm
        self.xmax = max(self.xmax, ynorm)
        if rnorm < self.best_norm:  # each step writes y to a buffer other than best's
            self.best_norm, self.best_ynorm, self.best = rnorm, ynorm, self.y
        if rnorm <= self.threshold and self._verified():
            self.status = Status.CONVERGED
            return True
        self._next_direction()
        return False

    def _next_direction(self) -> None:
        """``p = z + (r^T z / r_old^T z_old) p`` with ``z = M^{-1} r``."""
        z = self.precondition(self.r) if self.precondition is not None else self.r
        if self.on_host:
            rz = torch.dot(self.r, z).item()
            self.p.mul_(rz / self.rz).add_(z)
            self.rz = rz
            return
        rz_new = torch.dot(self.r, z)
        self.p.mul_(rz_new / self.rz).add_(z)
        self.rz = rz_new

    def _verified(self) -> bool:
        """Whether the updated residual can be trusted; else replace it by ``b - A y``.

        The updated residual drifts from the true one by ``eps (||b|| + ||A|| max ||y_k||)``
        (Greenbaum, 1997; ``eps`` the products'). When that could reach the tolerance, one
        product computes the true residual; if it does not meet the tolerance the iteration
        restarts from it (residual replacement), at most ``MAX_REPLACEMENTS`` times.
        """
        drift = self.product_eps * (1.0 + self.lam_hat * self.xmax)  # huge iterates: checked
        if 2 * drift <= self.threshold:
            return True
        self.stats["verify_hvps"] = self.stats.get("verify_hvps", 0) + 1
        true_r = unit_rhs(self) - self._product(self.y)
        true_norm = safe_norm(true_r)
        if self.best_norm == self.rnorm:  # y is the best iterate: record its true residual
            self.best_norm = true_norm
            restore_start(self)  # worse than the start: the start is the best again
        self.r, self.rnorm, self.checked = true_r, true_norm, self.y
        if true_norm <= self.threshold:
            return True
        self.replacements += 1
        self.stats["attainable_residual"] = true_norm * self.bnorm
        if self.replacements >= MAX_REPLACEMENTS or self.at_rounding:
            raise StopIteration  # (at rounding level: the attainable residual is reached)
        self._restart_direction()
        return False

    def run(self) -> Solution:
        if self.rnorm <= self.threshold:
            self.status = Status.CONVERGED
        else:
            self._restart_direction()
            try:
                while self.iterations < self.maxiter and not self._step():
                    pass
            except StopIteration:
                self.status = Status.MAX_ITERATIONS
        recheck_exit(self)
        return self._solution()

    def _solution(self) -> Solution:
        # On a positive-definite exit the last iterate is CG's answer (the smallest A-norm
        # error over the Krylov space: warm restarts make progress even where the residual
        # rose); it is returned unless its residual exceeds that of x = 0. Otherwise (negative
        # curvature, divergence, a last iterate worse than 0) the iterate with the smallest
        # residual.
        last = (
            self.status in (Status.CONVERGED, Status.MAX_ITERATIONS)
            and self.iterations > 0
            and self.rnorm <= 1.0
        )
        chosen = self.rnorm if last else self.best_norm
        residual = chosen * self.bnorm
        self.stats["relative_residual"] = chosen
        message = attainable_message(self) if self.status == Status.MAX_ITERATIONS else ""
        if last:
            value, ynorm = self.y * self.bnorm, self.ynorm
        elif self.best is not None:  # improved
            value, ynorm = self.best * self.bnorm, self.best_ynorm
        else:  # the start is the best iterate: return it as given (0 or a copy of x0)
            value = torch.zeros_like(self.r) if self.x0 is None else self.x0.clone()
            ynorm = 0.0  # finite: zeros, or the validated warm start
        # ||y|| ||b|| bounds every entry of the solution: well below the dtype's largest
        # value (and ||b|| too, which the product with y is taken in) it is finite, the usual
        # case, without a synchronization; else it is checked entry by entry
        big = 0.5 * _finfo(value.dtype).max
        if not (self.bnorm < big and ynorm * self.bnorm < big):
            require_finite_solution(value)
        return Solution(
            value,
            self.op.num_matvecs - self.start,
            residual,
            self.status == Status.CONVERGED,
            self.status,
            self.iterations,
            self.stats,
            message,
        )


def conjugate_gradient(
    op: LinearOperator,
    b: Tensor,
    x0: Tensor | None,
    maxiter: int,
    tol: float,
    atol: float,
    precondition: Callable[[Tensor], Tensor] | None = None,
    bnorm: float | None = None,
    scale: float = 0.0,
) -> Solution:
    """(Preconditioned) conjugate gradient on a validated system; see :class:`CG`.

    ``bnorm``: ``||b||`` when the caller has it (as :func:`safe_norm` computes it).
    ``scale``: a lower bound of ``||A||`` when the caller has one (a sketch's or recycled
    space's largest Ritz value): a null direction's curvature is measured against it too
    (a preconditioned run's ``||A p|| / ||p||`` stays near the flattened spectrum's top).
    """
    bnorm = safe_norm(b) if bnorm is None else bnorm
    if bnorm == 0.0:  # A x = 0: x = 0
        return Solution(torch.zeros_like(b), 0, 0.0, True, Status.CONVERGED, 0)
    run = _Run(op, b, x0, maxiter, tol, atol, precondition, bnorm, scale)
    sol = run.run()  # a null direction met: the least-squares solve (.cg_singular)
    if run.null is None and blown_up(run):  # along a null direction?
        before = op.num_matvecs
        probe_null(run)
        sol.num_hvps += op.num_matvecs - before
    return sol if run.null is None else deflated_solve(run, sol, _Run, b, x0, tol, atol)


class CG(Solver):
    """Conjugate gradient for symmetric positive-definite ``A`` (Hestenes & Stiefel, 1952).

    Stops when ``||b - A x|| <= max(tol * ||b||, atol)`` or after ``maxiter`` iterations
    (and always once the residual is at rounding level, ``10 eps ||b||``, even with
    ``tol=0``: then "converged" means "to rounding level"). Safe on the systems implicit
    differentiation meets in practice:

    - **never worse than x = 0**: CG's residual is not monotone (it minimizes the
      ``A``-norm of the error), so the iterate with the smallest residual is kept. On a
      positive-definite exit (converged, or ``maxiter``) the last iterate is returned if
      its residual is at most ``||b||`` (it has the smallest ``A``-norm error, so warm
      restarts make progress even where the residual rose), else the kept one; on any
      other exit the kept one. A warm start ``x0`` whose residual exceeds ``||b||`` is
      dropped (``stats["warm_start_dropped"]``; its product is counted); an accepted one's
      relative residual is ``stats["start_residual"]``;
    - **negative curvature**: if a search direction has ``p^T A p <= 0`` (not a minimum)
      it stops with ``status="negative_curvature"`` and the best iterate, instead of
      stepping uphill; add damping (``auto_damping``);
    - **singular**: a direction with ``p^T A p`` and ``||A p||`` at rounding level is a null
      direction, along which ``b`` has a part no ``x`` reaches: it is deflated and the
      system solved again (:mod:`.cg_singular`): the least-squares answer (``A^+ b`` from
      ``x0 = 0``), ``stats["null_space"]``; the restarts share ``maxiter`` more iterations;
    - **scale-safe**: it iterates on ``A y = b / ||b||`` and returns ``x = ||b|| y``, so
      ``||b||^2``, ``A b`` and ``r^T z`` cannot overflow or underflow (float32 with
      ``||b|| ~ 1e20`` used to report "converged" with ``x = 0``);
    - **verified**: when the drift of the updated residual from ``b - A x`` (about
      ``eps (||b|| + ||A|| ||x||)``) could reach the tolerance, "converged" is checked with
      one product (``stats["verify_hvps"]``) and the iteration restarts from the true
      residual if needed; if the tolerance is below what the precision can reach, it
      stops with ``"max_iterations"`` and a message saying so.

    Args:
        maxiter: maximum number of iterations (one product each).
        tol: relative residual tolerance.
        atol: absolute residual tolerance.
        preconditioner: optional callable ``r -> M^{-1} r`` for a symmetric positive-definite
            ``M`` (a result in another floating dtype is cast to ``r``'s; another shape raises
            ValueError).

    Cost: one product and O(n) memory per iteration (four vectors and the best iterate),
    plus one product for a warm start and one per verification. With exact arithmetic it
    solves an ``n``-dimensional system in at most ``n`` iterations.

    Raises:
        NonFiniteHypergradientError: ``b``, ``x0`` or a product holds NaN or Inf, or the
            solution overflows the dtype.
    """

    requires_symmetric = True

    def __init__(
        self,
        maxiter: int = 100,
        tol: float = 1e-6,
        atol: float = 0.0,
        preconditioner: Callable[[Tensor], Tensor] | None = None,
    ):
        self.maxiter = _vocab.as_int(maxiter, "maxiter", min=1)
        self.tol = relative_tol(tol)
        self.atol = _vocab.as_float(atol, "atol", min=0.0)
        if preconditioner is not None:
            _vocab.as_callable(preconditioner, "preconditioner", "r -> M^{-1} r")
        self.preconditioner = preconditioner

    def config(self) -> dict[str, object]:
        pre = self.preconditioner
        return {
            "maxiter": self.maxiter,
            "tol": self.tol,
            "atol": self.atol,
            "preconditioner": None if pre is None else getattr(pre, "__qualname__", repr(pre)),
        }

    def solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> Solution:
        bnorm = self.validate(op, b, x0)
        pre = self.preconditioner
        pre = None if pre is None else checked_preconditioner(pre)
        return conjugate_gradient(op, b, x0, self.maxiter, self.tol, self.atol, pre, bnorm)
