"""Constrained hyperparameters by reparametrization.

A tuned weight decay must stay positive, a dropout rate or a mixing weight inside an
interval. Instead of clipping after each outer step, the outer optimizer works on an
unconstrained tensor ``raw`` and the losses see ``value = transform(raw)``:

- :class:`Positive`: ``exp(raw)`` (log-parametrization, scale-free steps) or
  ``softplus(raw)`` (about linear for large values).
- :class:`Interval`: ``low + (high - low) * sigmoid(raw)``.

The hyper-optimizer differentiates through the transform, so the hypergradient it writes
to ``raw.grad`` is ``(d value / d raw) * d g / d value``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Constraint", "Positive", "Interval"]


class Constraint:
    """A hyperparameter stored as an unconstrained leaf ``raw``, seen as ``transform(raw)``."""

    raw: Tensor

    def transform(self, raw: Tensor) -> Tensor:
        raise NotImplementedError

    def inverse(self, value: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def value(self) -> Tensor:
        """The current constrained value (detached)."""
        with torch.no_grad():
            return self.transform(self.raw)

    def _init_raw(self, value: Tensor | float, name: str) -> None:
        v = torch.as_tensor(value)
        if not v.is_floating_point():
            v = v.to(torch.get_default_dtype())
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"The initial value of {name} must be finite.")
        self.raw = self.inverse(v.detach().clone()).requires_grad_(True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(value={self.value})"


class Positive(Constraint):
    """``value = exp(raw)`` (default) or ``softplus(raw)``: always > 0.

    Args:
        value: initial value(s), all > 0 (a float or a tensor of any shape).
        transform: ``"exp"`` or ``"softplus"``.
    """

    def __init__(self, value: Tensor | float, transform: str = "exp"):
        if transform not in ("exp", "softplus"):
            raise ValueError(f"`transform` must be 'exp' or 'softplus', got {transform!r}.")
        self.kind = transform
        if not bool((torch.as_tensor(value) > 0).all()):
            raise ValueError("Positive(value) needs every initial value > 0.")
        self._init_raw(value, "Positive")

    def transform(self, raw: Tensor) -> Tensor:
        return raw.exp() if self.kind == "exp" else F.softplus(raw)

    def inverse(self, value: Tensor) -> Tensor:
        if self.kind == "exp":
            return value.log()
        return value + torch.log(-torch.expm1(-value))  # softplus^{-1}, stable


class Interval(Constraint):
    """``value = low + (high - low) * sigmoid(raw)``: always in ``(low, high)``.

    Args:
        value: initial value(s), strictly inside ``(low, high)``.
        low, high: the bounds, ``low < high``.
    """

    def __init__(self, value: Tensor | float, low: float = 0.0, high: float = 1.0):
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"Interval needs finite low < high, got low={low}, high={high}.")
        self.low, self.high = float(low), float(high)
        v = torch.as_tensor(value)
        if not bool(((v > low) & (v < high)).all()):
            raise ValueError(f"Interval(value) needs every initial value inside ({low}, {high}).")
        self._init_raw(value, "Interval")

    def transform(self, raw: Tensor) -> Tensor:
        return self.low + (self.high - self.low) * torch.sigmoid(raw)

    def inverse(self, value: Tensor) -> Tensor:
        u = (value - self.low) / (self.high - self.low)
        return torch.log(u) - torch.log1p(-u)
