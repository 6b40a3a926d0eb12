"""The sources' scale for forward mode's watch with a linear update (plain SGD).

:class:`~hypergradient.methods.source_watch.SourceWatch` needs, at every step, the norm of the
parameters' rows of the source ``B_t = U(0, 0, S_t)``: the update's tangent along the
gradient tangents' source ``S_t = H_tp e_k``. Pushing ``S_t`` through the update costs one
more update call per step (0.2-0.3 ms of Python on a 4-leaf MLP, a tenth of a training
step). :class:`~hypergradient.optim.SGD` with no tuned setting is linear and acts on each
leaf by a number: ``B_t``'s rows are ``c_i S_t`` leaf by leaf, with ``c_i = -lr (1 or 1 +
momentum, 1 - dampening ...)`` or 0 for a leaf the step skips. :class:`LinearGains` reads
``|c_i|`` from the update itself, applied to one-element tensors, once per pattern of what
SGD's update reads of a step besides its inputs (the leaves the step skips, and which
leaves take their first update: ``b_0 = g_0``), and reuses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..optim.functional import SGD
from .replay import Run

__all__ = ["LinearGains"]


class LinearGains:
    """``|c_i|`` per leaf at step ``t`` for plain SGD (see the module); build with
    :meth:`of`."""

    def __init__(self, run: Run):
        self.run = run
        self.cache: dict[Any, Tensor] = {}

    @staticmethod
    def of(run: Run) -> LinearGains | None:
        """For :class:`~hypergradient.optim.SGD` with no tuned setting, else None (the
        source is then pushed through the update)."""
        plain = type(run.optimizer) is SGD and not run.setting_index and not run.setting_fns
        return LinearGains(run) if plain else None

    def __call__(self, t: int, g: Sequence[Tensor], s: Sequence[Tensor]) -> Tensor:
        """The gains of step ``t`` (gradients ``g``, state ``s``: their dtypes and devices)."""
        grads, step = self.run.skips.step_inputs(t, g)
        counts = [step] * len(grads) if isinstance(step, int) else list(step)
        key = (tuple(x is None for x in grads), tuple(c == 0 for c in counts))
        got = self.cache.get(key)
        if got is None:
            one = [torch.ones(1, dtype=x.dtype, device=x.device) for x in g]
            zero = [torch.zeros_like(x) for x in one]
            state = [torch.zeros(1, dtype=x.dtype, device=x.device) for x in s]
            with torch.no_grad():
                new, _ = self.run.update(zero, state, one, self.run.settings, t)
            got = torch.cat([x.detach().reshape(1).abs().double().cpu() for x in new])
            self.cache[key] = got
        return got
