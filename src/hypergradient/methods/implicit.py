"""Implicit hypergradients: differentiate the outer loss through the inner optimum.

For ``theta*(phi) = argmin_theta f(theta, phi)`` the implicit function theorem gives

    dg/dphi = d_phi g - (d^2 f / d phi d theta) H^{-1} grad_theta g,    H = d^2 f / d theta^2

evaluated at the given ``theta`` (which should be a good approximation of ``theta*``;
``info.inner_grad_norm`` tells how stationary it is). The linear system
``H x = grad_theta g`` is solved by any solver of :mod:`hypergradient.solvers`.

- :class:`Implicit` (``IFT``: the same with the hyper-optimizer's default solver) is the
  method object; :func:`implicit` and :func:`implicit_fixed_point` are the functional
  forms, and :func:`exact`, :func:`cg`, :func:`neumann`, :func:`nystrom` shorthands.

References: Bengio (2000), "Gradient-based optimization of hyperparameters"; Pedregosa
(2016), "Hyperparameter optimization with approximate gradient" (HOAG); Lorraine et al.
(2020), "Optimizing Millions of Hyperparameters by Implicit Differentiation", AISTATS;
Blondel et al. (2022), "Efficient and modular implicit differentiation".
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import _tree
from .._tree import Tree
from .._vocab import HypergradientWarning, as_bool, as_callable, as_choice, as_float, as_int
from ..operators import FixedPointOperator
from ..solvers import CG, AutoDamping, Exact, FixedPoint, Neumann, Nystrom, Solver
from ._checks import BATCHED, check_arity, check_inputs
from .base import Problem
from .formula import ImplicitInfo, implicit_hypergradient
from .implicit_base import as_hvp, as_solver
from .implicit_methods import IFT, Implicit

__all__ = [
    "HypergradInfo",
    "IFT",
    "Implicit",
    "ImplicitInfo",
    "cg",
    "exact",
    "implicit",
    "implicit_fixed_point",
    "neumann",
    "nystrom",
]

HypergradInfo = ImplicitInfo  # the name before the method layer; kept as an alias

#: Default ``stationarity`` ratio of :func:`implicit` (see its docstring).
STATIONARITY = 0.05


def implicit(
    inner_loss: Callable[[Any, Any], Tensor],
    outer_loss: Callable[[Any, Any], Tensor],
    params: Tree,
    hparams: Tree,
    solver: Solver | None = None,
    *,
    damping: float | str | AutoDamping = 0.0,
    x0: Tree | Tensor | None = None,
    return_info: bool = False,
    batched: bool | str = "auto",
    process_group: Any = None,
    hparams_by_reference: bool = False,
    hvp: str = "auto",
    stationarity: float | None = STATIONARITY,
    residual: bool = True,
) -> Any:
    """Hypergradient of ``outer_loss`` through the minimum of ``inner_loss``.

    .. math::

        \\frac{dg}{d\\phi} = \\partial_\\phi g - \\partial^2_{\\phi\\theta} f \\,
        (H + \\lambda I)^{-1} \\nabla_\\theta g, \\qquad H = \\nabla^2_{\\theta\\theta} f

    evaluated at ``params`` (which should minimize ``inner_loss`` for the given
    ``hparams``), with ``lambda = damping`` (default 0). Builds a :class:`Problem` and
    calls :class:`Implicit`.

    Args:
        inner_loss: ``f(params, hparams) -> scalar tensor`` (training objective).
        outer_loss: ``g(params, hparams) -> scalar tensor`` (validation objective). It may
            ignore ``hparams``; the direct term is then zero.
        params: the inner solution: a tensor, a tuple/list of tensors or a dict of tensors
            (``dict(model.named_parameters())`` with ``torch.func.functional_call``).
        hparams: hyperparameters, same kinds of structure.
        solver: how to apply ``H^{-1}``: any of :mod:`hypergradient.solvers`
            (default ``hg.CG()``).
        damping: ``lambda`` added to the Hessian's diagonal, or ``"auto"``: chosen from a
            Lanczos estimate of the extreme eigenvalues (``maxiter=20`` products; biased,
            see :class:`~hypergradient.solvers.AutoDamping`); ``info.stats["damping"]``
            is the damping used.
        x0: warm start for the solve (a tree like ``params`` or a flat vector, e.g. the
            ``info.solution`` of a previous call).
        return_info: also return an :class:`ImplicitInfo`.
        batched: how batched products (Nystrom, Exact) run: one vmapped backward (True), a
            loop (False), or "auto" (default: the faster, timed on the first batch).
        process_group: a ``torch.distributed`` group for data-parallel use: each rank
            passes the losses of its own shard (means over equal-sized shards) and the
            same ``params``/``hparams``/solver; the result is the hypergradient of the
            average objective, identical on every rank. One all-reduce per product.
        hparams_by_reference: the losses read the ``hparams`` tensors themselves (leaves
            with ``requires_grad=True``, e.g. held by a criterion) instead of their
            argument; the hypergradient is then taken with respect to those tensors.
        hvp: the product mode, as :class:`Implicit` (``"first_order"`` for models whose
            kernels have no double backward; ``"auto"`` falls back to it by itself).
        stationarity: warn (``HypergradientWarning``) when ``||grad_theta f|| > stationarity
            * ||grad_theta g||``: ``params`` is then too far from a minimum of
            ``inner_loss`` for the implicit formula (measured on logistic regression: above
            0.05 the hypergradient's relative error was 0.2 to 1; see
            ``tests/test_implicit_warnings.py``). None: no check.
        residual: when the solver does not report ``||b - A x||`` (fixed budgets:
            ``hg.Neumann(k)``, ``hg.Identity``), compute it with one more product for
            ``info.residual_norm`` (default). False: skip it (``residual_norm`` None), so
            that a call costs exactly the solver's products, and with it the checks that
            read it: a fixed budget's answer worse than ``x = 0`` (or a series stopped at
            ``maxiter`` far from its ``tol``) is then not warned about.

    Returns:
        The hypergradient, with the structure, shapes, dtypes and device of ``hparams``,
        detached; with ``return_info=True`` a tuple ``(hypergradient, info)``.

    Cost: ``k`` solver products cost about ``k + 3`` gradients (``f``'s graph, ``g``'s
    gradient, the mixed product). Memory: ``f``'s double-backward graph plus the
    solver's vectors. Nothing passed in is modified.

    Raises:
        TypeError / ValueError: bad structures, dtypes, non-scalar losses, bad solver,
            NaN in ``hparams``.
        NonFiniteHypergradientError: a quantity of the computation is NaN or Inf (the
            message names the first one).
    """
    as_callable(inner_loss, "inner_loss", "(params, hparams) -> scalar tensor")
    as_callable(outer_loss, "outer_loss", "(params, hparams) -> scalar tensor")
    return_info = as_bool(return_info, "return_info")
    ratio = None if stationarity is None else as_float(stationarity, "stationarity", min=0.0)
    method = Implicit(solver, damping, batched=batched, hvp=hvp, residual=residual)
    problem = Problem(
        inner_loss,
        outer_loss,
        params,
        hparams,
        process_group=process_group,
        hparams_by_reference=as_bool(hparams_by_reference, "hparams_by_reference"),
    )
    result, info = method(problem, x0=x0)
    if ratio is not None:
        warn_not_stationary(info, ratio, "the gradient of inner_loss at `params`")
    return (result, info) if return_info else result


def warn_not_stationary(
    info: ImplicitInfo,
    ratio: float,
    what: str,
    advice: str | None = None,
    stacklevel: int = 3,
) -> None:
    """Warn when ``info.inner_grad_norm > ratio * info.outer_grad_norm``.

    Also requires the inner norm to exceed ``sqrt(eps) (1 + |f|)`` (float64's ``eps``) and
    ``info.inner_grad_floor`` (the gradient's rounding level in the dtype it was computed
    in: ``8 eps ||H|| ||theta||``, :func:`~hypergradient.methods.implicit_info.gradient_floor`),
    so that rounding noise at a minimum (float32, bfloat16, float16 models at their rounded
    minimum) never warns when the outer gradient vanishes. ``what`` names
    the inner gradient; ``advice`` replaces the default explanation and fix (a caller with
    its own arguments: ``hg.meta.IMAML``).
    """
    inner, outer = info.inner_grad_norm, info.outer_grad_norm
    loss = info.inner_loss if math.isfinite(info.inner_loss) else 0.0
    if not (math.isfinite(inner) and inner > ratio * outer and inner > 1.5e-8 * (1.0 + abs(loss))):
        return
    # the rounding floor last: reading it costs a host synchronization (ImplicitInfo)
    if inner > (getattr(info, "inner_grad_floor", 0.0) or 0.0):
        advice = advice or (
            "`params` is not a minimum of the inner problem, and the implicit hypergradient "
            "can be far off (measured: 20-100 % relative error on logistic regression). Train "
            "the inner problem further before the call, or pass stationarity=None to skip "
            "this check."
        )
        rel = "while the outer gradient is 0 (the"
        if outer > 0:
            rel = f"{inner / outer:.3g} times that of the outer gradient ({outer:.3g}; the"
        warnings.warn(
            f"{what} has norm {inner:.3g}, {rel} check warns above stationarity={ratio:g}): "
            f"{advice}",
            HypergradientWarning,
            stacklevel=stacklevel,
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
    hvp: str = "auto",
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
    returning a tree like ``params``; the same formula (the one implementation) with the
    operator ``I - J^T``. ``hvp``: ``"auto"``, ``"double"`` or ``"double_math"`` (the
    products ``J^T v`` need a reverse pass: there is no first-order mode).
    """
    started = time.perf_counter()
    as_callable(fixed_point_map, "fixed_point_map", "(params, hparams) -> tree like params")
    check_arity(fixed_point_map, 2, "fixed_point_map", "(params, hparams)", "")
    as_callable(outer_loss, "outer_loss", "(params, hparams) -> scalar tensor")
    check_arity(outer_loss, 2, "outer_loss", "(params, hparams)", "It may ignore `hparams`.")
    return_info = as_bool(return_info, "return_info")
    solver = FixedPoint() if solver is None else as_solver(solver)
    batched = as_choice(batched, "batched", BATCHED)
    mode = as_hvp(hvp)
    if mode == "first_order":
        raise ValueError(
            "implicit_fixed_point has no `hvp`='first_order': its products J^T v need a "
            "reverse pass, which central differences of the map (J v) cannot give. Use "
            "hvp='double_math' (or 'auto') for kernels without double backward."
        )
    inputs = check_inputs(params, hparams)
    p = inputs.param_leaves
    flat = None
    if x0 is not None:
        dtype = _tree.accumulator_dtype(p)
        flat = _tree.as_flat(x0, inputs.param_spec, "x0", dtype, p[0].device)
    result, info = implicit_hypergradient(
        lambda: FixedPointOperator(fixed_point_map, params, hparams, batched=batched, mode=mode),
        outer_loss,
        inputs,
        solver,
        method="implicit_fixed_point",
        x0=flat,
        started=started,
    )
    return (result, info) if return_info else result


# ---------------------------------------------------------------- shorthands (seed order)


def exact(
    f: Callable[..., Tensor],
    g: Callable[..., Tensor],
    theta: Tree,
    phi: Tree,
    *,
    damping: float = 0.0,
    return_info: bool = False,
) -> Any:
    """``implicit(f, g, theta, phi, solver=Exact())``: dense Hessian solve, the reference."""
    return implicit(f, g, theta, phi, Exact(), damping=damping, return_info=return_info)


def cg(
    f: Callable[..., Tensor],
    g: Callable[..., Tensor],
    theta: Tree,
    phi: Tree,
    maxiter: int = 100,
    tol: float = 1e-6,
    *,
    damping: float = 0.0,
    x0: Tree | None = None,
    return_info: bool = False,
) -> Any:
    """``implicit(f, g, theta, phi, solver=CG(maxiter, tol))`` (Pedregosa, 2016).

    The sixth argument is the relative tolerance, in ``[0, 1)``; hypergrad's
    ``conjugate_gradient`` took its ``lr`` there (1.0 by default), which as a tolerance is met
    by ``x = 0`` and is refused.
    """
    return implicit(
        f, g, theta, phi, CG(maxiter, tol), damping=damping, x0=x0, return_info=return_info
    )


def neumann(
    f: Callable[..., Tensor],
    g: Callable[..., Tensor],
    theta: Tree,
    phi: Tree,
    iters: int = 20,
    alpha: float | str = 1.0,
    *,
    damping: float = 0.0,
    return_info: bool = False,
) -> Any:
    """``implicit(f, g, theta, phi, solver=Neumann(iters, alpha))`` (Lorraine et al., 2020)."""
    iters = as_int(iters, "iters", min=1)  # (Neumann would name it `maxiter`)
    return implicit(
        f, g, theta, phi, Neumann(iters, alpha), damping=damping, return_info=return_info
    )


def nystrom(
    f: Callable[..., Tensor],
    g: Callable[..., Tensor],
    theta: Tree,
    phi: Tree,
    rank: int = 5,
    rho: float = 0.1,
    *,
    sketch: str = "column",
    seed: int | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    return_info: bool = False,
) -> Any:
    """``implicit(f, g, theta, phi, solver=Nystrom(rank, rho))`` (Hataya & Yamada, 2023).

    The seed library's call ``nystrom(f, g, theta, phi, rank=5, rho=0.1)`` works as is.
    """
    solver = Nystrom(
        rank, rho, sketch=sketch, seed=seed, generator=generator, chunk_size=chunk_size
    )
    return implicit(f, g, theta, phi, solver, return_info=return_info)
