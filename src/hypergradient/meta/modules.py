"""Modules as losses: ``module_loss``, ``parameters_of`` and what they keep intact.

An ``nn.Module`` is used through ``torch.func.functional_call``: its architecture and
buffers, with the meta-parameters (or the adapted parameters) in place of its own
trainable ones. Nothing of the module is modified.
"""

from __future__ import annotations

import os
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .._vocab import ArgumentTypeError, HypergradientWarning, as_bool, as_callable
from ..operators import recompute

__all__ = [
    "RUNNING_STATS",
    "caller_level",
    "check_names",
    "module_loss",
    "parameters_of",
    "relay_warnings",
    "running_stats_off",
    "tensor_names",
    "tied_names",
    "warn_max_norm",
]

LossFn = Callable[[Any, Any], Tensor]


def module_loss(
    model: nn.Module, criterion: Callable[[Tensor, Tensor], Tensor] | None = None
) -> LossFn:
    """``loss_fn(params, (inputs, targets))`` of a module, through ``functional_call``.

    ``loss_fn(params, (x, y)) = criterion(torch.func.functional_call(model, params, (x,)), y)``
    with ``params`` a dict name -> tensor (see :func:`parameters_of`); the module's own
    parameters are not used, only its architecture (and its buffers). ``criterion(outputs,
    targets)`` defaults to ``torch.nn.functional.mse_loss``. Cost: one forward pass.

    The module's parameters and running statistics are not modified: a normalization layer
    in training mode (``BatchNorm`` with ``track_running_stats``) normalizes with the
    batch's statistics, as in training, but its running statistics are not updated
    (:func:`running_stats_off`); in eval mode it uses them. Random layers (dropout) draw
    from torch's global generator. Other buffers that a forward pass updates in place
    (spectral norm's power-iteration vectors, a custom running average) are updated by every
    evaluation, and second-order meta-gradients through such layers are not exact (spectral
    norm in training mode: 1.4e-3 relative): use them in eval mode, or fold them into the
    parameters. ``nn.Embedding(max_norm=...)`` renormalizes the weights it reads in place,
    outside autograd: meta-gradients through it are not exact (``MAML`` and ``IMAML`` warn).

    Raises:
        ArgumentTypeError: ``model`` is not an ``nn.Module`` or ``criterion`` not callable.
    """
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    crit = torch.nn.functional.mse_loss if criterion is None else criterion
    return _ModuleLoss(
        model, as_callable(crit, "criterion", "criterion(outputs, targets) -> scalar tensor")
    )


class _ModuleLoss:
    """:func:`module_loss`'s function: an object, not a closure, so that a meta-learner
    built on a module pickles (``torch.save(maml)``, multiprocessing)."""

    def __init__(self, model: nn.Module, crit: Callable[[Tensor, Tensor], Tensor]):
        self.hg_module = model  # read by the meta_params and vmap checks
        self.crit = crit
        self.known, self.tied = tensor_names(model), tied_names(model)

    def __call__(self, params: Any, batch: Any) -> Tensor:
        model = self.hg_module
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ArgumentTypeError(
                "With an nn.Module, each batch (support or query) must be a pair "
                f"(inputs, targets); got {type(batch).__name__}."
            )
        inputs, targets = batch
        if isinstance(params, dict):
            if not self.known.issuperset(params):
                self.known.update(tensor_names(model))  # the module may have changed since
                check_names(params, self.known)
            for alias, first in self.tied:
                if alias in params and first in params:
                    raise ValueError(
                        f"meta_params has both {first!r} and {alias!r}, which are one tied "
                        "tensor of the module: adapted separately, they would no longer be "
                        "one. Give it once, under one name (hg.meta.parameters_of(model) "
                        "does; a state_dict() lists a tied tensor under every name)."
                    )
            params = {**params, **running_stats_off(model)}
        elif not (isinstance(params, (tuple, list)) and all(isinstance(d, dict) for d in params)):
            raise ArgumentTypeError(
                "With an nn.Module, the parameters must be a dict name -> tensor, e.g. "
                f"hg.meta.parameters_of(model); got {type(params).__name__}."
            )
        with recompute.watch() as seen:
            outputs = torch.func.functional_call(model, params, (inputs,))
        recompute.refuse(seen.found, "The module's loss (hg.meta)")
        return self.crit(outputs, targets)


def warn_max_norm(model: nn.Module) -> None:
    """Warn about ``nn.Embedding(max_norm=...)``: its forward renormalizes the rows it reads
    in place, outside autograd, so no meta-gradient through it is exact (measured: 72 %
    off against finite differences of the adaptation, 2 steps of a 50-parameter net)."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None:
            warnings.warn(
                f"{name!r} is an {type(m).__name__} with max_norm={m.max_norm}: its forward "
                "renormalizes the weight rows it reads in place, outside autograd, so "
                "meta-gradients through it are not exact (measured: 72 % off). Use "
                "max_norm=None (and, if needed, normalize the embeddings in the forward "
                "with differentiable operations).",
                HypergradientWarning,
                stacklevel=caller_level(),
            )
            return


def caller_level() -> int:
    """``stacklevel`` for a ``warnings.warn`` in the calling function that points at the
    first frame outside this package: the user's line, however deep the call."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame: types.FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


_RELAYED: dict[Any, Any] = {}  # the "default" action's registry of relayed other warnings


def relay_warnings(
    call: Callable[[], Any],
    translate: Callable[[str], str] = str,
    drop: Callable[[str], bool] | None = None,
) -> Any:
    """``call()``, its ``HypergradientWarning`` s re-emitted at the user's line (their
    text through ``translate``: a core function's words in ``hg.meta``'s; those whose text
    ``drop`` accepts are not re-emitted: the caller says it in its own words).

    The core functions (``hg.implicit``: a solver stopped at ``maxiter``, met negative
    curvature, ...) place their warnings for a user calling them directly; called from
    inside ``hg.meta`` they pointed into the package (``imaml.py``), and the default filter
    then showed one per process. Other warnings are re-emitted where they were raised.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = call()
    level = caller_level()
    for w in caught:
        if issubclass(w.category, HypergradientWarning):
            if drop is not None and drop(str(w.message)):
                continue
            warnings.warn(translate(str(w.message)), w.category, stacklevel=level)
        else:
            module = next(  # for filters by module (``module="torch"``)
                (
                    k
                    for k, m in list(sys.modules.items())
                    if getattr(m, "__file__", 0) == w.filename
                ),
                None,
            )
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, module, _RELAYED)
    return out


def tied_names(model: nn.Module) -> list[tuple[str, str]]:
    """``(name, first name)`` of each tensor the module holds under several names."""
    first: dict[int, str] = {}
    tied = []
    named = [*model.named_parameters(remove_duplicate=False)]
    for name, t in named + [*model.named_buffers(remove_duplicate=False)]:
        if id(t) in first:
            tied.append((name, first[id(t)]))
        else:
            first[id(t)] = name
    return tied


def tensor_names(model: nn.Module) -> set[str]:
    """The names ``functional_call`` replaces: parameters and buffers (but running
    statistics, which are not learned), shared ones by every name."""
    names = {k for k, _ in model.named_parameters(remove_duplicate=False)}
    buffers = model.named_buffers(remove_duplicate=False)
    return names | {k for k, _ in buffers if k.rsplit(".", 1)[-1] not in RUNNING_STATS}


def check_names(params: dict[str, Any], known: set[str]) -> None:
    """Raise ``ValueError`` naming a key of ``params`` that is no tensor of the module.

    ``functional_call`` would set it as a new attribute that nothing reads: the module's
    own tensor would be used instead and the key would get a zero meta-gradient.
    """
    unknown = sorted(k for k in params if k not in known)
    stats = [k for k in unknown if k.rsplit(".", 1)[-1] in RUNNING_STATS]
    if stats:
        raise ValueError(
            f"meta_params has {stats[0]!r}, a normalization layer's running statistic: it is "
            "not learned (in training mode the layer normalizes with the batch's statistics "
            "and never reads it; in eval mode torch does not differentiate it). Leave it "
            "out: hg.meta.parameters_of(model)."
        )
    if unknown:
        raise ValueError(
            f"meta_params has {unknown[:3]} (of {len(unknown)} unknown names), which the "
            f"module has no parameter or buffer of; its names are e.g. {sorted(known)[:4]}. "
            "Build the meta-parameters with hg.meta.parameters_of(model) from the same "
            "module."
        )


RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def check_like_module(params: dict[Any, Any], model: nn.Module, name: str) -> None:
    """Raise naming a key of ``params`` that is a running statistic (:func:`check_names`),
    or a tensor whose shape or dtype is not the module's tensor's of that name (torch's own
    error, from deep inside ``functional_call``, named neither: "mat1 and mat2 shapes
    cannot be multiplied")."""
    stats = [k for k in params if str(k).rsplit(".", 1)[-1] in RUNNING_STATS]
    check_names(dict.fromkeys(stats[:1]), set())  # raises, naming it
    own: dict[str, Tensor] = dict(model.named_parameters(remove_duplicate=False))
    own.update(model.named_buffers(remove_duplicate=False))
    for key, value in params.items():
        t = own.get(key)
        if t is None or not isinstance(value, Tensor):
            continue
        if value.shape != t.shape:
            raise ValueError(
                f"`{name}[{key!r}]` has shape {tuple(value.shape)}, the module's {key} "
                f"{tuple(t.shape)}. Build it with hg.meta.parameters_of(model) from the same "
                "module."
            )
        if value.dtype != t.dtype:
            raise ArgumentTypeError(
                f"`{name}[{key!r}]` is {value.dtype}, the module's {key} {t.dtype}; convert "
                f"it (or the module: model.to({value.dtype}))."
            )


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
