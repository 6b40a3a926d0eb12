"""Argument checks of the HippoTrainer compat layer (through :mod:`hypergradient._vocab`).

Besides the usual type and range checks, :func:`find_stale_capture` detects the one
mistake HippoTrainer's own demo makes: a value computed *once* from a hyperparameter
(``lambd = theta.exp()``) and held by the criterion. Such a tensor never changes when
``theta`` is updated, so HippoTrainer silently never tuned it; here every hyper-step would
backpropagate through its single, already freed graph ("Trying to backward through the
graph a second time"). It is found by walking the objects the model and the criterion
hold and following each non-leaf tensor's autograd graph back to its leaves.
"""

from __future__ import annotations

import contextlib
import functools
import re
import types
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..._vocab import ArgumentTypeError, HypergradientWarning, as_callable, as_float
from ._autograd import criterion_loss, graph_leaves

__all__ = [
    "unused_in_hippotrainer_terms",
    "unused_message",
    "as_hyper_lr",
    "check_hyperparams",
    "check_optimizer",
    "check_setup",
    "find_stale",
    "find_stale_capture",
    "reads_by_reference",
    "stale_capture_message",
    "trained_lr",
]

_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # attributes every nn.Module has
_MAX_DEPTH = 6


def check_setup(
    model: Any, optimizer: Any, train_loader: Any, val_loader: Any, criterion: Any
) -> None:
    """The training set-up HippoTrainer's constructor takes: all required, right types."""
    for name, value in (
        ("model", model),
        ("optimizer", optimizer),
        ("train_loader", train_loader),
        ("val_loader", val_loader),
        ("criterion", criterion),
    ):
        if value is None:
            raise ValueError(f"`{name}` is required (HippoTrainer's defaults of None do not run).")
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ArgumentTypeError(
            f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}."
        )
    as_callable(criterion, "criterion", "(predictions, targets) -> scalar loss")
    for name, loader in (("train_loader", train_loader), ("val_loader", val_loader)):
        if not hasattr(loader, "__iter__"):
            raise ArgumentTypeError(
                f"`{name}` must be an iterable of (inputs, targets) batches, such as a "
                f"DataLoader or a list, got {type(loader).__name__}."
            )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("`model` has no trainable parameters (none requires grad).")
    stepped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if not any(p.requires_grad and id(p) in stepped for p in model.parameters()):
        raise ValueError(
            "`optimizer` trains none of the model's parameters that require grad; build it "
            "from model.parameters()."
        )


def check_hyperparams(hyperparams: Any, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """``{name: floating-point leaf tensor}`` on the model's device, not a model parameter
    that ``optimizer`` trains (a model parameter left out of the optimizer, e.g. a gate
    coefficient, is a hyperparameter the model holds: accepted)."""
    if not isinstance(hyperparams, (Mapping, nn.ParameterDict)) or not len(hyperparams):
        raise ArgumentTypeError(
            "`hyperparams` must be a non-empty dict {name: tensor} (or nn.ParameterDict), got "
            f"{type(hyperparams).__name__}."
        )
    stepped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    params = {id(p): n for n, p in model.named_parameters() if id(p) in stepped}
    device = next(iter(model.parameters())).device
    for name, h in hyperparams.items():
        where = f"hyperparams[{name!r}]"
        if not isinstance(h, Tensor) or not h.is_floating_point():
            raise ArgumentTypeError(f"{where} must be a floating-point tensor, got {h!r}.")
        if not h.is_leaf:
            raise ValueError(
                f"{where} is not a leaf tensor (it is computed from another tensor, grad_fn="
                f"{type(h.grad_fn).__name__}). Pass the tensor it is computed from, created "
                "with torch.tensor(...), and compute the derived value inside the criterion's "
                "forward."
            )
        if id(h) in params:
            raise ValueError(
                f"{where} is the model parameter {params[id(h)]!r}, which `optimizer` trains; a "
                "hyperparameter must not be trained: build the optimizer without it (e.g. from "
                "the other named_parameters()), or use a separate tensor."
            )
        if h.device != device:
            raise ValueError(
                f"{where} is on {h.device} and the model on {device}; put them on one device."
            )


def check_optimizer(hyperparams: dict[str, Tensor], optimizer: torch.optim.Optimizer) -> None:
    """No hyperparameter is trained by ``optimizer`` or is one of its settings (a tensor
    ``lr``): the compat classes differentiate the criterion only, so a setting's
    hypergradient would silently be zero; a trained one would also be stepped by the
    optimizer (inside DRMAD's training steps, where it requires grad)."""
    for name, h in hyperparams.items():
        for i, group in enumerate(optimizer.param_groups):
            if any(p is h for p in group["params"]):
                raise ValueError(
                    f"hyperparams[{name!r}] is trained by `optimizer` (param_groups[{i}]); a "
                    "hyperparameter must not be: build the optimizer from model.parameters()."
                )
            setting = next((k for k, v in group.items() if k != "params" and v is h), None)
            if setting is not None:
                raise ValueError(
                    f"hyperparams[{name!r}] is the optimizer's `{setting}` (param_groups[{i}]): "
                    "these classes treat the optimizer's settings as constants (its "
                    "hypergradient would be 0; HippoTrainer does not support tuning them). "
                    f"Tune it with hg.HyperOptimizer(..., optimizer_hparams={{{setting!r}: "
                    f"{name!r}}}, method=hg.Unrolled())."
                )


def trained_lr(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> float:
    """The learning rate of the first param group holding a trained parameter (> 0).

    A group of frozen parameters (``requires_grad=False``) or of parameters the model does
    not hold says nothing about the steps the trained weights take, whatever its place.
    """
    trained = {id(p) for p in params}
    groups = optimizer.param_groups
    i = next((i for i, g in enumerate(groups) if any(id(p) in trained for p in g["params"])), 0)
    return as_float(
        groups[i]["lr"],
        f"optimizer.param_groups[{i}]['lr']",
        min=0.0,
        open_min=True,
        hint=" The hypergradient's look-ahead and series step is the inner learning rate.",
    )


def as_hyper_lr(value: Any, hyperparams: dict[str, Tensor]) -> float | Tensor:
    """HippoTrainer's ``hyper_lr``: a number >= 0, or a tensor of them (one per coordinate).

    A multi-element tensor must broadcast to every hyperparameter's shape, as HippoTrainer's
    ``h -= hyper_lr * grad`` requires.
    """
    hint = " `hyper_lr` is the step of h <- h - hyper_lr * hypergradient."
    if not isinstance(value, Tensor) or value.numel() == 1:
        return as_float(value, "hyper_lr", min=0.0, hint=hint)
    if value.dtype == torch.bool or not value.is_floating_point():
        raise ArgumentTypeError(f"`hyper_lr` must be a floating-point tensor, got {value.dtype}.")
    lr = value.detach().clone()
    if not bool(torch.isfinite(lr).all()) or bool((lr < 0).any()):
        raise ValueError(f"`hyper_lr` must hold finite numbers >= 0, got {lr}.{hint}")
    for name, h in hyperparams.items():
        try:
            ok = torch.broadcast_shapes(lr.shape, h.shape) == h.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"`hyper_lr` of shape {tuple(lr.shape)} does not broadcast to "
                f"hyperparams[{name!r}] of shape {tuple(h.shape)}.{hint}"
            )
    return lr


# ----------------------------------------------------------------------- stale captures


def _module_children(obj: nn.Module, path: str) -> Iterator[tuple[str, Any]]:
    for k, v in vars(obj).items():
        if k not in _MODULE_INTERNALS:
            yield f"{path}.{k}", v
    for k, v in [*obj._buffers.items(), *obj._modules.items()]:
        yield f"{path}.{k}", v


def _function_children(obj: types.FunctionType, path: str) -> Iterator[tuple[str, Any]]:
    for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or ()):
        try:
            yield f"{path}:{name}", cell.cell_contents
        except ValueError:  # an empty cell
            continue
    code = obj.__code__
    defaults = obj.__defaults__ or ()
    named = code.co_varnames[code.co_argcount - len(defaults) : code.co_argcount]
    for name, value in [*zip(named, defaults), *(obj.__kwdefaults__ or {}).items()]:
        yield f"{path}:{name}", value  # default arguments (`def crit(o, t, lam=lam)`)
    for name in obj.__code__.co_names:  # globals the function reads (a notebook's lambd)
        if name in obj.__globals__:
            yield name, obj.__globals__[name]


def _children(obj: Any, path: str) -> Iterator[tuple[str, Any]]:
    """The objects ``obj`` holds that may hold tensors, with readable paths."""
    if isinstance(obj, nn.Module) or _is_instance(obj):  # the class's own data attributes
        own = vars(type(obj)).items()
        yield from ((f"{path}.{k}", v) for k, v in own if isinstance(v, (Tensor, dict, list)))
    if isinstance(obj, nn.Module):
        yield from _module_children(obj, path)
    elif isinstance(obj, dict):
        yield from ((f"{path}[{k!r}]", v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        yield from ((f"{path}[{i}]", v) for i, v in enumerate(obj))
    elif isinstance(obj, functools.partial):
        yield f"{path}.func", obj.func
        yield from _children(tuple(obj.args), f"{path}.args")
        yield from _children(dict(obj.keywords), f"{path}.keywords")
    elif isinstance(obj, types.MethodType):
        yield path, obj.__self__
        yield path, obj.__func__
    elif isinstance(obj, types.FunctionType):
        yield from _function_children(obj, path)
    elif _is_instance(obj):
        # an instance of a user class (a callable criterion object)
        yield from ((f"{path}.{k}", v) for k, v in vars(obj).items())


def _is_instance(obj: Any) -> bool:
    """An instance of a user class (a callable criterion object), not a function or type."""
    plain = (type, types.ModuleType, types.FunctionType, types.MethodType, functools.partial)
    return hasattr(obj, "__dict__") and not isinstance(obj, plain)


def _tensors(root: Any, path: str) -> Iterator[tuple[str, Tensor]]:
    seen: set[int] = set()
    stack = [(root, path, 0)]
    while stack:
        obj, where, depth = stack.pop()
        if id(obj) in seen or depth > _MAX_DEPTH:
            continue
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            yield where, obj
            continue
        for child_path, child in _children(obj, where):
            stack.append((child, child_path, depth + 1))


def _reaches(t: Tensor, targets: dict[int, str]) -> str | None:
    """The name of the first target leaf ``t``'s autograd graph reaches, if any."""
    found = graph_leaves([t], set(targets), first=True)[0]
    return next((targets[i] for i in found), None)


def find_stale_capture(
    hyperparams: dict[str, Tensor], **roots: Any
) -> tuple[str, str, Tensor] | None:
    """A tensor held by one of ``roots`` and computed once from a hyperparameter.

    Returns ``(path, hyperparameter name, tensor)`` for the first non-leaf tensor (one with
    a ``grad_fn``) whose graph reaches one of ``hyperparams``, or None. ``roots`` are named
    objects (``model=..., criterion=...``); their attributes, containers, closures and the
    globals their functions read are searched to a small depth.
    """
    targets = {id(h): name for name, h in hyperparams.items()}
    for root_name, root in roots.items():
        for path, t in _tensors(root, root_name):
            if t.grad_fn is None:
                continue
            name = _reaches(t, targets)
            if name is not None:
                return path, name, t
    return None


def find_stale(
    hyperparams: dict[str, Tensor], model: nn.Module, criterion: Any, loader: Any
) -> tuple[str, str, Tensor] | None:
    """:func:`find_stale_capture` on the model and the criterion, confirmed by one forward.

    A tensor the criterion (or the model) recomputes at every call and keeps as an
    attribute (``self.lam = self.theta.exp()`` in ``forward``, for logging) also carries a
    graph to the hyperparameter after a forward pass made before construction; it is not
    stale. So a tensor found is confirmed by evaluating the criterion once on the first
    batch of ``loader`` without a graph (buffers copied, the RNG state restored): a value
    recomputed in ``forward`` is then replaced by one without a graph, a value computed
    once is still there. A one-pass loader (an iterator) is not read: the tensor found is
    reported.
    """
    stale = find_stale_capture(hyperparams, criterion=criterion, model=model)
    if stale is not None and _forward_once(model, criterion, loader):
        stale = find_stale_capture(hyperparams, criterion=criterion, model=model)
    return stale


def _forward_once(model: nn.Module, criterion: Any, loader: Any) -> bool:
    """The criterion on the first batch of ``loader``, without a graph; whether it ran."""
    if isinstance(loader, Iterator):
        return False  # one pass (a generator): its first batch is not to be spent here
    try:
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            batch = next(iter(loader))  # (a DataLoader draws its shuffling seed here)
            params: dict[str, Tensor] = dict(model.named_parameters())
            criterion_loss(model, criterion, batch)(params, None)
    except Exception:  # the set-up's own errors surface at the first hyper-step
        return False
    return True


def stale_capture_message(path: str, name: str, t: Tensor) -> str:
    """What :func:`find_stale_capture` found, why it cannot work, and the fix."""
    return (
        f"{path} was computed once from hyperparams[{name!r}] before training (it carries "
        f"an autograd graph back to it, grad_fn={type(t.grad_fn).__name__}). A value "
        f"computed once does not change when {name!r} is updated: HippoTrainer silently "
        "never tuned it, and here every hyper-step would backpropagate through that one "
        "stale graph again. Compute it inside the criterion's forward instead: hold the "
        f"hyperparameter itself (e.g. `self.{name} = {name}`) and write e.g. "
        f"`{name}.exp()` in forward()."
    )


def reads_by_reference(
    model: nn.Module, criterion: Any, batch: Any, names: list[str], params: list[Tensor]
) -> str | None:
    """The name of a trained parameter the criterion (or the model) reads through a
    reference of its own, or None.

    The hyper-steps evaluate ``criterion(model(inputs), targets)`` at copies of the
    weights swapped into the model's attributes (``torch.func.functional_call``). A tensor
    read through another reference (``weights = list(model.parameters())`` made before
    training and summed in the criterion) is not swapped: the copies' loss still depends on
    the real parameter, which is what this finds, by evaluating the loss once at detached
    copies and following its graph to the parameters (they require grad).
    """
    leaves = {k: p.detach() for k, p in zip(names, params)}
    with torch.enable_grad():
        loss = criterion_loss(model, criterion, batch)(leaves, None)
    if not isinstance(loss, Tensor) or loss.grad_fn is None:
        return None
    return _reaches(loss, {id(p): k for k, p in zip(names, params)})


_UNUSED = re.compile(r"hparams\[(\d+)\] influences the outer loss neither")


@contextlib.contextmanager
def unused_in_hippotrainer_terms(names: list[str]) -> Iterator[None]:
    """The core's warning that a hyperparameter reaches neither loss ("hparams[0] ...
    Check that inner_loss or outer_loss uses it"), in HippoTrainer's terms: its name in
    ``hyperparams`` and the criterion or model that should read it. Other warnings pass
    unchanged."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HypergradientWarning)
        yield
    for w in caught:
        text, match = str(w.message), _UNUSED.match(str(w.message))
        if match is not None and issubclass(w.category, HypergradientWarning):
            text = unused_message(names[int(match.group(1))])
        elif not issubclass(w.category, HypergradientWarning):  # caught at every call
            key = (text, w.category, w.filename, w.lineno)  # (registries reset): shown once
            if key in _SHOWN:
                continue
            _SHOWN.add(key)
        warnings.warn_explicit(text, w.category, w.filename, w.lineno)


_SHOWN: set[tuple[str, type, str, int]] = set()  # other warnings re-emitted so far


def unused_message(name: str) -> str:
    """A hyperparameter the losses do not read, and the fix."""
    return (
        f"hyperparams[{name!r}] is read neither by the criterion nor by the model in the "
        "hyper-step's losses: its hypergradient is zero and it is never tuned. Hold the "
        "hyperparameter tensor itself in the criterion or the model and compute with it there "
        "(a value taken from it before training, such as float(theta) or theta.item(), is a "
        "constant)."
    )
