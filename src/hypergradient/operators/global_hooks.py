"""Global ``nn.Module`` forward hooks that come and go with a block, under fixed keys.

The hyper-steps' blocks (:func:`~.buffers.keep_buffers`, :class:`~.recompute.watch`) watch
every module's forward pass through global hooks, present only inside a block: a training
loop's forward passes never run them. Two things matter for a ``torch.compile``'d module
called inside a block:

- dynamo traces the global hooks into a graph compiled while they are present, and guards
  that graph on the hooks' keys (the handles' ids). Hooks registered anew at each block
  have new keys, so a compiled module recompiled at every hyper-step, and
  ``fullgraph=True`` failed at the recompile limit. :class:`GlobalHooks` re-adds the same
  functions under the keys of their first registration: a graph traced in one block
  serves the next (two graphs in all: without hooks, for training, and with them);
- the hooks' bodies do nothing while dynamo traces (:func:`compiling`): some cannot be
  traced (``Unsupported`` under ``fullgraph=True``), and a graph holds no hook code.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.modules import module as nn_module

__all__ = ["GlobalHooks", "compiling"]

#: Whether dynamo is tracing (torch >= 2.3; never on older ones, whose hooks always run).
compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", None) or (lambda: False)

_LOCK = threading.Lock()


class GlobalHooks:
    """A forward pre-hook and an optional forward hook (always called), present while
    some thread is inside a block: :meth:`add` on entering, :meth:`remove` on leaving
    (counted: the hooks go when the last block leaves)."""

    def __init__(self, pre: Callable[..., Any], post: Callable[..., Any] | None = None):
        self.pre, self.post = pre, post
        self.handles: list[Any] = []  # the first registration's (their ids are the keys)
        self.users = 0

    def add(self) -> None:
        with _LOCK:
            self.users += 1
            if self.users == 1:
                self._add()

    def remove(self) -> None:
        with _LOCK:
            self.users -= 1
            if self.users == 0:
                for handle in self.handles:
                    handle.remove()

    def _add(self) -> None:
        pres = getattr(nn_module, "_global_forward_pre_hooks", None)
        posts = getattr(nn_module, "_global_forward_hooks", None)
        always = getattr(nn_module, "_global_forward_hooks_always_called", None)
        if self.handles and pres is not None and posts is not None and always is not None:
            pres[self.handles[0].id] = self.pre  # as torch's registration does
            if self.post is not None:
                posts[self.handles[1].id] = self.post
                always[self.handles[1].id] = True
            return
        self.handles = [nn_module.register_module_forward_pre_hook(self.pre)]
        if self.post is not None:
            post = nn_module.register_module_forward_hook(self.post, always_call=True)
            self.handles.append(post)
