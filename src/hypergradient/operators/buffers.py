"""Forward passes that leave the modules' buffers alone (BatchNorm running statistics).

A hypergradient evaluates the user's losses many times that training would not: the graph
of ``f`` at the point, two gradients per first-order product, the recomputed steps of a
reverse sweep. A loss written as ``functional_call(net, params, x)`` with ``net`` in train
mode and its buffers not passed as copies would update ``net``'s BatchNorm
``running_mean``, ``running_var`` and ``num_batches_tracked`` at each of those passes (a
first-order implicit solve: 6 to 61 updates where training makes none), so that the model
the user keeps training, and the outer loss it reads, change with the solver.

:func:`keep_buffers` makes every ``nn.Module`` forward pass inside it buffer-neutral: a
global forward pre-hook gives each module (with buffers) fresh copies of its own buffers
for the pass, and the forward hook puts the originals back, untouched (no in-place write
to the user's tensors, so no autograd version-counter conflict with a retained graph).
Only the thread that entered the block is affected; blocks nest. Cost: one copy of a
module's own buffers per forward pass of that module (BatchNorm: two vectors and a
counter).
"""

from __future__ import annotations

import threading
from typing import Any

from torch import Tensor, nn
from torch.nn.modules import module as nn_module
from torch.nn.parameter import UninitializedBuffer

__all__ = ["keep_buffers"]

_LOCAL = threading.local()
_LOCK = threading.Lock()
_HOOKS: list[Any] = []
_USERS = [0]  # threads inside a block (the hooks are registered while > 0)


def _swaps() -> list[tuple[nn.Module, list[tuple[str, Tensor]]]] | None:
    """This thread's stack of swapped modules, or None outside a block."""
    return getattr(_LOCAL, "swaps", None)


def _pre(module: nn.Module, args: Any) -> None:
    if not getattr(module, "_buffers", None):  # most modules own none: no generator built
        return
    swaps = _swaps()
    if swaps is None:
        return
    own = [
        (k, b)
        for k, b in module.named_buffers(recurse=False)
        if b is not None and not isinstance(b, UninitializedBuffer)  # lazy modules
    ]
    if not own:
        return
    for name, buf in own:
        setattr(module, name, buf.clone())
    swaps.append((module, own))


def _post(module: nn.Module, args: Any, output: Any) -> None:
    swaps = _swaps()
    if not swaps:
        return
    for i in range(len(swaps) - 1, -1, -1):  # the innermost pass of this module
        if swaps[i][0] is module:
            _restore(swaps.pop(i))
            return


def _restore(entry: tuple[nn.Module, list[tuple[str, Tensor]]]) -> None:
    module, own = entry
    for name, buf in own:
        setattr(module, name, buf)


class keep_buffers:  # noqa: N801 (used as a function: ``with keep_buffers():``)
    """A block whose ``nn.Module`` forward passes change no module's buffers (this thread).

    Passes that raise are undone when the block exits. A block inside another costs one
    attribute read (a class, not a generator: the implicit formula enters a few per call).
    """

    __slots__ = ("outer",)

    def __enter__(self) -> None:
        self.outer = _swaps() is None
        if not self.outer:  # nested: the outer block already keeps them
            return
        _LOCAL.swaps = []
        with _LOCK:
            if _USERS[0] == 0:
                _HOOKS.append(nn_module.register_module_forward_pre_hook(_pre))
                _HOOKS.append(nn_module.register_module_forward_hook(_post, always_call=True))
            _USERS[0] += 1

    def __exit__(self, *exc: object) -> None:
        if not self.outer:
            return
        swaps = _LOCAL.swaps
        while swaps:
            _restore(swaps.pop())
        _LOCAL.swaps = None
        with _LOCK:
            _USERS[0] -= 1
            if _USERS[0] == 0:
                while _HOOKS:
                    _HOOKS.pop().remove()
