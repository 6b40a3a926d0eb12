"""``torch.func.functional_call``'s swap, with each name's submodule looked up once.

:meth:`ModelView.call <.model.ModelView.call>` evaluates the user's loss with the trained
parameters (and the frozen ones, and the buffers) replaced by tensors of its own. torch's
``functional_call`` walks every dotted name to its submodule at each call (a context
manager, a path split and type checks per tensor: about as much Python work as the forward
pass of a small MLP, at every forward pass of a hyper-step and of a replayed window).
:func:`swapped_call` swaps the same entries of the submodules' ``_parameters`` and
``_buffers`` dicts as torch does and puts the originals back when the call returns or
raises, with the submodule of each name cached in a :class:`Slots` that the view replaces
whenever the module tree's identity changes (``ModelView._tie_weights``' mark: any
submodule, parameter or buffer set or replaced anywhere). A name that is neither a parameter
nor a buffer of its submodule (torch then sets a plain attribute and deletes it afterwards),
a name whose path does not resolve (torch raises its error), and a call under the JIT
tracer (torch refuses it) go through ``torch.func.functional_call`` itself; so does a tied
model (the view calls torch for it, which unties).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Slots", "swapped_call"]


class Slots:
    """The ``(submodule, attribute)`` of each dotted name under ``root``, looked up once
    (valid while the module tree keeps its identity; the owner builds a new one when not)."""

    __slots__ = ("found", "root")

    def __init__(self, root: nn.Module):
        self.root = root
        self.found: dict[str, tuple[nn.Module, str]] = {}

    def get(self, key: str) -> tuple[nn.Module, str] | None:
        """The slot of ``key``; None when its path does not lead to a submodule."""
        slot = self.found.get(key)
        if slot is None:
            prefix, _, attr = key.rpartition(".")
            try:
                sub = self.root.get_submodule(prefix) if prefix else self.root
            except AttributeError:
                return None
            slot = self.found[key] = (sub, attr)
        return slot


def swapped_call(
    module: nn.Module, slots: Slots, values: Mapping[str, Tensor], args: tuple[Any, ...]
) -> Any:
    """``module(*args)`` with each named tensor of ``values`` in place of the module's own,
    as ``torch.func.functional_call(module, values, args, tie_weights=False)``."""
    entries: list[tuple[dict[str, Any], str, Tensor]] = []
    for key, value in values.items():
        slot = slots.get(key)
        if slot is None:
            break
        sub, attr = slot
        held: dict[str, Any] = sub._parameters
        if attr not in held:
            held = sub._buffers
            if attr not in held:
                break
        entries.append((held, attr, value))
    if len(entries) < len(values) or torch.jit.is_tracing():
        return torch.func.functional_call(module, dict(values), args, tie_weights=False)
    done: list[tuple[dict[str, Any], str, Any]] = []
    try:
        for held, attr, value in entries:
            done.append((held, attr, held[attr]))
            held[attr] = value
        return module(*args)
    finally:
        for held, attr, original in reversed(done):
            held[attr] = original
