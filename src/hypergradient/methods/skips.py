"""Parameters a step does not train: ``torch.optim``'s ``.grad is None`` rule, replayed.

``torch.optim`` skips a parameter whose ``.grad`` is None (after ``zero_grad()``, which sets
gradients to None, a parameter the step's loss does not use): no update, no weight decay,
no momentum, and its buffers and (Adam) step count stay as they are. A replay that
stepped every parameter with a zero gradient instead moves such parameters (decay,
momentum, Adam's normalized step) and ends away from the trained model: an unused pooler
with ``Adam(weight_decay=1e-2)`` put the replay 13% away, and every hyper-step was
skipped.

:class:`Skips` records, per step, which trained leaves had no gradient at the step's first
evaluation (averaged runs: no gradient on any rank) and turns the step's gradients and
step count into what :meth:`FunctionalOptimizer.update
<hypergradient.optim.FunctionalOptimizer.update>` takes: None for a skipped leaf, and each
leaf's own count of the updates it received (an int while every leaf had every update).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

__all__ = ["Skips"]


class Skips:
    """Per step, the leaves that had no gradient, and the per-leaf step counts they imply.

    Args:
        steps: ``T``.
        step0: the optimizer's step count at the start.
        offsets: per leaf, its own count at the start minus ``step0`` (None: all equal).
    """

    def __init__(self, steps: int, step0: int, offsets: Sequence[int] | None = None):
        self.step0 = step0
        self.used: list[tuple[bool, ...] | None] = [None] * steps
        self.offsets = None if offsets is None or not any(offsets) else list(offsets)
        self.any = False  # some step skipped some leaf

    def note(self, t: int, used: Sequence[bool]) -> None:
        """Step ``t``'s leaves with a gradient (``used[i]``)."""
        flags = tuple(map(bool, used))
        self.used[t] = flags
        self.any = self.any or not all(flags)

    def step_inputs(
        self, t: int, grads: Sequence[Tensor]
    ) -> tuple[Sequence[Tensor | None], int | list[int]]:
        """Step ``t``'s gradients (None for a skipped leaf) and step count(s)."""
        if not self.any and self.offsets is None:
            return grads, self.step0 + t
        counts = [self.step0 + t] * len(grads)
        if self.offsets is not None:
            counts = [c + o for c, o in zip(counts, self.offsets)]
        for flags in self.used[:t]:
            if flags is not None:
                counts = [c - (not u) for c, u in zip(counts, flags)]
        flags = self.used[t]
        if flags is None or all(flags):
            return grads, counts
        return [g if u else None for g, u in zip(grads, flags)], counts
