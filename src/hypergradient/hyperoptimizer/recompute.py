"""Activation checkpointing inside the model, seen from a hyper-step.

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
innermost saved-tensor hooks are torch's checkpoint hooks); :func:`check` refuses a
hypergradient that depended on such recomputations, and :func:`check_modes` a loss that
switched the train/eval flag around a checkpointed segment (``model.eval()`` in
``val_loss``): the flags are put back when the call returns, so the backward pass would
recompute the segment in the other mode (torch then raises its ``CheckpointError`` on
metadata for dropout or BatchNorm, and is silently wrong where the shapes agree). The
reentrant variant
(``use_reentrant=True``) already raises torch's own error under ``torch.autograd.grad``.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as nn_module

__all__ = ["check", "check_modes", "in_checkpoint", "watch"]

_LOCAL = threading.local()


def in_checkpoint() -> bool:
    """Whether the current forward pass runs inside a non-reentrant checkpointed segment."""
    try:
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, TypeError, RuntimeError):  # another torch: not detected
        return False
    if not top:
        return False
    return "_checkpoint_hook" in getattr(top[0], "__qualname__", "")


def _pre(module: nn.Module, args: Any) -> None:
    if getattr(_LOCAL, "watching", False) and in_checkpoint():
        _LOCAL.found = True


class watch:  # noqa: N801 (used as a function: ``with watch() as w:``)
    """A block that notes (``found``) whether a module ran inside a checkpointed segment
    (this thread). Cost: one global forward pre-hook for the block's duration."""

    __slots__ = ("found", "handle", "outer")

    def __enter__(self) -> watch:
        self.found = False
        self.outer = not getattr(_LOCAL, "watching", False)
        if self.outer:
            _LOCAL.watching, _LOCAL.found = True, False
            self.handle = nn_module.register_module_forward_pre_hook(_pre)
        return self

    def __exit__(self, *exc: object) -> None:
        self.found = bool(getattr(_LOCAL, "found", False))
        if self.outer:
            self.handle.remove()
            _LOCAL.watching = False


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


def check_modes(switched: bool) -> None:
    """Raise ``ValueError`` (before any backward pass) if a loss switched the train/eval
    flag of the module around a checkpointed segment (see the module docstring)."""
    if switched:
        raise ValueError(
            "A loss called by the HyperOptimizer switched the model between train and eval "
            "mode (e.g. model.eval() in val_loss) and runs activation checkpointing "
            "(torch.utils.checkpoint with use_reentrant=False): the mode is put back when the "
            "loss returns, so the backward pass would recompute the checkpointed segments in "
            "the other mode (dropout, BatchNorm) and the hypergradient would be wrong. Do not "
            "checkpoint in a loss that changes the mode (checkpoint only when "
            "model.training, say), or keep the mode. The inner step and the hyper-step were "
            "undone."
        )
