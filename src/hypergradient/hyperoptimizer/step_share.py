"""T1T2's replay of the step, handed from the step-gradient check to the look-ahead.

The check (:mod:`.step_grads`) replays ``train_loss`` at the step's start with the step's
random draws; T1T2's look-ahead evaluates the same function at the same point first. When
both run without autocast (the look-ahead runs without it, the replay as the step) and
without a process group, the check offers its replay (:func:`share`: the fresh leaves of
the parameters and raw hyperparameters, and the loss with its graph) and the problem's
inner loss holds it (:func:`shared_loss`,
:class:`~hypergradient.methods.t1t2_shared.SharedLoss`): one forward pass less per
hyper-step. An offer no hyper-step took is dropped at the step's end (:func:`drop`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ..methods import T1T2
from ..methods.t1t2_shared import SharedLoss

if TYPE_CHECKING:  # pragma: no cover
    from .driver import HyperOptimizer

__all__ = ["drop", "offered", "share", "shareable", "shared_loss"]


class _Shared:
    """A replay of the step T1T2 may reuse (:func:`share`): its leaves and loss."""

    def __init__(self, params: list[Tensor], hparams: list[Tensor], loss: Tensor):
        self.params, self.hparams, self.loss = params, hparams, loss


_SHARED: weakref.WeakKeyDictionary[Any, _Shared] = weakref.WeakKeyDictionary()


def shareable(hopt: HyperOptimizer) -> bool:
    """Whether this hyper-step's replay of ``train_loss`` is the evaluation T1T2's
    look-ahead takes first (:mod:`~hypergradient.methods.t1t2_shared`): T1T2 without a
    process group, the step's random-number state known, no autocast (the look-ahead runs
    without it, the replay as the step)."""
    loop = hopt.loop
    return (
        isinstance(hopt.method, T1T2)
        and hopt.process_group is None
        and loop.step_rng is not None
        and not loop.step_amp
    )


def share(hopt: HyperOptimizer, params: list[Tensor], hparams: list[Tensor], loss: Any) -> None:
    """Offer the replay's leaves and loss to this hyper-step's T1T2 (:func:`shared_loss`)."""
    if isinstance(loss, Tensor) and loss.requires_grad:
        _SHARED[hopt] = _Shared(params, hparams, loss)


def offered(hopt: HyperOptimizer) -> bool:
    """Whether a replay is offered (its graph is then kept by the check's backward pass)."""
    return hopt in _SHARED


def drop(hopt: HyperOptimizer) -> None:
    """Forget the offer (taken by no hyper-step)."""
    _SHARED.pop(hopt, None)


def shared_loss(hopt: HyperOptimizer, loss: Callable[[Any, Any], Tensor]) -> Callable:
    """``loss`` (the problem's inner loss) holding the replay :func:`share` offered, taken
    once (:class:`~hypergradient.methods.t1t2_shared.SharedLoss`); else ``loss`` itself."""
    found = _SHARED.pop(hopt, None)
    if found is None:
        return loss
    return SharedLoss(loss, found.params, found.hparams, found.loss)
