"""``torch.compile`` for the forward sweep of the trajectory methods (``compile=True``).

Measured on this project's CPU benchmarks (``benchmarks/unrolled_speed.py --compile``):
compiling the inner loss makes the plain gradient steps of the forward sweep faster on an
MLP (96 -> 61 ms for 100 steps of a 2.4k-parameter MLP; the whole ``hg.unrolled`` call
1.62x -> 1.51x a hand-written ``create_graph`` loop) but slower on logistic regression
(24 -> 29 ms), after a compilation of seconds; the reverse steps (double
backward) cannot go through a compiled graph (torch refuses ``create_graph=True`` through
a compiled backward with donated buffers), so they stay eager. Hence an option, off by
default, and only for the gradients the forward sweep takes without a graph.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._vocab import HypergradientWarning
from .replay import rng_state, same_state

__all__ = ["CompiledLoss"]


class CompiledLoss:
    """``loss(params, hparams, batch)`` compiled by ``torch.compile`` after an eager check.

    The first call runs eagerly and watches torch's random-number state: a loss that draws
    random numbers (dropout) stays eager with one :class:`HypergradientWarning`, because a
    compiled graph draws other numbers than the eager recomputation of the reverse pass
    would, and the hypergradient would mix two different runs. Later calls go through
    ``torch.compile(loss, dynamic=False)`` (one compilation per input shape; torch caches
    it on the function's code, so reuse one loss function across calls). :meth:`recheck`
    makes the next call an eager check again: a method reusing this object across sweeps
    calls it at each sweep's start, since a loss may draw random numbers now that did not
    then (a module switched to ``train()``: the compiled graph's dropout masks are not the
    ones the eager reverse pass replays, and the hypergradient would be another run's).
    Compiled calls run with inductor's ``fallback_random`` (eager's random-number
    generation), so a loss that starts drawing random numbers within a sweep (dropout from
    some batch on) draws the numbers the eager reverse pass replays.

    Args:
        loss: the step loss ``(params, hparams, batch) -> scalar``.
        device: the parameters' device (whose random-number state is watched).
    """

    def __init__(self, loss: Callable[[Any, Any, Any], Tensor], device: torch.device):
        self.loss = loss
        self.device = device
        self.compiled: Callable[..., Tensor] | None = None
        self.checked = False  # the last eager check drew no random numbers
        self.eager_reason: str | None = None

    def recheck(self) -> None:
        """Check the loss eagerly again at the next call (the compilation is kept)."""
        self.checked = False
        self.eager_reason = None

    def __call__(self, params: Any, hparams: Any, batch: Any) -> Tensor:
        if self.checked and self.compiled is not None:
            from torch._inductor import config  # (imports torch._inductor: only here)

            with config.patch(fallback_random=True):  # read when (re)compiling
                return self.compiled(params, hparams, batch)
        if self.eager_reason is not None:
            return self.loss(params, hparams, batch)
        before = rng_state(self.device)
        value = self.loss(params, hparams, batch)
        if same_state(before, rng_state(self.device)):
            if self.compiled is None:
                self.compiled = torch.compile(self.loss, dynamic=False)
            self.checked = True
        else:
            self.eager_reason = "the inner loss draws random numbers (dropout)"
            warnings.warn(
                f"compile=True is ignored: {self.eager_reason}, and a compiled graph would "
                "draw other numbers than the eager reverse pass. Steps run eagerly.",
                HypergradientWarning,
                stacklevel=2,
            )
        return value
