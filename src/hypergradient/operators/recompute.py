"""Activation checkpointing inside the model, seen from a hypergradient.

A hyper-step evaluates the user's losses at parameter tensors of its own through
:func:`torch.func.functional_call`, which puts the module's own weights back when the call
returns. A segment under ``torch.utils.checkpoint(..., use_reentrant=False)`` recomputes its
forward pass during the backward pass, after that: with the module's own weights, not the
hyper-step's (torch checks the recomputed tensors' shapes, not their values). Gradients of
a loss evaluated at other parameters are then silently wrong: T1T2's (at the start of the
last step: 2.5e-3 relative on a small net with per-example weights), the trajectory
methods' (every step of the window is replayed at earlier weights) and first-order
products' (gradients at ``theta +- eps v``). The implicit methods' double-backward
products evaluate at the model's own weights, where the recomputation is right.

:class:`watch` notes whether a module was called inside a checkpointed segment (the
innermost saved-tensor hooks are torch's checkpoint hooks). :func:`check` refuses a
hyper-step's hypergradient that depended on such recomputations; :func:`refuse` refuses a
loss that always evaluates at other parameters (a trajectory method's step, a
meta-learning module's loss). A loss that switches the train/eval flag around a
checkpointed segment (``model.eval()`` in ``val_loss``) has the flag put back when the call
returns, so the backward pass recomputes the segment in the other mode: torch raises its
``CheckpointError`` on metadata for dropout or BatchNorm, which :func:`explained` names
(a segment whose saved shapes agree in both modes, e.g. a module of one's own branching on
``self.training``, is not detected). The reentrant variant (``use_reentrant=True``)
already raises torch's own error under ``torch.autograd.grad``.

Inside a ``torch.compile``'d region the hook does nothing (dynamo cannot trace the
saved-tensor-hooks query, and ``fullgraph=True`` refuses a graph break): a compiled module's
checkpointed segments are a higher-order op of its graph, recomputed in the compiled backward
from the tensors the graph was given (the hyper-step's: gradients at other parameters were
exact with the eager and aot_eager backends, where eager checkpointing was 2.7 off); a
compiled module called inside a checkpointed segment of eager code is not detected.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointError

from .global_hooks import GlobalHooks, compiling

__all__ = ["check", "explained", "in_checkpoint", "refuse", "watch"]

_LOCAL = threading.local()


def in_checkpoint() -> bool:
    """Whether the current forward pass runs inside a non-reentrant checkpointed segment."""
    top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top_hooks is None:  # pragma: no cover (another torch: not detected)
        return False
    top = None
    for args in ((False,), ()):  # (ignore_is_tracing) in recent torch, none in older ones
        try:
            top = top_hooks(*args)
            break
        except (TypeError, RuntimeError):
            continue
    if not top:
        return False
    return "_checkpoint_hook" in getattr(top[0], "__qualname__", "")


def _pre(module: nn.Module, args: Any) -> None:
    if compiling():  # traced into a compiled graph: see the module notes
        return
    if getattr(_LOCAL, "watching", False) and in_checkpoint():
        _LOCAL.found = True


_HOOKS = GlobalHooks(_pre)


class watch:  # noqa: N801 (used as a function: ``with watch() as w:``)
    """A block that notes (``found``) whether a module ran inside a checkpointed segment
    (this thread). Cost: one global forward pre-hook for the block's duration
    (:mod:`~.global_hooks`)."""

    __slots__ = ("found", "outer")

    def __enter__(self) -> watch:
        self.found = False
        self.outer = not getattr(_LOCAL, "watching", False)
        if self.outer:
            _LOCAL.watching, _LOCAL.found = True, False
            _HOOKS.add()
        return self

    def __exit__(self, *exc: object) -> None:
        self.found = bool(getattr(_LOCAL, "found", False))
        if self.outer:
            _LOCAL.watching = False
            _HOOKS.remove()


def refuse(found: bool, who: str) -> None:
    """Raise ``ValueError`` if ``found``: ``who`` (a loss evaluated at parameters other than
    the module's own weights) ran a checkpointed segment (see the module docstring)."""
    if found:
        raise ValueError(
            f"{who} runs activation checkpointing (torch.utils.checkpoint with "
            "use_reentrant=False) at parameters other than the module's own weights: "
            "functional_call puts the weights back before the backward pass, which "
            "recomputes the checkpointed segments with them, so every gradient would be "
            "wrong (torch does not check the recomputed values). Do not checkpoint in this "
            "loss (an implicit method at the model's own weights, hg.implicit, does not "
            "need it)."
        )


def check(checkpointed: bool, method: Any, info: Any) -> None:
    """Raise ``ValueError`` if the hypergradient just computed rests on checkpoint
    recomputations at parameters other than the model's own (see the module docstring).

    Raises:
        ValueError: ``checkpointed`` and the method is T1T2 or a trajectory method, or it
            took first-order products.
    """
    if not checkpointed:
        return
    stats = getattr(info, "stats", None) or {}
    name = type(method).__name__
    if getattr(method, "needs_trajectory", False) or name == "T1T2":
        why = f"{name} evaluates the losses at parameters other than the model's own"
    elif stats.get("hvp") == "first_order":
        why = "first-order products evaluate gradients at parameters other than the model's own"
    else:
        return
    raise ValueError(
        "The model runs activation checkpointing (torch.utils.checkpoint with "
        "use_reentrant=False) in train_loss or val_loss: its backward pass recomputes the "
        f"checkpointed segments with the module's own weights, and {why}, so the "
        "hypergradient would be wrong (torch does not check the recomputed values). Use an "
        "implicit method with double-backward products (hg.IFT(), hg.HOAG(), hg.Implicit(); "
        "hvp='double' or 'auto'), or do not checkpoint in the losses the HyperOptimizer "
        "calls. The inner step and the hyper-step were undone."
    )


@contextlib.contextmanager
def explained() -> Iterator[None]:
    """Turn torch's ``CheckpointError`` (a recomputation whose saved tensors differ in shape
    from the forward pass's) into a ``ValueError`` naming the usual cause in a hyper-step:
    a loss switched the train/eval flag around a checkpointed segment (see the module
    docstring)."""
    try:
        yield
    except CheckpointError as err:
        raise ValueError(
            "torch.utils.checkpoint recomputed a segment differently from its forward pass "
            f"({str(err).strip().splitlines()[0]}). In a hyper-step the usual cause is a "
            "loss that switches the model between train and eval mode (model.eval() in "
            "val_loss) around a checkpointed segment with dropout or BatchNorm: the mode is "
            "put back when the loss returns, before the backward pass recomputes the "
            "segment. Checkpoint only when model.training, or keep the mode. The inner step "
            "and the hyper-step were undone."
        ) from err
