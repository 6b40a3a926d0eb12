"""``ModelView``: the model as the hyper-optimizer sees it.

The user trains an ``nn.Module`` (possibly wrapped in ``DistributedDataParallel``) or a tree
of parameter tensors; the methods want functions of a parameter tree. The view holds:

- the parameters the inner optimizer trains (in a fixed order, with their names), and the
  frozen ones (parameters of the module the inner optimizer does not train);
- functional calls of the user's losses ``loss(model, hparams, batch)`` at any parameter
  tree: for a module, through :func:`torch.func.functional_call` on a small wrapper module
  whose ``forward`` calls the user's loss with the reparametrized submodule, so
  ``model(x)``, ``model.weight`` and ``model.parameters()`` all see the given tensors;
- buffers as copies during those calls: a hyper-step's forward passes never change
  BatchNorm running statistics or ``num_batches_tracked`` (plain training does, in the
  user's own forward passes, in whatever train/eval mode the module is in);
- snapshots of weights and buffers for the hyper-optimizer's rollback.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import _tree
from ..operators import recompute
from .buffers import BufferWatch
from .reparam import Slots, swapped_call

__all__ = ["ModelView", "mode_switch", "parse_modes"]

Loss = Callable[[Any, Any, Any], Tensor]


class _LossCall(nn.Module):
    """``forward(loss, hparams, batch) = loss(self.model, hparams, batch)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, loss: Loss, hparams: Any, batch: Any) -> Tensor:
        return loss(self.model, hparams, batch)


def trained_tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The tensors ``optimizer`` updates, in its order."""
    return [p for g in optimizer.param_groups for p in g["params"]]


def _trained_names(named: Mapping[str, Tensor], in_opt: set[int]) -> list[str]:
    """The names of the parameters the optimizer holds (ids ``in_opt``) that require grad."""
    return [k for k, p in named.items() if id(p) in in_opt and p.requires_grad]


def _changes(before: Mapping[str, Tensor], named: Mapping[str, Tensor], now: list[str]) -> str:
    """The message naming the trained parameters added, removed and replaced."""
    added = [k for k in now if k not in before]
    removed = [k for k in before if k not in set(now)]
    replaced = [k for k in now if k in before and named[k] is not before[k]]
    return (
        f"The trained parameters changed since the HyperOptimizer was built (newly trained: "
        f"{added}, no longer trained: {removed}, replaced: {replaced}), by requires_grad, "
        "inner_optimizer.add_param_group or a new submodule. After such a change build a new "
        "HyperOptimizer (the hyperparameters can be reused)."
    )


def mode_switch(start: Mapping[str, bool], modes: Mapping[str, bool], step: int) -> str | None:
    """The first submodule whose train/eval flag in ``modes`` (:meth:`ModelView.modes`) is
    not the one in ``start``, described; None if there is none."""
    name = next((n for n, m in modes.items() if m != start.get(n, m)), None)
    if name is None:
        return None
    was, now = ("train" if start[name] else "eval"), ("train" if modes[name] else "eval")
    return (
        f"the module {name or 'model'!r} switched from {was} to {now} mode (model.train() / "
        f"model.eval()) before step {step} of the window, whose replay runs every step in one mode"
    )


def parse_modes(modes0: Any) -> dict[str, bool] | None:
    """A checkpointed window's train/eval flags at its start (None in a checkpoint from
    before they were saved: read at the next step)."""
    ok = modes0 is None or isinstance(modes0, Mapping)
    if not ok or not all(isinstance(v, bool) for v in (modes0 or {}).values()):
        raise ValueError(f"The checkpoint's window `modes0` is {modes0!r:.80}.")
    return None if modes0 is None else dict(modes0)


def _tree_mark(modules: Sequence[nn.Module]) -> list[tuple]:
    """The identity of a module tree given its submodules (``modules()``, which it keeps
    alive): each one's children, parameters and buffers by ``id``. Two positions holding one
    tensor or submodule now held one object when the mark was taken (live objects have
    distinct ids), so a tree with an unchanged mark has no tie it did not have."""
    return [
        (
            tuple(map(id, m._modules.values())),
            tuple(map(id, m._parameters.values())),
            tuple(map(id, m._buffers.values())),
        )
        for m in modules
    ]


class ModelView:
    """A module (DDP-unwrapped) or a tree of tensors, seen as a tree of trained parameters.

    Args:
        model: an ``nn.Module`` (losses receive the module, reparametrized during
            hyper-steps), a ``DistributedDataParallel`` wrapper of one (hyper-steps use the
            wrapped module; the user's loop keeps the wrapper), or a tree of tensors.
        inner_optimizer: the ``torch.optim`` optimizer that trains it; its tensors that
            require grad are the trained parameters, the module's other parameters are
            frozen (a parameter with ``requires_grad=False`` gets no gradient, so the
            optimizer never moves it, even when it holds it).

    Raises:
        ValueError: the optimizer trains none of the model's parameters, or a leaf of a
            tree model is not trained by it.
    """

    def __init__(self, model: Any, inner_optimizer: torch.optim.Optimizer):
        self.user_model = model  # what the user's own loop calls (possibly DDP-wrapped)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            # Hyper-steps evaluate the wrapped module functionally; averaging across ranks is
            # done by the methods, not by DDP's backward hooks.
            model = model.module
        in_opt = {id(p) for p in trained_tensors(inner_optimizer)}
        self.module: nn.Module | None = model if isinstance(model, nn.Module) else None
        self.params: list[Tensor]
        self.names: list[str]
        self.frozen: list[str]
        self.buffer_watch = BufferWatch(self.module)  # buffers the training steps update
        if self.module is not None:
            self._init_module(self.module, in_opt)
        else:
            self.params, self.spec = _tree.flatten(model, "model")
            _tree.check_leaves(self.params, self.spec, "model")
            self.names, self.frozen = list(self.spec.paths), []
        if not self.params:
            raise ValueError(
                "`inner_optimizer` optimizes none of the model's parameters (that require "
                "grad); build it from model.parameters()."
            )
        for name, p in zip(self.names, self.params):
            if id(p) not in in_opt:
                raise ValueError(
                    f"{name} is not optimized by `inner_optimizer`; pass the tensors it trains."
                )

    def _init_module(self, module: nn.Module, in_opt: set[int]) -> None:
        named = dict(module.named_parameters())
        self.names = _trained_names(named, in_opt)
        self.frozen = [k for k in named if k not in set(self.names)]
        self.params = [named[k] for k in self.names]
        self.spec = _tree.flatten({k: named[k] for k in self.names}, "model")[1]
        self._call = _LossCall(module)
        self._cache_keys(module)
        self.checkpointed = False  # a call ran checkpointed segments (``recompute``)

    def check_trained(self, inner_optimizer: torch.optim.Optimizer) -> None:
        """Raise ``ValueError`` if the module's parameters that ``inner_optimizer`` trains
        changed since construction: ``requires_grad`` toggled, ``add_param_group``, a
        replaced submodule. The trained set is fixed at construction (the rollback
        snapshot, the window and the methods' parameter tree are built on it).

        Cost: one walk of the module's parameters.
        """
        if self.module is None:
            return
        named = dict(self.module.named_parameters())
        now = _trained_names(named, {id(p) for p in trained_tensors(inner_optimizer)})
        if now == self.names and all(named[k] is p for k, p in zip(self.names, self.params)):
            return
        raise ValueError(_changes(dict(zip(self.names, self.params)), named, now))

    def _cache_keys(self, module: nn.Module) -> None:
        """The keys of the wrapper's state, built once: a functional call's dict then costs
        no walk of the module when nothing is frozen and there are no buffers."""
        self._keys = {k: f"model.{k}" for k in self.names}
        self._frozen_keys = [(k, f"model.{k}") for k in self.frozen]
        self._buffer_keys = [(k, f"model.{k}") for k, _ in module.named_buffers()]
        # weights an nn.Embedding(max_norm=...) renormalizes in place in its forward pass
        kinds = (nn.Embedding, nn.EmbeddingBag)
        ids = {id(m.weight) for m in module.modules() if isinstance(m, kinds) and m.max_norm}
        self._renormed = {k for k, p in zip(self.names, self.params) if id(p) in ids}
        self._tree: tuple[list[nn.Module], list[tuple]] = ([], [])  # see _tie_weights
        self._tied = True
        self._slots = Slots(self._call)  # each name's submodule, while the tree is the same

    def _tie_weights(self) -> bool:
        """Whether a functional call must untie weights (torch's ``tie_weights=True``: a walk
        of the module for tensors held under several names, a third of a small model's
        call): only when the module holds such a tensor. Cached with the module tree's
        identity (:func:`_tree_mark`), checked at each call in one pass over the cached
        submodules; a submodule, parameter or buffer set or replaced anywhere recomputes it
        (and drops the submodules :func:`.reparam.swapped_call` looked up).
        """
        mods, mark = self._tree
        if mods and _tree_mark(mods) == mark:
            return self._tied
        mods = list(self._call.modules())
        self._tree, self._slots = (mods, _tree_mark(mods)), Slots(self._call)
        held: list[Tensor] = [t for _, t in self._call.named_parameters(remove_duplicate=False)]
        held += [t for _, t in self._call.named_buffers(remove_duplicate=False)]
        self._tied = len({id(t) for t in held}) < len(held)
        return self._tied

    # ------------------------------------------------------------------ views
    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def all_parameters(self) -> list[Tensor]:
        """Every parameter of the model, trained and frozen."""
        if self.module is None:
            return list(self.params)
        return list(self.module.parameters())

    def tree(self, leaves: Sequence[Tensor]) -> Any:
        """The parameter tree with these leaves (the trained parameters' order)."""
        return _tree.unflatten(self.spec, list(leaves))

    def detached(self) -> Any:
        """The current trained parameters as a tree of detached tensors."""
        return self.tree([p.detach() for p in self.params])

    def loop_model(self) -> Any:
        """What the user's loss receives in the training loop (the module, or the tree)."""
        if self.module is not None:
            return self.user_model
        return self.tree(self.params)

    # ------------------------------------------------------------------ functional calls
    def call(
        self, loss: Loss, params: Any, hparams: Any, batch: Any, fresh: bool = False
    ) -> Tensor:
        """``loss(model, hparams, batch)`` with the trained parameters set to ``params``.

        Frozen parameters are passed detached and buffers as copies, and every submodule's
        train/eval flag is put back afterwards (a ``val_loss`` written as validation code,
        ``model.eval()`` first, would leave the training loop, and the rest of the
        hyper-step, in eval mode), so nothing of the module's state changes. With
        ``fresh``, the weights of an ``nn.Embedding(max_norm=...)`` are passed as copies:
        its in-place renormalization then leaves ``params`` alone (a graph built on them by
        another call stays valid: the implicit methods' inner and outer losses at one
        point); trajectory steps pass them as they are, renormalized as in training.
        """
        if self.module is None:
            return loss(params, hparams, batch)
        module, keys = self.module, self._keys
        values = {key: module.get_parameter(k).detach() for k, key in self._frozen_keys}
        values.update({key: module.get_buffer(k).clone() for k, key in self._buffer_keys})
        renormed = self._renormed if fresh else ()
        values.update(
            {
                keys.get(k) or f"model.{k}": v.clone() if k in renormed else v
                for k, v in params.items()
            }
        )
        tie = self._tie_weights()  # also caches the submodules: _tree[0][1:] is modules()
        modes = [(m, m.training) for m in self._tree[0][1:]]
        try:
            with recompute.watch() as seen:
                args = (loss, hparams, batch)
                if tie:  # torch's walk unties
                    out = torch.func.functional_call(self._call, values, args, tie_weights=True)
                else:  # the same swap, each name's submodule cached (:mod:`.reparam`)
                    out = swapped_call(self._call, self._slots, values, args)
            self.checkpointed |= seen.found  # read and reset by each hyper-step
            return out
        finally:
            for m, training in modes:
                if m.training is not training:
                    m.training = training

    def functional(
        self, loss: Loss, transform: Callable[[Mapping[str, Tensor]], Any], fresh: bool = False
    ) -> Callable[[Any, Mapping[str, Tensor], Any], Tensor]:
        """``f(params, raw, batch) = loss(model at params, transform(raw), batch)``
        (``fresh``: see :meth:`call`)."""

        def f(params: Any, raw: Mapping[str, Tensor], batch: Any) -> Tensor:
            return self.call(loss, params, transform(raw), batch, fresh)

        return f

    def at_batch(
        self, loss: Loss, transform: Callable[[Mapping[str, Tensor]], Any], batch: Any
    ) -> Callable[[Any, Mapping[str, Tensor]], Tensor]:
        """``f(params, raw) = loss(model at params, transform(raw), batch)``, with fresh
        copies of in-place renormalized weights (see :meth:`call`)."""
        f = self.functional(loss, transform, fresh=True)
        return lambda params, raw: f(params, raw, batch)

    # ------------------------------------------------------------------ state
    def buffers(self) -> list[Tensor]:
        return [] if self.module is None else list(self.module.buffers())

    def modes(self) -> dict[str, bool]:
        """Each submodule's train/eval flag, by name (``""``: the model; none for a tree)."""
        module = self.module
        return {} if module is None else {n: m.training for n, m in module.named_modules()}

    def snapshot(self) -> tuple[list[Tensor], list[Tensor]]:
        """Copies of the trained parameters and of the buffers (for a rollback)."""
        return [p.detach().clone() for p in self.params], [b.clone() for b in self.buffers()]

    def restore(self, snapshot: tuple[list[Tensor], list[Tensor]]) -> None:
        with torch.no_grad():
            for p, old in zip(self.params, snapshot[0]):
                p.copy_(old)
            for b, old in zip(self.buffers(), snapshot[1]):
                b.copy_(old)
        self.buffer_watch.restart()  # the copies are not a training step's update

    def signature(self) -> dict[str, Any]:
        """Names, shapes and dtypes of the trained parameters (plain data, for checkpoints)."""
        return {
            "names": list(self.names),
            "shapes": [list(p.shape) for p in self.params],
            "dtypes": [str(p.dtype) for p in self.params],
        }

    def check_signature(self, saved: Any) -> None:
        """Raise ``ValueError`` naming the first parameter where ``saved`` differs."""
        mine = self.signature()
        if not isinstance(saved, Mapping) or set(saved) != set(mine):
            raise ValueError("The checkpoint's `model` entry is malformed.")
        if list(saved["names"]) != mine["names"]:
            raise ValueError(
                f"The checkpoint was saved from another model: its trained parameters are "
                f"{list(saved['names'])}, this model's are {mine['names']}."
            )
        for name, s, m, sd, md in zip(
            mine["names"], saved["shapes"], mine["shapes"], saved["dtypes"], mine["dtypes"]
        ):
            if list(s) != m or sd != md:
                raise ValueError(
                    f"The checkpoint was saved from another model: {name} was {tuple(s)} {sd}, "
                    f"here it is {tuple(m)} {md}."
                )
