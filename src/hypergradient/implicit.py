"""Implicit hypergradients: differentiate the outer loss through the inner optimum.

For ``theta*(phi) = argmin_theta f(theta, phi)`` the implicit function theorem gives

    dg/dphi = d_phi g - (d^2 f / d phi d theta) H^{-1} grad_theta g,    H = d^2 f / d theta^2

evaluated at the given ``theta`` (which should be a good approximation of ``theta*``;
``info.inner_grad_norm`` tells how stationary it is). The linear system
``H x = grad_theta g`` is solved by any solver of :mod:`hypergradient.solvers`.
References: Bengio (2000), "Gradient-based optimization of hyperparameters"; Pedregosa
(2016), "Hyperparameter optimization with approximate gradient" (HOAG); Lorraine et al.
(2020); Blondel et al. (2022), "Efficient and modular implicit differentiation".
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch
from torch import Tensor

from . import _tree
from ._tree import Tree
from ._vocab import HypergradientWarning, NonFiniteHypergradientError
from .distributed import AveragedOperator, all_reduce_mean, check_consistent
from .operators import (
    DampedOperator,
    FixedPointOperator,
    HessianOperator,
    LinearOperator,
    _check_scalar,
)
from .solvers import CG, Exact, FixedPoint, Neumann, Nystrom, NystromPCG, Solver

__all__ = [
    "HypergradInfo",
    "HypergradientWarning",
    "NonFiniteHypergradientError",
    "implicit",
    "implicit_fixed_point",
    "exact",
    "cg",
    "neumann",
    "nystrom",
]


@dataclass
class HypergradInfo:
    """Diagnostics of one hypergradient.

    Attributes:
        num_hvps: products spent by the solver (sketches and power iterations included).
        residual_norm: ``||b - A x||`` of the linear solve (computed with one extra product,
            counted in ``extra_hvps``, when the solver does not know it).
        relative_residual: ``residual_norm / ||b||``.
        converged: whether the solver met its tolerance (None for fixed budgets).
        status: solver status ("converged", "max_iterations", "fixed_budget",
            "negative_curvature", "diverged", "exact").
        iterations: solver iterations.
        seconds: wall time of the whole hypergradient.
        solver: ``repr`` of the solver.
        inner_loss: value of ``f`` at ``params``.
        inner_grad_norm: ``||grad_theta f||`` at ``params``; large values mean ``params`` is
            not an inner optimum and the implicit formula does not apply there.
        outer_loss: value of ``g`` at ``params``.
        extra_hvps: products spent on diagnostics.
        solution: the flat solution ``x ~ A^{-1} grad_theta g`` (for warm starts: ``x0=``).
        stats: solver-specific extras.
    """

    num_hvps: int
    residual_norm: float | None
    relative_residual: float | None
    converged: bool | None
    status: str
    iterations: int
    seconds: float
    solver: str
    inner_loss: float
    inner_grad_norm: float
    outer_loss: float = float("nan")
    extra_hvps: int = 0
    solution: Tensor | None = field(default=None, repr=False)
    stats: dict[str, Any] = field(default_factory=dict, repr=False)


def _check_callable(fn: Any, name: str) -> None:
    if not callable(fn):
        raise TypeError(
            f"`{name}` must be a callable (params, hparams) -> scalar tensor, "
            f"got {type(fn).__name__}."
        )


def _outer_grads(
    outer_loss: Callable[[Tree, Tree], Tensor], op: Any, leaves_from: Any = None
) -> tuple[list[Tensor | None], list[Tensor | None], float]:
    """Gradients of ``outer_loss`` at the operator's point (or at ``leaves_from``'s)."""
    src = op if leaves_from is None else leaves_from
    p = _tree.unflatten(op.param_spec, src.param_leaves)
    h = _tree.unflatten(op.hparam_spec, src.hparam_leaves)
    with torch.enable_grad():
        value = _check_scalar(outer_loss(p, h), "outer_loss")
        leaves = src.param_leaves + src.hparam_leaves
        if not value.requires_grad:
            grads: list[Tensor | None] = [None] * len(leaves)
        else:
            grads = list(torch.autograd.grad(value, leaves, allow_unused=True))
    n = len(src.param_leaves)
    return grads[:n], grads[n:], float(value.detach())


def _finish(
    op: HessianOperator | FixedPointOperator,
    outer_loss: Callable[[Tree, Tree], Tensor],
    solver: Solver,
    damping: float,
    x0: Tree | Tensor | None,
    return_info: bool,
    started: float,
    inner_grad_norm: float,
    inner_loss: float,
    group: Any = None,
    inner_grad: Tensor | None = None,
) -> Any:
    g_theta, g_phi, outer_value = _outer_grads(outer_loss, op)
    b = _tree.cat(g_theta, op.param_spec, op.dtype, op.device)
    unused_direct = [d is None for d in g_phi]
    if group is not None:
        # One all-reduce for everything that is a mean over the data: grad_theta g, the
        # direct term, the inner gradient (diagnostics) and the two loss values.
        hdtype = _tree.common_dtype(op.hparam_leaves)
        wide = torch.promote_types(op.dtype, hdtype)
        direct = _tree.cat(g_phi, op.hparam_spec, wide, op.device)
        grad = inner_grad if inner_grad is not None else torch.zeros_like(b)
        scalars = torch.tensor([outer_value, inner_loss], dtype=wide, device=op.device)
        buf = all_reduce_mean(torch.cat([b.to(wide), direct, grad.to(wide), scalars]), group)
        n, m = b.numel(), direct.numel()
        b = buf[:n].to(op.dtype)
        g_phi = _tree.split(buf[n : n + m], op.hparam_spec, [t.dtype for t in op.hparam_leaves])
        inner_grad_norm = float(torch.linalg.vector_norm(buf[n + m : 2 * n + m]))
        outer_value, inner_loss = float(buf[-2]), float(buf[-1])
    x0_flat = None if x0 is None else _tree.as_flat(x0, op.param_spec, "x0", op.dtype, op.device)
    if not bool(torch.isfinite(b).all()):
        bad = _first_nonfinite(g_theta, op.param_spec.paths)
        raise NonFiniteHypergradientError(
            f"The gradient of outer_loss with respect to {bad} is not finite (NaN or Inf); "
            "no hypergradient can be computed from it. Check outer_loss at `params`."
        )
    system: LinearOperator = op if group is None else AveragedOperator(op, group)
    if damping:
        system = DampedOperator(system, damping)
    start = op.num_matvecs
    if not bool(b.any()):
        # The outer loss does not depend on the parameters: only the direct term remains.
        x = torch.zeros_like(b)
        sol_status, converged, residual, iters, stats = "converged", True, 0.0, 0, {}
    else:
        with _autocast_off(op.device):
            sol = solver.solve(system, b, x0_flat)
        x, sol_status, converged = sol.value, sol.status, sol.converged
        residual, iters, stats = sol.residual_norm, sol.iterations, sol.stats
    num_hvps = op.num_matvecs - start
    if sol_status == "diverged" or not bool(torch.isfinite(x).all()):
        raise NonFiniteHypergradientError(
            f"{solver!r} diverged (status {sol_status!r}) on the system H x = grad_theta g: "
            "the Hessian of inner_loss at `params` is not positive definite, or the solver's "
            "step size is too large (Neumann: alpha < 2 / lambda_max). Try hg.CG(), damping=..., "
            "or Neumann(alpha='auto')."
        )
    extra = 0
    if return_info and residual is None:
        residual = float(torch.linalg.vector_norm(b - system.matvec(x)))
        extra = 1
    if sol_status == "negative_curvature":
        warnings.warn(
            f"{solver!r} met non-positive curvature p^T H p <= 0 after {iters} iteration(s): "
            "the Hessian is not positive definite at `params` (not a minimum, or singular). "
            "The partial solution is used; pass damping=... to hg.implicit to regularize.",
            HypergradientWarning,
            stacklevel=3,
        )
    mixed = op.mixed(x)
    unused = [d and m is None for d, m in zip(unused_direct, mixed)]
    if group is not None:
        hdtype = _tree.common_dtype(op.hparam_leaves)
        flat = all_reduce_mean(_tree.cat(mixed, op.hparam_spec, hdtype, op.device), group)
        mixed = _tree.split(flat, op.hparam_spec, [t.dtype for t in op.hparam_leaves])
    out: list[Tensor] = []
    for leaf, path, direct, m, idle in zip(
        op.hparam_leaves, op.hparam_spec.paths, g_phi, mixed, unused
    ):
        if idle:
            warnings.warn(
                f"{path} influences the outer loss neither directly nor through the inner "
                "problem; its hypergradient is zero. Check that inner_loss or outer_loss uses it.",
                HypergradientWarning,
                stacklevel=3,
            )
            out.append(torch.zeros_like(leaf))
            continue
        value = torch.zeros_like(leaf) if direct is None else direct.detach().clone()
        if m is not None:
            value = value - m.detach().to(leaf.dtype)
        if not bool(torch.isfinite(value).all()):
            raise NonFiniteHypergradientError(
                f"The hypergradient of {path} is not finite. Outer gradient finite: "
                f"{bool(torch.isfinite(b).all())}; solver {solver!r} returned a finite solution: "
                f"{bool(torch.isfinite(x).all())} (status {sol_status!r}). Check that `params` "
                "is near a minimum of inner_loss with a positive-definite Hessian, or add damping."
            )
        out.append(value)
    result = _tree.unflatten(op.hparam_spec, out)
    op.release()
    if not return_info:
        return result
    bnorm = float(torch.linalg.vector_norm(b))
    info = HypergradInfo(
        num_hvps=num_hvps,
        residual_norm=residual,
        relative_residual=None if residual is None else residual / max(bnorm, 1e-300),
        converged=converged,
        status=sol_status,
        iterations=iters,
        seconds=time.perf_counter() - started,
        solver=repr(solver),
        inner_loss=inner_loss,
        inner_grad_norm=inner_grad_norm,
        outer_loss=outer_value,
        extra_hvps=extra,
        solution=x.detach(),
        stats={k: v for k, v in stats.items() if k != "matrix"},
    )
    return result, info


def _autocast_off(device: torch.device) -> Any:
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


def _first_nonfinite(leaves: list[Tensor | None], paths: tuple[str, ...]) -> str:
    for t, p in zip(leaves, paths):
        if t is not None and not bool(torch.isfinite(t).all()):
            return p
    return "params"


def _check_group(group: Any, solver: Solver) -> None:
    if group is None:
        return
    from .distributed import _group_size

    _group_size(group)  # raises if torch.distributed is not initialized
    if isinstance(solver, (Nystrom, NystromPCG)) and solver._generator is None:
        raise ValueError(
            f"{type(solver).__name__} draws a random sketch; with `process_group` every rank "
            "must draw the same one: pass seed=... (or a seeded generator)."
        )


def _check_common(solver: Any, damping: Any) -> None:
    if not isinstance(solver, Solver):
        raise TypeError(
            f"`solver` must be a hypergradient solver such as hg.CG(), got {type(solver).__name__}."
        )
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
        raise ValueError(f"`damping` must be a number >= 0, got {damping!r}.")


@overload
def implicit(
    inner_loss: Callable[[Any, Any], Tensor],
    outer_loss: Callable[[Any, Any], Tensor],
    params: Tree,
    hparams: Tree,
    solver: Solver | None = ...,
    *,
    damping: float = ...,
    x0: Tree | Tensor | None = ...,
    return_info: Literal[False] = ...,
    batched: bool | str = ...,
    process_group: Any = ...,
    _hparams_by_reference: bool = ...,
) -> Tree: ...


@overload
def implicit(
    inner_loss: Callable[[Any, Any], Tensor],
    outer_loss: Callable[[Any, Any], Tensor],
    params: Tree,
    hparams: Tree,
    solver: Solver | None = ...,
    *,
    damping: float = ...,
    x0: Tree | Tensor | None = ...,
    return_info: Literal[True],
    batched: bool | str = ...,
    process_group: Any = ...,
    _hparams_by_reference: bool = ...,
) -> tuple[Tree, HypergradInfo]: ...


def implicit(
    inner_loss,
    outer_loss,
    params,
    hparams,
    solver=None,
    *,
    damping=0.0,
    x0=None,
    return_info=False,
    batched="auto",
    process_group=None,
    _hparams_by_reference=False,
):
    """Hypergradient of ``outer_loss`` through the minimum of ``inner_loss``.

    .. math::

        \\frac{dg}{d\\phi} = \\partial_\\phi g - \\partial^2_{\\phi\\theta} f \\,
        (H + \\lambda I)^{-1} \\nabla_\\theta g, \\qquad H = \\nabla^2_{\\theta\\theta} f

    evaluated at ``params`` (which should minimize ``inner_loss`` for the given
    ``hparams``), with ``lambda = damping`` (default 0).

    Args:
        inner_loss: ``f(params, hparams) -> scalar tensor`` (training objective).
        outer_loss: ``g(params, hparams) -> scalar tensor`` (validation objective). It may
            ignore ``hparams``; the direct term is then zero.
        params: the inner solution: a tensor, a tuple/list of tensors or a dict of tensors
            (``dict(model.named_parameters())`` with ``torch.func.functional_call``).
        hparams: hyperparameters, same kinds of structure.
        solver: how to apply ``H^{-1}``: any of :mod:`hypergradient.solvers`
            (default ``hg.CG()``).
        damping: ``lambda`` added to the Hessian's diagonal.
        x0: warm start for the solve (a tree like ``params`` or a flat vector, e.g. the
            ``info.solution`` of a previous call).
        return_info: also return a :class:`HypergradInfo`.
        batched: how batched products (Nystrom, Exact) run: one vmapped backward (True), a
            loop (False), or "auto" (default: the faster, timed on the first batch).
        process_group: a ``torch.distributed`` group (e.g. ``torch.distributed.group.WORLD``)
            for data-parallel use: each rank passes the losses of its own shard (means over
            equal-sized shards) and the same ``params``/``hparams``; the result is the
            hypergradient of the average objective, identical on every rank. One all-reduce
            per Hessian-vector product (see :mod:`hypergradient.distributed`).

    Returns:
        The hypergradient, with the structure, shapes, dtypes and device of ``hparams``,
        detached; with ``return_info=True`` a tuple ``(hypergradient, info)``.

    Cost: one evaluation of ``g`` with its gradient, one evaluation of ``f`` with a
    double-backward graph, the solver's products (each one backward pass through that
    graph, about the cost of a gradient), one mixed product; k products cost about
    ``k + 3`` gradients. Memory: the graph of ``f``'s double backward plus the solver's
    vectors. Nothing passed in is modified.

    Raises:
        TypeError / ValueError: bad structures, dtypes, non-scalar losses, bad solver.
        NonFiniteHypergradientError: the result contains NaN or Inf.
    """
    started = time.perf_counter()
    _check_callable(inner_loss, "inner_loss")
    _check_callable(outer_loss, "outer_loss")
    solver = CG() if solver is None else solver
    _check_common(solver, damping)
    _check_group(process_group, solver)
    op = HessianOperator(
        inner_loss, params, hparams, batched=batched, hparams_by_reference=_hparams_by_reference
    )
    if process_group is not None:
        check_consistent(
            op.hparam_leaves, process_group, "`hparams`", (op.param_leaves, "`params`")
        )
    return _finish(
        op,
        outer_loss,
        solver,
        float(damping),
        x0,
        return_info,
        started,
        float(torch.linalg.vector_norm(op.grad)),
        float(op.loss),
        process_group,
        op.grad,
    )


def implicit_fixed_point(
    fixed_point_map: Callable[[Any, Any], Any],
    outer_loss: Callable[[Any, Any], Tensor],
    params: Tree,
    hparams: Tree,
    solver: Solver | None = None,
    *,
    x0: Tree | Tensor | None = None,
    return_info: bool = False,
    batched: bool | str = "auto",
) -> Any:
    """Hypergradient through a fixed point ``theta* = T(theta*, phi)``.

    .. math::

        \\frac{dg}{d\\phi} = \\partial_\\phi g + (\\partial_\\phi T)^\\top x, \\qquad
        (I - \\partial_\\theta T^\\top)\\, x = \\nabla_\\theta g

    ``params`` should be (close to) a fixed point; ``info.inner_grad_norm`` reports
    ``||T(theta) - theta||``. The default solver ``hg.FixedPoint()`` iterates
    ``x <- grad_theta g + J^T x``, which converges when ``T`` is a contraction;
    ``hg.Exact()`` works for small problems. CG and Nystrom need a symmetric system and are
    refused. Examples of ``T``: one step of a training algorithm, a proximal-gradient
    step, a message-passing update (Blondel et al., 2022; Bai et al., 2019, deep
    equilibrium models).

    Args, returns and cost as :func:`implicit`, with ``fixed_point_map(params, hparams)``
    returning a tree like ``params``.
    """
    started = time.perf_counter()
    _check_callable(fixed_point_map, "fixed_point_map")
    _check_callable(outer_loss, "outer_loss")
    solver = FixedPoint() if solver is None else solver
    _check_common(solver, 0.0)
    op = FixedPointOperator(fixed_point_map, params, hparams, batched=batched)
    return _finish(
        op,
        outer_loss,
        solver,
        0.0,
        x0,
        return_info,
        started,
        float(torch.linalg.vector_norm(op.residual)),
        float("nan"),
    )


# ---------------------------------------------------------------- shorthands (seed order)


def exact(f, g, theta, phi, *, damping: float = 0.0, return_info: bool = False):
    """``implicit(f, g, theta, phi, solver=Exact())``: dense Hessian solve, the reference."""
    return implicit(f, g, theta, phi, Exact(), damping=damping, return_info=return_info)


def cg(
    f,
    g,
    theta,
    phi,
    maxiter: int = 100,
    tol: float = 1e-6,
    *,
    damping: float = 0.0,
    x0=None,
    return_info: bool = False,
):
    """``implicit(f, g, theta, phi, solver=CG(maxiter, tol))`` (Pedregosa, 2016)."""
    return implicit(
        f, g, theta, phi, CG(maxiter, tol), damping=damping, x0=x0, return_info=return_info
    )


def neumann(
    f,
    g,
    theta,
    phi,
    iters: int = 20,
    alpha: float | str = 1.0,
    *,
    damping: float = 0.0,
    return_info: bool = False,
):
    """``implicit(f, g, theta, phi, solver=Neumann(iters, alpha))`` (Lorraine et al., 2020)."""
    return implicit(
        f, g, theta, phi, Neumann(iters, alpha), damping=damping, return_info=return_info
    )


def nystrom(
    f,
    g,
    theta,
    phi,
    rank: int = 5,
    rho: float = 0.1,
    *,
    sketch: str = "column",
    seed: int | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    return_info: bool = False,
):
    """``implicit(f, g, theta, phi, solver=Nystrom(rank, rho))`` (Hataya & Yamada, 2023).

    The seed library's call ``nystrom(f, g, theta, phi, rank=5, rho=0.1)`` works as is.
    """
    solver = Nystrom(
        rank, rho, sketch=sketch, seed=seed, generator=generator, chunk_size=chunk_size
    )
    return implicit(f, g, theta, phi, solver, return_info=return_info)
