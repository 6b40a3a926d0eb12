"""The exact rate of the step T1T2 differentiates: ``d theta' / d g`` of one inner step.

T1T2 differentiates the last inner step ``theta' = theta - R g`` in the gradient ``g`` it
used: the hypergradient is ``d_phi g_val - (d_phi g)^T R grad g_val``. For plain SGD ``R``
is the learning rate. ``torch.optim.SGD`` with momentum ``mu`` steps with its buffer
``buf = g`` on a parameter's first step (no buffer yet: no dampening) and
``buf = mu buf_prev + (1 - dampening) g`` after, where ``buf_prev`` is a constant of the
step; Nesterov steps with ``g + mu buf``. So, per parameter,

    R = lr * k,  k = 1                                  (momentum 0)
                 k = c            with c = 1 (first step) or 1 - dampening
                 k = 1 + mu c     (Nesterov)

exactly: the factor the momentum buffer's state at the step gives (the buffer itself, from
earlier steps, does not depend on ``phi`` through this step). The coupled ``weight_decay``
is part of the inner objective (``g`` includes ``weight_decay * theta``, whose derivative
in ``phi`` is 0 at the step's start), and ``maximize`` is refused. Other optimizers (Adam,
RMSprop, ...) keep the learning rate alone: T1T2's documented approximation of their step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["momentum_factors", "with_factors"]


def momentum_factors(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor], before: Mapping[str, Any] | None
) -> list[float] | None:
    """Per trained parameter, ``k`` with ``d theta' / d g = -lr k`` for the step from the
    optimizer state ``before`` (a ``state_dict()`` taken before the step); None when every
    ``k`` is 1 (no momentum), for an optimizer other than ``torch.optim.SGD`` (its step is
    not that rule), or without ``before``."""
    if before is None or type(optimizer) is not torch.optim.SGD:
        return None
    groups = before.get("param_groups", ())
    state = before.get("state", {})
    index: dict[int, tuple[int, int]] = {}  # id(param) -> (group, position in state_dict)
    position = 0
    for g, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            index[id(p)] = (g, position)
            position += 1
    factors = []
    for p in params:
        g, i = index.get(id(p), (0, -1))
        settings = groups[g] if g < len(groups) else optimizer.param_groups[g]
        factors.append(_factor(settings, state.get(i, {})))
    return None if all(k == 1.0 for k in factors) else factors


def _factor(settings: Mapping[str, Any], state: Mapping[str, Any]) -> float:
    """``k`` of one parameter: its group's ``settings`` and its state before the step."""
    mu = float(settings.get("momentum", 0.0) or 0.0)
    if mu == 0.0:
        return 1.0
    first = state.get("momentum_buffer") is None  # torch starts the buffer at g, undamped
    c = 1.0 if first else 1.0 - float(settings.get("dampening", 0.0) or 0.0)
    return 1.0 + mu * c if settings.get("nesterov", False) else c


def with_factors(
    rates: float | tuple[float, ...], factors: list[float] | None
) -> float | tuple[float, ...]:
    """The rates (one, or one per trained parameter) times ``factors`` (one per trained
    parameter): one number when they come out equal."""
    if factors is None:
        return rates
    per = rates if isinstance(rates, tuple) else (rates,) * len(factors)
    out = tuple(r * k for r, k in zip(per, factors))
    return out[0] if len(set(out)) == 1 else out if any(out) else 0.0
