"""Pieces shared by MAML and iMAML: losses, argument checks, the inner descent, ``adapt``.

An underscore module: its members are the package's internal (but public-named) helpers.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .. import _tree
from .._tree import Tree, TreeSpec
from .._vocab import (
    ArgumentTypeError,
    HypergradientWarning,
    NonFiniteHypergradientError,
    as_callable,
    as_float,
    as_int,
    as_scalar_loss,
    first_nonfinite,
    require_finite,
)
from ..methods.growth import ADAPT_GROWTH, adaptation_failed
from ..optim.functional import FunctionalOptimizer, sgd
from ..solvers import CG, Solver
from .modules import LossFn, caller_level, check_like_module, module_loss

__all__ = [
    "LOSS_SIGNATURE",
    "NONFINITE_FIX",
    "LossFn",
    "Task",
    "adapt",
    "autograd_on",
    "caller_level",
    "check_groups",
    "constant_settings",
    "as_loss",
    "as_solver",
    "descend",
    "flatten_meta_params",
    "gradient",
    "as_inner_optimizer",
    "loss_value",
    "proximal_term",
    "refuse_learned_setting",
    "require_finite_losses",
    "require_finite_phi",
]

Task = tuple[Any, Any]

LOSS_SIGNATURE = "loss_fn(params, batch) -> scalar tensor, or an nn.Module"

NONFINITE_FIX = (
    "Check the tasks' batches and loss_fn; if the adaptation diverged, lower inner_lr (or the "
    "inner optimizer's lr) or inner_steps."
)


# ----------------------------------------------------------------------------- losses


def as_loss(model_or_loss: Any, criterion: Any) -> LossFn:
    """``loss_fn(params, batch)`` from a module (with ``criterion``) or a callable."""
    if isinstance(model_or_loss, nn.Module):
        return module_loss(model_or_loss, criterion)
    if criterion is not None:
        raise ArgumentTypeError(
            "`criterion` is only used with an nn.Module as `model_or_loss`; put it in your "
            "loss_fn instead."
        )
    return as_callable(model_or_loss, "model_or_loss", LOSS_SIGNATURE)


def loss_value(loss_fn: LossFn, params: Tree, batch: Any) -> float:
    """``float(loss_fn(params, batch))`` without a graph."""
    with torch.no_grad():
        return float(as_scalar_loss(loss_fn(params, batch), "loss_fn"))


# ----------------------------------------------------------------------------- arguments


def as_inner_optimizer(lr: Any, optimizer: Any, lr_name: str, opt_name: str) -> FunctionalOptimizer:
    """Plain gradient descent of step ``lr``, or a functional ``optimizer`` (exactly one).

    Every adaptation starts the optimizer afresh (zero buffers, step 0): a ``from_torch``
    twin's per-parameter step offsets are dropped (on a copy); its per-group learning
    rates are kept.
    """
    if (lr is None) == (optimizer is None):
        raise ValueError(
            f"Pass exactly one of `{lr_name}` (plain gradient descent) and `{opt_name}` "
            "(hg.optim.sgd(...) or hg.optim.adam(...))."
        )
    if optimizer is None:
        refuse_learned_setting(lr, lr_name)
        return sgd(lr=as_float(lr, lr_name, min=0.0, open_min=True))
    if isinstance(optimizer, tuple) and optimizer and isinstance(optimizer[0], FunctionalOptimizer):
        raise ArgumentTypeError(
            f"`{opt_name}` is a tuple, as hg.optim.from_torch(optimizer, params) returns "
            "(twin, state, step): pass its first item, from_torch(optimizer, params)[0] (every "
            "adaptation starts the twin afresh)."
        )
    if not isinstance(optimizer, FunctionalOptimizer):
        raise ArgumentTypeError(
            f"`{opt_name}` must be a functional optimizer from hypergradient.optim "
            f"(hg.optim.sgd(...), hg.optim.adam(...)), got {type(optimizer).__name__}."
        )
    for key, value in optimizer.settings.items():
        refuse_learned_setting(value, f"{opt_name}.settings['{key}']")
    if optimizer.offsets is not None:  # every adaptation starts at step 0
        optimizer = copy.copy(optimizer)
        optimizer.offsets = None
    decays = [optimizer.settings.get("weight_decay", 0.0)]  # and a twin's other param groups'
    decays += [g.get("weight_decay", 0.0) for g in optimizer.groups]
    for wd in decays:
        if isinstance(wd, Tensor) or wd != 0:
            raise ValueError(
                f"`{opt_name}` has weight_decay={wd!r}: MAML's change of variables would apply "
                "it to phi - theta and iMAML's implicit gradient would ignore it. Put the "
                "penalty in the loss instead."
            )
    return optimizer


def constant_settings(optimizer: FunctionalOptimizer) -> FunctionalOptimizer:
    """``optimizer``, or a copy with its (detached) tensor settings read as numbers: for a
    replay (``hg.unrolled``), which would take a tensor setting for a hyperparameter that is
    not among its ``hparams`` and warn. Read at each call, so in-place changes count."""
    tensors = optimizer.tensor_settings()
    if not tensors:
        return optimizer
    out = copy.copy(optimizer)
    out.settings = {**optimizer.settings, **{k: float(v) for k, v in tensors.items()}}
    return out


def check_groups(optimizer: FunctionalOptimizer, spec: TreeSpec, name: str) -> None:
    """Refuse a ``from_torch`` twin whose param groups are not one per leaf of ``name``.

    A twin's per-group settings (``group_of``) follow the parameters given to
    ``from_torch``, by position: they must be the meta-parameters' tensors, in order
    (checked: their number, and their shapes position by position).
    """
    group_of = optimizer.group_of
    if group_of is not None and len(group_of) != len(spec.paths):
        raise ValueError(
            f"The inner optimizer's param groups were given for {len(group_of)} parameters "
            f"(hg.optim.from_torch(optimizer, params)), but `{name}` has {len(spec.paths)} "
            "leaves: the groups' settings would go to the wrong tensors. Build the twin "
            f"from the optimizer's tensors of `{name}`, in its order (e.g. "
            "[dict(model.named_parameters())[k] for k in meta_params])."
        )
    shapes = optimizer.group_shapes  # as many tensors, but others (another order or layer)
    for i, (path, shape) in enumerate(zip(spec.paths, spec.shapes)):
        if group_of is not None and shapes is not None and tuple(shape) != shapes[i]:
            raise ValueError(
                "The inner optimizer's param groups were given for other tensors than "
                f"`{name}`'s, by position: `{path}` has shape {tuple(shape)}, the twin's "
                f"parameter {i} {shapes[i]}: the groups' settings would go to the wrong "
                f"tensors. Build the twin from the optimizer's tensors of `{name}`, in its "
                "order (e.g. [dict(model.named_parameters())[k] for k in meta_params])."
            )


def refuse_learned_setting(value: Any, name: str) -> None:
    """Refuse a tensor setting that requires grad: it would silently get no gradient.

    The meta-gradients are with respect to ``meta_params`` only; a learned inner learning
    rate (Meta-SGD) is a hyperparameter of the inner run: ``hg.unrolled`` differentiates it.
    """
    if isinstance(value, Tensor) and value.requires_grad:
        raise ValueError(
            f"`{name}` is a tensor that requires grad, but hg.meta differentiates with "
            "respect to meta_params only: it would get no gradient. Pass a number (or a "
            "detached tensor); to learn it (Meta-SGD), differentiate the inner run with "
            "hg.unrolled, listing it in hparams."
        )


def as_solver(solver: Any) -> Solver:
    """``solver``, or ``CG(maxiter=20, tol=1e-6)`` for None."""
    if solver is None:
        return CG(maxiter=20, tol=1e-6)
    if not isinstance(solver, Solver):
        raise ArgumentTypeError(
            f"`solver` must be a hypergradient solver such as hg.CG(), got {type(solver).__name__}."
        )
    return solver


def flatten_meta_params(
    meta_params: Tree, name: str = "meta_params", loss_fn: LossFn | None = None
) -> tuple[list[Tensor], TreeSpec]:
    """Detached leaves of ``meta_params`` (validated: floating point, one device) and spec.

    With a module's ``loss_fn`` (:func:`module_loss`), a normalization layer's running
    statistic among the keys (a ``state_dict()``) is named first: its integer counter would
    otherwise be refused for its dtype, with the advice to convert it.

    Raises:
        ValueError: a leaf holds NaN or Inf (naming it), or is a frozen ``nn.Parameter``
            (``requires_grad=False``): it would be adapted and get a meta-gradient; the
            fix is to leave it out (the module's own tensor is then used, as
            :func:`parameters_of` arranges).
    """
    module = getattr(loss_fn, "hg_module", None)
    if module is not None and isinstance(meta_params, dict):  # statistics, shapes, dtypes
        check_like_module(meta_params, module, name)
    leaves, spec = _tree.flatten(meta_params, name)
    _tree.check_leaves(leaves, spec, name)
    bad = first_nonfinite(leaves, spec.paths)
    if bad is not None:  # not the tasks' fault: say so before any loss is evaluated
        raise ValueError(
            f"{bad} contains NaN or Inf; `{name}` must be finite. Check the outer "
            "optimizer's step (lower its learning rate) or the values passed in."
        )
    for leaf, path in zip(leaves, spec.paths):
        if isinstance(leaf, nn.Parameter) and not leaf.requires_grad:
            raise ValueError(
                f"`{path}` is a frozen parameter (requires_grad=False): it would be "
                f"adapted by the inner loop and get a meta-gradient. Leave it out of `{name}` "
                "(hg.meta.parameters_of(model) does; an nn.Module then uses its own tensor)."
            )
    return [t.detach() for t in leaves], spec


def autograd_on(call: str) -> contextlib.AbstractContextManager[None]:
    """``torch.enable_grad()``, after refusing ``torch.inference_mode()``.

    Meta-gradients and adaptation differentiate the loss, so they run with autograd on
    whatever the caller's grad mode (``torch.no_grad()`` around a call is fine, as for
    ``torch.optim``'s closures). Under ``torch.inference_mode()`` autograd records nothing
    and every gradient would silently be zero, so that raises ``ValueError`` naming ``call``.
    """
    if torch.is_inference_mode_enabled():
        raise ValueError(
            f"{call} differentiates the loss, which needs autograd, but it runs under "
            "torch.inference_mode() (every gradient would be zero); call it outside "
            "inference_mode (torch.no_grad() is fine)."
        )
    return torch.enable_grad()


# ----------------------------------------------------------------------------- finiteness


def require_finite_losses(values: list[float], names: list[str], what: str, split: str) -> None:
    """Raise ``NonFiniteHypergradientError`` at the first non-finite task loss."""
    for v, name in zip(values, names):
        if not math.isfinite(v):
            quantity = f"{what} {name}"
            raise NonFiniteHypergradientError(
                f"{quantity[0].upper()}{quantity[1:]} is not finite ({v}). Check {name}'s "
                f"{split} batch and loss_fn at meta_params.",
                quantity,
            )


def require_finite_phi(phi: list[Tensor], spec: TreeSpec) -> None:
    """Raise ``NonFiniteHypergradientError`` at the first non-finite adapted parameter."""
    require_finite(
        phi,
        spec.paths,
        "The adapted value of",
        "The adaptation on the support batches diverged: lower inner_lr (or the inner "
        "optimizer's lr) or inner_steps, or check the support batches.",
    )


# ----------------------------------------------------------------------------- descent


def gradient(
    objective: Callable[[Tree], Tensor], leaves: list[Tensor], spec: TreeSpec
) -> tuple[list[Tensor], Tensor]:
    """Gradient of ``objective(tree)`` at the leaves (zeros where unused), and its value."""
    value, (grads,) = _tree.grad_at(objective, [_tree.unflatten(spec, leaves)], ["phi"], "loss_fn")
    return [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)], value


def descend(
    objective: Callable[[Tree], Tensor],
    leaves: list[Tensor],
    spec: TreeSpec,
    steps: int,
    optimizer: FunctionalOptimizer,
    start: list[float] | None = None,
) -> list[Tensor]:
    """``steps`` optimizer steps on ``objective`` from ``leaves`` (detached throughout);
    ``objective`` at ``leaves`` is appended to ``start`` if given."""
    p = [t.detach() for t in leaves]
    state = optimizer.init(p)
    for t in range(steps):
        g, value = gradient(objective, p, spec)
        if start is not None and t == 0:
            start.append(float(value))
        with torch.no_grad():
            p, state = optimizer.update(p, g, state, t)
        p = [x.detach() for x in p]
        state = [x.detach() for x in state]
    return p


def proximal_term(phi: Tree, theta: Tree) -> Tensor:
    """``||phi - theta||^2`` over the leaves (``theta`` broadcasts over stacked ``phi``)."""
    a, _ = _tree.flatten(phi, "phi")
    b, _ = _tree.flatten(theta, "theta")
    return sum(((x - y) ** 2).sum() for x, y in zip(a, b))  # type: ignore[return-value]


def adapt(
    model_or_loss: nn.Module | LossFn,
    params: Tree,
    support: Any,
    *,
    steps: int,
    lr: float | None = None,
    optimizer: FunctionalOptimizer | None = None,
    lam: float = 0.0,
    criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tree:
    """Adapt ``params`` to a task: ``steps`` optimizer steps on the support loss.

    Minimizes ``L_S(phi) + lam/2 ||phi - params||^2`` from ``phi = params`` (``lam = 0``:
    plain fine-tuning, MAML's inner loop; ``lam > 0``: iMAML's proximal inner problem),
    with gradient descent of step ``lr`` or the functional ``optimizer``
    (``hg.optim.sgd(...)``, ``hg.optim.adam(...)``).

    Args:
        model_or_loss: ``loss_fn(params, batch) -> scalar`` or an ``nn.Module``.
        params: the starting point ``theta`` (a tree of tensors); not modified.
        support: the batch of ``L_S``.
        steps: number of optimizer steps (>= 1).
        lr / optimizer: exactly one.
        lam: proximal strength (>= 0).
        criterion: loss on the module's outputs (``nn.Module`` only; default MSE).

    Returns:
        The adapted parameters, detached, with the structure of ``params``.

    Cost: ``steps`` gradients of the support loss and one loss evaluation; memory O(P).

    Warns:
        HypergradientWarning: the descent diverged: its loss ended at least
            :data:`~hypergradient.methods.growth.ADAPT_GROWTH` times its value at ``params``
            (:func:`~hypergradient.methods.growth.adaptation_failed`), or not finite.

    Raises:
        NonFiniteHypergradientError: an adapted parameter is NaN or Inf (a NaN in the
            support batch, or a diverged descent), naming the leaf.
        ValueError: ``params`` holds NaN or Inf (naming the leaf).
    """
    grad_mode = autograd_on("hg.meta.adapt()")
    loss_fn = as_loss(model_or_loss, criterion)
    steps = as_int(steps, "steps", min=1)
    opt = as_inner_optimizer(lr, optimizer, "lr", "optimizer")
    lam = as_float(lam, "lam", min=0.0)
    leaves, spec = flatten_meta_params(params, "params", loss_fn)
    check_groups(opt, spec, "params")
    theta = _tree.unflatten(spec, leaves)

    def objective(phi: Tree) -> Tensor:
        loss = loss_fn(phi, support)
        return loss + 0.5 * lam * proximal_term(phi, theta) if lam > 0 else loss

    before: list[float] = []
    with grad_mode:  # from copies: a forward that writes its weights (max_norm) writes these
        phi = descend(objective, [t.clone() for t in leaves], spec, steps, opt, before)
    require_finite(
        phi,
        spec.paths,
        "The adapted value of",
        "The descent on the support batch diverged or met NaN/Inf: lower `lr` (or the "
        "optimizer's lr) or `steps`, or check the support batch and the loss.",
    )
    with torch.no_grad():
        after = float(objective(_tree.unflatten(spec, phi)))
    if adaptation_failed(before[0], after) or not math.isfinite(after):
        warnings.warn(
            f"The adaptation diverged: its loss went from {before[0]:.3g} at the starting "
            f"parameters to {after:.3g} (at least {ADAPT_GROWTH:g}x), so the adapted "
            "parameters are no fit to the support batch. Lower the learning rate (lr, "
            "inner_lr or the optimizer's lr) or the number of steps.",
            HypergradientWarning,
            stacklevel=caller_level(),
        )
    return _tree.unflatten(spec, phi)
