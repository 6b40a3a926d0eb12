"""The implicit hypergradient formula: the one implementation behind Implicit, HOAG and T1T2.

For ``theta*(phi) = argmin_theta f(theta, phi)`` the implicit function theorem gives

    dg/dphi = d_phi g - (d^2 f / d phi d theta) (H + lambda I)^{-1} grad_theta g,
    H = d^2 f / d theta^2,

evaluated at the given ``theta``. :func:`implicit_hypergradient` computes it in four steps,
each one function: the local terms (``f``'s graph, ``g``'s gradients), the solve, the mixed
product, the assembly. Every quantity is checked for finiteness in the order it is produced
(inner loss and gradient, outer loss and gradient, ``x0``, solution, mixed product, result),
so an error names the first one that went wrong. With a process group, the call's first
collective compares values and configuration across ranks, and every later collective is
guarded (:mod:`hypergradient.distributed`).

T1T2 is this formula with ``Identity(lr)`` as the solver, the operator at the parameters
before the last step and the outer gradient at the parameters after it; HOAG is it with CG
to a decreasing tolerance and a warm start.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import _tree
from .._norms import exact_where_off, wide_norm
from .._tree import Tree
from .._vocab import NonFiniteHypergradientError, Status, require_finite
from ..distributed import AveragedOperator, guarded
from ..operators import LinearOperator
from ..operators.buffers import keep_buffers
from ..solvers import AutoDamping, Solver, damped_solve
from ..solvers.extremes import nonzero
from ._checks import Inputs, all_finite, connected, unused_leaves, warn_unused
from .implicit_info import ImplicitInfo, PendingFloor, warn_solve
from .mixed_scale import mixed_parts

__all__ = ["ImplicitInfo", "autocast_off", "implicit_hypergradient"]


def autocast_off(device: torch.device) -> Any:
    """A region without autocast on ``device``, for the solver's own arithmetic.

    A call made under ``torch.autocast`` would otherwise run the solvers' float32 matrix
    products (Nystrom's ``U^T b``, NystromPCG's preconditioner) in bfloat16/float16 and
    return a half-precision solution. Products through the retained graph are backward
    passes, which autocast does not change.
    """
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type without autocast
        return contextlib.nullcontext()


@dataclass
class _Terms:
    """The averaged local terms: ``grad_theta g`` (b), ``d_phi g``, ``grad_theta f``, values."""

    op: Any
    b: Tensor
    direct: Tensor
    stationarity: Tensor
    values: list[Tensor]  # g and f at the point (0-d); read on the host by _check_terms
    unused_direct: list[bool]
    outer_value: float = math.nan  # set by _check_terms
    inner_value: float = math.nan
    bnorm: float = math.nan  # ||b||, set by _check_terms
    stat_norm: float = math.nan  # ||grad_theta f|| (or the fixed point's residual)


@dataclass
class _Record:
    """What the solve reports, as the info needs it."""

    status: Status
    converged: bool | None
    residual: float | None
    iterations: int
    stats: dict[str, Any]


_INNER_FIX = "Check the training batch (NaN or Inf inputs or targets) and inner_loss at `params`."
_OUTER_FIX = "Check the validation batch and outer_loss at `params`."


def _local_terms(
    build: Callable[[], Any],
    outer_loss: Callable[[Any, Any], Tensor],
    outer_at: Sequence[Tensor] | None,
    by_reference: bool,
    holder: dict[str, Any],
    group: Any,
) -> list[Tensor]:
    """Build the operator (evaluates ``f``) and take ``g``'s gradients: this rank's terms.

    ``g`` is differentiated at the operator's own leaves (fresh copies of the caller's,
    or the hyperparameters themselves when ``by_reference``), or at fresh copies of
    ``outer_at``. With a group the two values are stacked, for the all-reduce.
    """
    op = holder["op"] = build()
    at = op.param_leaves if outer_at is None else list(outer_at)
    value, (gp, gh) = _tree.grad_at_leaves(  # inside implicit_hypergradient's keep_buffers
        outer_loss,
        [at, op.hparam_leaves],
        [op.param_spec, op.hparam_spec],
        "outer_loss",
        by_reference=[outer_at is None, True],
    )
    holder["unused_direct"] = [g is None for g in gh]
    connected(gp, gh, None)  # (warns when g has no graph to either)
    hdtype = _tree.common_dtype(op.hparam_leaves)
    stationarity = getattr(op, "grad", None)
    if stationarity is None:  # a fixed point: T(theta) - theta
        stationarity = op.residual
    wide = _tree.wide_dtype(op.device)
    inner = getattr(op, "loss", None)  # a fixed point has none
    inner = torch.full((), math.nan) if inner is None else inner
    values = [value.to(op.device, wide), inner.to(op.device, wide)]
    terms = [
        _tree.cat(gp, op.param_spec, op.dtype, op.device),
        _tree.cat(gh, op.hparam_spec, hdtype, op.device),
        stationarity,
    ]
    return terms + ([torch.stack(values)] if group is not None else values)


def _like(inputs: Inputs) -> list[Tensor]:
    """Zeros shaped like :func:`_local_terms`'s result (for a rank whose terms failed)."""
    p, h = inputs.param_leaves, inputs.hparam_leaves
    dtype = _tree.accumulator_dtype(p)
    device = p[0].device
    return [
        torch.zeros(inputs.param_spec.size, dtype=dtype, device=device),
        torch.zeros(inputs.hparam_spec.size, dtype=_tree.common_dtype(h), device=device),
        torch.zeros(inputs.param_spec.size, dtype=dtype, device=device),
        torch.zeros(2, dtype=_tree.wide_dtype(device), device=device),
    ]


def _host_values(t: _Terms, x0: Tensor | None, fixed_point: bool) -> bool:
    """Read the values and norms onto ``t`` (one synchronization); True if all are finite."""
    wide = _tree.wide_dtype(t.op.device)
    probes = list(t.values)
    probes += [wide_norm(v, wide) for v in (t.stationarity, t.b)]  # large ones by rows
    # sum probes: a NaN or Inf entry makes them non-finite (an overflowing sum of finite
    # entries too, which the checks of _check_terms then clear)
    probes += [v.sum(dtype=wide) for v in (t.direct, x0) if v is not None and v.numel()]
    values = torch.stack(probes).tolist()
    exact_where_off(values, ((2, t.stationarity), (3, t.b)), wide)
    t.outer_value, t.inner_value, t.stat_norm, t.bnorm = values[:4]
    if fixed_point:
        values[1] = 0.0  # no inner loss
    return all(math.isfinite(v) for v in values)


def _check_terms(t: _Terms, x0: Tensor | None, fixed_point: bool) -> None:
    """Finiteness of the terms, in the order they are produced (gradients before values).

    The usual case costs one host synchronization: the two values, the norms of
    ``grad_theta f`` and ``b`` (kept on ``t`` for the info) and sum probes of ``d_phi g``
    and ``x0`` are finite. Else each term is checked on its own, and the first non-finite
    one is named.
    """
    if _host_values(t, x0, fixed_point):
        return
    spec, hspec = t.op.param_spec, t.op.hparam_spec
    inner = (
        "the fixed-point map's residual T(params) - params at"
        if fixed_point
        else "the gradient of inner_loss with respect to"
    )
    if not all_finite([t.stationarity]):
        require_finite(_tree.split(t.stationarity, spec), spec.paths, inner, _INNER_FIX)
    if not (fixed_point or math.isfinite(t.inner_value)):
        require_finite(
            [torch.tensor(t.inner_value)], ["inner_loss at `params`"], "the value of", _INNER_FIX
        )
    if not all_finite([t.b, t.direct]):
        leaves = _tree.split(t.b, spec) + _tree.split(t.direct, hspec)
        paths = spec.paths + hspec.paths
        require_finite(leaves, paths, "the gradient of outer_loss with respect to", _OUTER_FIX)
    if not math.isfinite(t.outer_value):
        require_finite(
            [torch.tensor(t.outer_value)], ["outer_loss at `params`"], "the value of", _OUTER_FIX
        )
    if x0 is not None and not all_finite([x0]):
        require_finite([x0], ["x0"], "the warm start", "Pass a finite x0 (or x0=None).")


def _solve(
    t: _Terms, solver: Solver, damping: float | AutoDamping, x0: Tensor | None, group: Any
) -> tuple[Tensor, Any, LinearOperator]:
    """``x = (H + damping I)^{-1} b`` by ``solver``; the solution, its record, the system."""
    system: LinearOperator = t.op if group is None else AveragedOperator(t.op, group)
    if t.bnorm == 0.0 and not nonzero(t.b):
        # The outer loss does not depend on the parameters: only the direct term remains.
        done = _Record(Status.CONVERGED, True, 0.0, 0, {"damping": _damping_value(damping)})
        return torch.zeros_like(t.b), done, system
    if torch.is_autocast_enabled(t.op.device.type):
        with autocast_off(t.op.device):
            sol, system, extra = damped_solve(solver, system, t.b, x0, damping)
    else:
        sol, system, extra = damped_solve(solver, system, t.b, x0, damping)
    status = sol.status if type(sol.status) is Status else Status(sol.status)
    record = _Record(
        status, sol.converged, sol.residual_norm, sol.iterations, {**sol.stats, **extra}
    )
    if status == Status.DIVERGED:
        raise NonFiniteHypergradientError(
            f"{solver!r} diverged on the system H x = grad_theta g: {status.message}.",
            "the solution of H x = grad_theta g",
        )
    return sol.value, record, system


def _require_finite_solution(x: Tensor, solver: Solver, status: Status) -> None:
    if not all_finite([x]):
        raise NonFiniteHypergradientError(
            f"The solution of H x = grad_theta g returned by {solver!r} (status "
            f"{status.value!r}) is not finite (NaN or Inf): the Hessian products of "
            "inner_loss at `params` overflowed or are not finite, or the solver diverged. "
            "Add damping, or use hg.CG().",
            "the solution of H x = grad_theta g",
        )


def _damping_value(damping: float | AutoDamping) -> float | None:
    if isinstance(damping, AutoDamping):
        est = damping.estimate
        return None if est is None else est.damping
    return float(damping)


def _assemble(t: _Terms, x: Tensor, group: Any, solver: Solver, status: Status) -> Tree:
    """``d_phi g - (d_phi grad_theta f)^T x`` per leaf; unused leaves warn and get zero.

    A finite result (the usual case, one host synchronization) vouches for ``x`` and the
    mixed product; otherwise the first non-finite of ``x``, the mixed product and the
    result is named.
    """
    op = t.op
    holder: dict[str, Any] = {}

    def mixed() -> list[Tensor]:
        parts = mixed_parts(op, x)  # (x scaled on float16 parameters)
        holder["none"] = [m is None for m in parts]
        one = parts[0] if len(parts) == 1 and group is None else None  # (nothing in place)
        if one is not None and one.dim() == 1 and one.dtype == t.direct.dtype:
            return [one]  # only read: no copy
        return [_tree.cat(parts, op.hparam_spec, t.direct.dtype, op.device)]

    flat = guarded(mixed, [t.direct], group, "the mixed product")[0]
    diff = t.direct - flat
    finite = all_finite([diff])
    if not finite:
        _require_finite_solution(x, solver, status)
    if not (finite or all_finite([flat])):
        require_finite(
            _tree.split(flat, op.hparam_spec),
            op.hparam_spec.paths,
            "the mixed product (d_phi grad_theta f)^T x for",
            "The second derivatives of inner_loss with respect to the hyperparameters "
            "overflowed; check inner_loss at `params` (or add damping).",
        )
    unused = [d and m for d, m in zip(t.unused_direct, holder.get("none", []))]
    one = op.hparam_leaves[0] if len(op.hparam_leaves) == 1 else None
    if one is not None and unused == [False] and (one.shape, one.dtype) == (diff.shape, diff.dtype):
        out = [diff.detach()]  # one leaf: ``diff`` itself (a new tensor nothing else holds)
    else:
        out = _per_leaf(op, diff, unused)
    if not (finite or all_finite(out)):
        require_finite(
            out,
            op.hparam_spec.paths,
            "the hypergradient of",
            "Check that `params` is near a minimum of inner_loss with a positive-definite "
            "Hessian, or add damping.",
        )
    return _tree.unflatten(op.hparam_spec, out)


def _per_leaf(op: Any, diff: Tensor, unused: list[bool]) -> list[Tensor]:
    """``diff`` cut into the hyperparameters' leaves (copies); unused leaves warn, get zero."""
    out = _tree.split(diff, op.hparam_spec, [leaf.dtype for leaf in op.hparam_leaves])
    used = [not idle for idle in unused]
    warn_unused(unused_leaves(op.hparam_spec.paths, op.hparam_leaves, used), "problem", 6)
    for i, (leaf, idle) in enumerate(zip(op.hparam_leaves, unused)):
        out[i] = torch.zeros_like(leaf) if idle else out[i].detach().clone()
    return out


def implicit_hypergradient(
    build: Callable[[], Any],
    outer_loss: Callable[[Any, Any], Tensor],
    inputs: Inputs,
    solver: Solver,
    *,
    method: str,
    damping: float | AutoDamping = 0.0,
    x0: Tensor | None = None,
    outer_at: Sequence[Tensor] | None = None,
    by_reference: bool = False,
    group: Any = None,
    residual: bool = True,
    started: float | None = None,
) -> tuple[Tree, ImplicitInfo]:
    """``d_phi g - (d_phi grad_theta f)^T (H + damping I)^{-1} grad_theta g`` and its info.

    The caller has validated ``inputs`` and, with a group, run the consistency check.

    Args:
        build: evaluates ``f`` at the point and returns its operator
            (:class:`~hypergradient.HessianOperator` or
            :class:`~hypergradient.FixedPointOperator`).
        outer_loss: ``g(params, hparams)``.
        inputs: the validated parameters and hyperparameters.
        solver: applies ``(H + damping I)^{-1}``.
        method: the method's name, for the info.
        damping: ``lambda`` added to the diagonal, or an
            :class:`~hypergradient.solvers.AutoDamping` that chooses it.
        x0: flat warm start (validated), or None.
        outer_at: parameter leaves where ``g``'s gradient is taken (default: the
            operator's point; T1T2: the parameters after the step).
        by_reference: ``g`` reads the hyperparameter tensors themselves.
        group: a process group (products and terms averaged over ranks), or None.
        residual: compute ``||b - A x||`` when the solver does not report it (one product).
        started: ``time.perf_counter()`` at the call's start.

    Returns:
        The hypergradient (structure, shapes, dtypes and device of ``hparams``, detached)
        and an :class:`ImplicitInfo`.

    Cost: ``f`` with a double-backward graph, ``g`` with its gradient, the solver's
    products, one mixed product (and one product for the residual when asked). Memory: the
    graph of ``f``'s double backward plus the solver's vectors.
    """
    started = time.perf_counter() if started is None else started
    holder: dict[str, Any] = {}
    with keep_buffers():  # every pass here is extra to training: buffers untouched
        b, direct, stat, *values = guarded(
            lambda: _local_terms(build, outer_loss, outer_at, by_reference, holder, group),
            [] if group is None else _like(inputs),
            group,
            "the losses and their gradients",
        )
        op = holder["op"]
        if group is not None:  # the stacked values, averaged
            values = [values[0][0], values[0][1]]
        b = b if b.dtype == op.dtype else b.to(op.dtype)
        terms = _Terms(op, b, direct, stat, values, holder["unused_direct"])
        fixed_point = not hasattr(op, "loss")
        try:
            _check_terms(terms, x0, fixed_point)
            start = op.num_matvecs
            x, record, system = _solve(terms, solver, damping, x0, group)
            num_hvps = op.num_matvecs - start
            extra = 0
            if residual and record.residual is None:
                record.residual = float(torch.linalg.vector_norm(terms.b - system.matvec(x)))
                extra = 1
            bnorm = terms.bnorm
            zero = record.status == Status.NEGATIVE_CURVATURE and not nonzero(x)
            warn_solve(
                solver, record.status, record.iterations, record.residual, bnorm, record.stats, zero
            )
            result = _assemble(terms, x, group, solver, record.status)
        finally:
            op.release()
    record.stats["hvp"] = getattr(op, "mode", None)
    record.stats["hvp_fallback"] = getattr(op, "fallback_reason", None)
    info = ImplicitInfo(
        method=method,
        seconds=time.perf_counter() - started,
        outer_loss=terms.outer_value,
        num_hvps=num_hvps,
        status=record.status,
        stats={k: v for k, v in record.stats.items() if k != "matrix"},
        residual_norm=record.residual,
        relative_residual=None if record.residual is None else record.residual / max(bnorm, 1e-300),
        converged=record.converged,
        iterations=record.iterations,
        solver=repr(solver),
        inner_loss=terms.inner_value,
        inner_grad_norm=terms.stat_norm,
        outer_grad_norm=bnorm,
        inner_grad_floor=PendingFloor(op),  # type: ignore[arg-type]  # (read when read)
        extra_hvps=extra,
        solution=x.detach(),
    )
    return result, info
