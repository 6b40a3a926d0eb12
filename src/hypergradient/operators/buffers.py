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
counter). The hooks are present only inside a block (:mod:`~.global_hooks`).

Compiled modules: the hooks do nothing while dynamo traces (:mod:`~.global_hooks`). The
``OptimizedModule`` that ``torch.compile(module)`` returns is called eagerly: its pre-hook
gives the whole compiled tree fresh copies of its buffers instead. A module compiled in place
(``module.compile()``) runs its hooks inside the graph: pass its buffers as copies
(:class:`~hypergradient.HyperOptimizer` does).
"""

from __future__ import annotations

import threading
from typing import Any

from torch import Tensor, nn
from torch.nn.parameter import UninitializedBuffer

from .global_hooks import GlobalHooks, compiling

__all__ = ["keep_buffers"]

_LOCAL = threading.local()


def _swaps() -> list[tuple[nn.Module, list[tuple[str, Tensor]]]] | None:
    """This thread's stack of swapped modules, or None outside a block."""
    return getattr(_LOCAL, "swaps", None)


def _pre(module: nn.Module, args: Any) -> None:
    if compiling():  # (see the module notes)
        return
    compiled = isinstance(getattr(module, "_orig_mod", None), nn.Module)  # torch.compile's
    if not (compiled or getattr(module, "_buffers", None)):  # most own none: no generator
        return  # (a compiled module's tree runs in its graph, without hooks: swap it all)
    swaps = _swaps()
    if swaps is None:
        return
    own = [
        (k, b)
        for k, b in module.named_buffers(recurse=compiled)
        if b is not None and not isinstance(b, UninitializedBuffer)  # lazy modules
    ]
    if not own:
        return
    for name, buf in own:
        _set(module, name, buf.clone())
    swaps.append((module, own))


def _post(module: nn.Module, args: Any, output: Any) -> None:
    if compiling():
        return
    swaps = _swaps()
    if not swaps:
        return
    for i in range(len(swaps) - 1, -1, -1):  # the innermost pass of this module
        if swaps[i][0] is module:
            _restore(swaps.pop(i))
            return


def _set(module: nn.Module, name: str, value: Tensor) -> None:
    """``setattr`` along a dotted buffer name."""
    owner, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, leaf, value)


def _restore(entry: tuple[nn.Module, list[tuple[str, Tensor]]]) -> None:
    module, own = entry
    for name, buf in own:
        _set(module, name, buf)


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
        _HOOKS.add()

    def __exit__(self, *exc: object) -> None:
        if not self.outer:
            return
        swaps = _LOCAL.swaps
        while swaps:
            _restore(swaps.pop())
        _LOCAL.swaps = None
        _HOOKS.remove()


_HOOKS = GlobalHooks(_pre, _post)
