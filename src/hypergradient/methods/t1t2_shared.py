"""T1T2's inner loss already evaluated at the step's start, reused instead of recomputed.

``hg.HyperOptimizer`` replays ``train_loss`` at the step's start with the step's random
draws before each T1T2 hyper-step, to compare its gradient with the step's ``.grad``
(:mod:`~hypergradient.hyperoptimizer.step_grads`); that forward pass is the one T1T2's
look-ahead takes first (``f`` at ``theta_t``, same batch, same draws). :class:`SharedLoss`
hands it over: the look-ahead differentiates the replay's graph (kept by the check's
backward pass, ``retain_graph=True``) at the replay's leaves, one forward pass less per
hyper-step. The value is the replay's tensor itself, so the hypergradient is the one the
look-ahead's own pass gives (the same function at the same values, the same draws).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from .. import _tree

__all__ = ["SharedLoss", "shared_leaves"]


class SharedLoss:
    """``loss(params, hparams)``, whose value at the leaves ``params`` and ``hparams`` (lists
    of tensors that require grad) is already ``value``: the first call at exactly those
    leaves (the same tensor objects) returns it, any other call computes ``loss``.

    Args:
        loss: the inner loss (``Problem.inner_loss``'s form).
        params, hparams: the leaves ``value`` was computed at.
        value: ``loss`` at them, with its graph.
    """

    def __init__(
        self,
        loss: Callable[[Any, Any], Tensor],
        params: Sequence[Tensor],
        hparams: Sequence[Tensor],
        value: Tensor,
    ):
        self.loss = loss
        self.params, self.hparams = list(params), list(hparams)
        self.value: Tensor | None = value
        # the method's arity check reads it at every hyper-step: without it, inspect's own
        # lookup for each new instance (a plain callable object's check: 18 us against 7 us)
        self.__signature__ = _CALL

    def leaves(
        self, params: Sequence[Tensor], hparams: Sequence[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]] | None:
        """The shared leaves, if they hold the values of ``params`` and ``hparams`` (the same
        memory, shape, strides and dtype: views of the same tensors) and the value is not
        used yet; else None."""
        if self.value is None or not _aliases(self.params, params):
            return None
        return (self.params, self.hparams) if _aliases(self.hparams, hparams) else None

    def __call__(self, params: Any, hparams: Any) -> Tensor:
        value = self.value
        if value is not None and _same(params, self.params) and _same(hparams, self.hparams):
            self.value = None  # once: a second call builds a fresh graph
            return value
        return self.loss(params, hparams)


_FOUND = inspect.signature(SharedLoss.__call__)
#: An instance's signature: its ``__call__``'s without ``self`` (the class keeps its
#: constructor's).
_CALL = _FOUND.replace(parameters=list(_FOUND.parameters.values())[1:])


def shared_leaves(
    loss: Any, params: Sequence[Tensor], hparams: Sequence[Tensor]
) -> tuple[list[Tensor], list[Tensor]] | None:
    """The leaves of the :class:`SharedLoss` inside ``loss`` (itself, or reached through
    ``__wrapped__``: a coupled weight decay added to it) that alias ``params`` and
    ``hparams``; None when there is none."""
    for _ in range(4):
        if isinstance(loss, SharedLoss):
            return loss.leaves(params, hparams)
        loss = getattr(loss, "__wrapped__", None)
        if loss is None:
            return None
    return None


def _same(tree: Any, leaves: list[Tensor]) -> bool:
    """Whether ``tree``'s leaves are exactly the tensor objects ``leaves``."""
    if type(tree) is dict:  # the usual tree: its values, in order (as flatten takes them)
        found = list(tree.values())
        if len(found) == len(leaves) and all(a is b for a, b in zip(found, leaves)):
            return True
    try:
        found = _tree.flatten(tree, "leaves")[0]
    except (TypeError, ValueError):
        return False
    return len(found) == len(leaves) and all(a is b for a, b in zip(found, leaves))


def _aliases(mine: list[Tensor], theirs: Sequence[Tensor]) -> bool:
    """Whether each tensor of ``mine`` views the same memory as its peer in ``theirs``."""
    return len(mine) == len(theirs) and all(
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.device == b.device
        for a, b in zip(mine, theirs)
    )
