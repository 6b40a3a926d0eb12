"""Constrained hyperparameters by reparametrization.

A tuned weight decay must stay positive, a dropout rate or a mixing weight inside an
interval. Instead of clipping after each outer step, the outer optimizer works on an
unconstrained tensor ``raw`` and the losses see ``value = transform(raw)``:

- :class:`Unconstrained`: ``value = raw`` (what a plain tensor in ``hparams`` becomes; the
  tensor itself is the leaf the outer optimizer updates).
- :class:`Positive`: ``exp(raw)`` (log-parametrization, scale-free steps) or
  ``softplus(raw)`` (about linear for large values).
- :class:`Interval`: ``low + (high - low) * sigmoid(raw)``.

The hyper-optimizer differentiates through the transform, so the hypergradient it writes
to ``raw.grad`` is ``(d value / d raw) * d g / d value``.

The transforms keep the value inside the open domain mathematically, but not in floating
point: ``exp(-800)`` is exactly 0 in float64 and ``sigmoid(40)`` exactly 1. After every outer
step the hyper-optimizer asks :meth:`Constraint.domain_error` and rolls the step back with
:class:`HyperparameterDomainError` when the value left the domain.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _vocab
from ._vocab import ArgumentTypeError, NonFiniteHypergradientError, as_choice, as_float

__all__ = ["Constraint", "HyperparameterDomainError", "Interval", "Positive", "Unconstrained"]


class HyperparameterDomainError(NonFiniteHypergradientError):
    """An outer step drove a hyperparameter out of its domain (0 or inf for a
    :class:`Positive`, a bound for an :class:`Interval`, a negative learning rate, NaN).

    A :class:`~hypergradient.NonFiniteHypergradientError`, so ``nonfinite="skip"`` skips the
    hyper-step as it does for a non-finite hypergradient.
    """


def as_value(value: Any, name: str) -> Tensor:
    """``value`` (a real number, a sequence or array of them, or a tensor) as a finite
    floating-point tensor, detached (integers become the default dtype).

    Raises:
        ArgumentTypeError: not real numbers (a string, None, a bool, a complex number).
        ValueError: NaN or infinite entries.
    """
    hint = " Pass a float or a floating-point tensor, e.g. torch.full((n,), 1e-3)."
    complex_scalar = isinstance(value, numbers.Complex) and not isinstance(value, numbers.Real)
    if value is None or isinstance(value, (str, bytes, bool)) or complex_scalar:
        raise ArgumentTypeError(f"`{name}` must be real numbers, got {value!r}.{hint}")
    if isinstance(value, Tensor):
        t = value.detach()
    else:
        try:
            t = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise ArgumentTypeError(
                f"`{name}` must be real numbers, got {type(value).__name__}.{hint}"
            ) from None
    if t.dtype == torch.bool or t.is_complex():
        raise ArgumentTypeError(f"`{name}` must be real numbers, got dtype {t.dtype}.{hint}")
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"`{name}` must be finite, got {t}.")
    return t


class Constraint:
    """A hyperparameter stored as an unconstrained leaf ``raw``, seen as ``transform(raw)``.

    Subclasses implement :meth:`transform`, :meth:`inverse` and :meth:`domain_error`.
    """

    raw: Tensor

    def transform(self, raw: Tensor) -> Tensor:
        """``value = transform(raw)`` (differentiable)."""
        raise NotImplementedError

    def inverse(self, value: Tensor) -> Tensor:
        """``raw = inverse(value)``."""
        raise NotImplementedError

    def domain_error(self, value: Tensor) -> str | None:
        """Why ``value`` is outside the constraint's domain (None when it is inside)."""
        if not _vocab.is_finite(value):
            return "is not finite (NaN or Inf)"
        return None

    def in_domain(self, value: Tensor) -> Tensor | None:
        """A 0-d boolean tensor, True exactly when :meth:`domain_error` is None, computed
        without a host synchronization (so many checks are read at once); None when the
        constraint has no such test (a subclass that only overrides :meth:`domain_error`),
        and :meth:`domain_error` must be asked."""
        if type(self).domain_error is not Constraint.domain_error:
            return None
        return torch.isfinite(value).all()

    @property
    def value(self) -> Tensor:
        """The current constrained value (detached)."""
        with torch.no_grad():
            return self.transform(self.raw)

    def _init_raw(self, value: Tensor) -> None:
        """``raw = inverse(value)``, refused when its dtype cannot represent ``value`` through
        the transform (``Positive`` of float32's largest value: ``exp`` overflows;
        ``Interval`` bounds too wide for the dtype: ``(high - low) * sigmoid`` overflows)."""
        with torch.no_grad():
            raw = self.inverse(value.clone())
            why = "is not finite" if not _vocab.is_finite(raw) else None
            why = why or self.domain_error(self.transform(raw))
        if why is not None:
            fixes = [] if why == "is not finite" else ["a value farther from the domain's edge"]
            if value.dtype != torch.float64:
                fixes.append("the value in float64 (torch.tensor(..., dtype=torch.float64))")
            if isinstance(self, Interval):
                fixes.append("narrower bounds")
            raise ValueError(
                f"{type(self).__name__}(value) cannot hold {value} in {value.dtype}: "
                f"transform(inverse(value)) {why}. Pass {', or '.join(fixes)}."
            )
        self.raw = raw.requires_grad_(True)

    def __repr__(self) -> str:
        settings = "".join(f", {k}={v!r}" for k, v in self._settings().items())
        return f"{type(self).__name__}(value={self.value}{settings})"

    def _settings(self) -> dict[str, Any]:
        """The constructor's other arguments, for the repr."""
        return {}


class Unconstrained(Constraint):
    """``value = raw``: a plain tensor hyperparameter (what ``hparams={'w': tensor}`` means).

    Args:
        value: a floating-point leaf tensor, used as is (the outer optimizer updates it in
            place, as with any ``torch.optim`` parameter), or numbers to build one from.
    """

    def __init__(self, value: Tensor | float):
        if isinstance(value, Tensor):
            if value.dtype == torch.bool or not value.is_floating_point():
                raise ArgumentTypeError(
                    f"A tensor hyperparameter must be floating point, got dtype {value.dtype}; "
                    "convert it with .float() or .double()."
                )
            self.raw = value
        else:
            self.raw = as_value(value, "value").requires_grad_(True)

    def transform(self, raw: Tensor) -> Tensor:
        return raw

    def inverse(self, value: Tensor) -> Tensor:
        return value

    @property
    def value(self) -> Tensor:
        return self.raw.detach()


class Positive(Constraint):
    """``value = exp(raw)`` (default) or ``softplus(raw)``: always > 0.

    Args:
        value: initial value(s), all > 0 (a float, a sequence, an array or a tensor).
        transform: ``"exp"`` or ``"softplus"``.
    """

    def __init__(self, value: Tensor | float, transform: str = "exp"):
        self.kind = as_choice(transform, "transform", ("exp", "softplus"))
        v = as_value(value, "value")
        if not bool((v > 0).all()):
            raise ValueError(f"Positive(value) needs every initial value > 0, got {v}.")
        self._init_raw(v)

    def _settings(self) -> dict[str, Any]:
        return {"transform": self.kind}

    def transform(self, raw: Tensor) -> Tensor:
        return raw.exp() if self.kind == "exp" else F.softplus(raw)

    def inverse(self, value: Tensor) -> Tensor:
        if self.kind == "exp":
            return value.log()
        return value + torch.log(-torch.expm1(-value))  # softplus^{-1}, stable

    def domain_error(self, value: Tensor) -> str | None:
        if bool((value <= 0).any()):
            return f"reached 0 ({self.kind}(raw) underflowed), outside Positive's domain (0, inf)"
        if bool(torch.isinf(value).any()):
            return f"reached inf ({self.kind}(raw) overflowed), outside Positive's domain"
        return super().domain_error(value)

    def in_domain(self, value: Tensor) -> Tensor | None:
        if type(self).domain_error is not Positive.domain_error:
            return None
        return ((value > 0) & torch.isfinite(value)).all()  # NaN fails ``> 0``


class Interval(Constraint):
    """``value = low + (high - low) * sigmoid(raw)``: always in ``(low, high)``.

    Args:
        value: initial value(s), strictly inside ``(low, high)``.
        low, high: finite bounds, ``low < high``.
    """

    def __init__(self, value: Tensor | float, low: float = 0.0, high: float = 1.0):
        self.low = as_float(low, "low")
        self.high = as_float(high, "high")
        if not self.low < self.high:
            raise ValueError(f"Interval needs low < high, got low={low}, high={high}.")
        v = as_value(value, "value")
        if not bool(((v > self.low) & (v < self.high)).all()):
            raise ValueError(
                f"Interval(value) needs every initial value inside ({low}, {high}), got {v}."
            )
        self._init_raw(v)

    def _settings(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high}

    def transform(self, raw: Tensor) -> Tensor:
        return self.low + (self.high - self.low) * torch.sigmoid(raw)

    def inverse(self, value: Tensor) -> Tensor:
        u = (value - self.low) / (self.high - self.low)
        return torch.log(u) - torch.log1p(-u)

    def domain_error(self, value: Tensor) -> str | None:
        finite = super().domain_error(value)
        if finite is not None:
            return finite
        if bool(((value <= self.low) | (value >= self.high)).any()):
            return (
                f"saturated to a bound of Interval({self.low:g}, {self.high:g}) "
                "(sigmoid(raw) rounded to 0 or 1)"
            )
        return None

    def in_domain(self, value: Tensor) -> Tensor | None:
        if type(self).domain_error is not Interval.domain_error:
            return None
        return ((value > self.low) & (value < self.high)).all()  # NaN and inf fail
