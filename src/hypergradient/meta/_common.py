"""Pieces shared by MAML and iMAML: losses, argument checks, the inner descent, ``adapt``.

An underscore module: its members are the package's internal (but public-named) helpers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .. import _tree
from .._tree import Tree, TreeSpec
from .._vocab import (
    ArgumentTypeError,
    NonFiniteHypergradientError,
    as_bool,
    as_callable,
    as_float,
    as_int,
    as_scalar_loss,
    require_finite,
)
from ..optim.functional import FunctionalOptimizer, sgd
from ..solvers import CG, Solver

__all__ = [
    "LOSS_SIGNATURE",
    "NONFINITE_FIX",
    "LossFn",
    "Task",
    "adapt",
    "autograd_on",
    "as_loss",
    "as_solver",
    "descend",
    "flatten_meta_params",
    "gradient",
    "as_inner_optimizer",
    "loss_value",
    "module_loss",
    "parameters_of",
    "proximal_term",
    "refuse_learned_setting",
    "require_finite_losses",
    "require_finite_phi",
    "running_stats_off",
]

LossFn = Callable[[Any, Any], Tensor]
Task = tuple[Any, Any]

LOSS_SIGNATURE = "loss_fn(params, batch) -> scalar tensor, or an nn.Module"

NONFINITE_FIX = (
    "Check the tasks' batches and loss_fn; if the adaptation diverged, lower inner_lr (or the "
    "inner optimizer's lr) or inner_steps."
)


# ----------------------------------------------------------------------------- losses


def module_loss(
    model: nn.Module, criterion: Callable[[Tensor, Tensor], Tensor] | None = None
) -> LossFn:
    """``loss_fn(params, (inputs, targets))`` of a module, through ``functional_call``.

    ``loss_fn(params, (x, y)) = criterion(torch.func.functional_call(model, params, (x,)), y)``
    with ``params`` a dict name -> tensor (see :func:`parameters_of`); the module's own
    parameters are not used, only its architecture (and its buffers). ``criterion(outputs,
    targets)`` defaults to ``torch.nn.functional.mse_loss``. Cost: one forward pass.

    The module is not modified: a normalization layer in training mode (``BatchNorm`` with
    ``track_running_stats``) normalizes with the batch's statistics, as in training, but
    its running statistics are not updated (:func:`running_stats_off`); in eval mode it
    uses them. Random layers (dropout) draw from torch's global generator.

    Raises:
        ArgumentTypeError: ``model`` is not an ``nn.Module`` or ``criterion`` not callable.
    """
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    crit = torch.nn.functional.mse_loss if criterion is None else criterion
    crit = as_callable(crit, "criterion", "criterion(outputs, targets) -> scalar tensor")

    def loss_fn(params: Any, batch: Any) -> Tensor:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ArgumentTypeError(
                "With an nn.Module, each batch (support or query) must be a pair "
                f"(inputs, targets); got {type(batch).__name__}."
            )
        inputs, targets = batch
        if isinstance(params, dict):
            params = {**params, **running_stats_off(model)}
        return crit(torch.func.functional_call(model, params, (inputs,)), targets)

    return loss_fn


RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def running_stats_off(model: nn.Module) -> dict[str, Tensor | None]:
    """The running-statistics buffers a forward pass would update, mapped to stand-ins.

    A normalization layer in training mode with ``track_running_stats`` (``BatchNorm``,
    ``InstanceNorm``) normalizes with the batch's statistics and updates its running
    statistics in place. Meta-gradients and adaptation evaluate the loss many times (inner
    steps, their replay, diagnostics), so the updates would pile up in the module, and under
    ``vmap`` (``vectorize=True``) torch refuses them. Passed to ``functional_call``, None
    statistics make such a layer normalize with the batch's statistics (the same outputs)
    and leave its buffers untouched; the batch counter ``num_batches_tracked`` becomes a
    throwaway copy (``SyncBatchNorm`` requires one). Layers in eval mode keep (and use)
    their buffers.
    """
    off: dict[str, Tensor | None] = {}
    for prefix, module in model.named_modules():
        if not (module.training and getattr(module, "track_running_stats", False) is True):
            continue
        for name, buf in module.named_buffers(recurse=False):
            if name in RUNNING_STATS and buf is not None:
                key = f"{prefix}.{name}" if prefix else name
                off[key] = buf.detach().clone() if name == "num_batches_tracked" else None
    return off


def parameters_of(model: nn.Module, *, copy: bool = False) -> dict[str, Tensor]:
    """The module's trained parameters as a dict name -> tensor: a ``meta_params`` to train.

    Frozen parameters (``requires_grad=False``) are left out: :func:`module_loss` then uses
    the module's own tensors for them, so the inner loop does not adapt them and an outer
    optimizer built on the dict does not train them (shared parameters appear once, under
    their first name, as in ``named_parameters()``).

    With ``copy=False`` (the default) the tensors are the module's own parameters, detached:
    they share the parameters' storage, so an optimizer that steps them (in place, as every
    ``torch.optim`` optimizer does) trains the module itself. This is what a meta-training
    loop wants::

        theta = hg.meta.parameters_of(model)          # the model's own parameters
        opt = torch.optim.Adam(theta.values(), lr=1e-3)
        for tasks in meta_batches:
            grad, info = maml.step(theta, tasks)
            for k in theta:
                theta[k].grad = grad[k]
            opt.step()                                # updates model.parameters()

    With ``copy=True`` they are independent copies (a snapshot of the initialization that
    later training of either side leaves alone). The meta-gradient functions never modify
    ``meta_params`` and never build a graph to them, in either case.

    Raises:
        ArgumentTypeError: ``model`` is not an ``nn.Module`` or ``copy`` not a bool.
        ValueError: every parameter of ``model`` is frozen.
    """
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    copy = as_bool(copy, "copy")
    trained = {
        k: (v.detach().clone() if copy else v.detach())
        for k, v in model.named_parameters()
        if v.requires_grad
    }
    if not trained and any(True for _ in model.parameters()):
        raise ValueError(
            "Every parameter of `model` is frozen (requires_grad=False), so it has nothing "
            "to meta-train; unfreeze the ones to learn (model.requires_grad_(True))."
        )
    return trained


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
    """Plain gradient descent of step ``lr``, or a functional ``optimizer`` (exactly one)."""
    if (lr is None) == (optimizer is None):
        raise ValueError(
            f"Pass exactly one of `{lr_name}` (plain gradient descent) and `{opt_name}` "
            "(hg.optim.sgd(...) or hg.optim.adam(...))."
        )
    if optimizer is None:
        refuse_learned_setting(lr, lr_name)
        return sgd(lr=as_float(lr, lr_name, min=0.0, open_min=True))
    if not isinstance(optimizer, FunctionalOptimizer):
        raise ArgumentTypeError(
            f"`{opt_name}` must be a functional optimizer from hypergradient.optim "
            f"(hg.optim.sgd(...), hg.optim.adam(...)), got {type(optimizer).__name__}."
        )
    for key, value in optimizer.settings.items():
        refuse_learned_setting(value, f"{opt_name}.settings['{key}']")
    wd = optimizer.settings.get("weight_decay", 0.0)
    if isinstance(wd, Tensor) or wd != 0:
        raise ValueError(
            f"`{opt_name}` has weight_decay={wd!r}: MAML's change of variables would apply it "
            "to phi - theta and iMAML's implicit gradient would ignore it. Put the penalty in "
            "the loss instead."
        )
    return optimizer


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
    meta_params: Tree, name: str = "meta_params"
) -> tuple[list[Tensor], TreeSpec]:
    """Detached leaves of ``meta_params`` (validated: floating point, one device) and spec.

    Raises:
        ValueError: a leaf is a frozen ``nn.Parameter`` (``requires_grad=False``): it would
            be adapted and get a meta-gradient; the fix is to leave it out (the module's own
            tensor is then used, as :func:`parameters_of` arranges).
    """
    leaves, spec = _tree.flatten(meta_params, name)
    _tree.check_leaves(leaves, spec, name)
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
) -> list[Tensor]:
    """``steps`` optimizer steps on ``objective`` from ``leaves`` (detached throughout)."""
    p = [t.detach() for t in leaves]
    state = optimizer.init(p)
    for t in range(steps):
        g, _ = gradient(objective, p, spec)
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

    Cost: ``steps`` gradients of the support loss; memory O(P).
    """
    grad_mode = autograd_on("hg.meta.adapt()")
    loss_fn = as_loss(model_or_loss, criterion)
    steps = as_int(steps, "steps", min=1)
    opt = as_inner_optimizer(lr, optimizer, "lr", "optimizer")
    lam = as_float(lam, "lam", min=0.0)
    leaves, spec = flatten_meta_params(params, "params")
    theta = _tree.unflatten(spec, leaves)

    def objective(phi: Tree) -> Tensor:
        loss = loss_fn(phi, support)
        return loss + 0.5 * lam * proximal_term(phi, theta) if lam > 0 else loss

    with grad_mode:
        return _tree.unflatten(spec, descend(objective, leaves, spec, steps, opt))
