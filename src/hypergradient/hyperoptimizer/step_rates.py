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
in ``phi`` is 0 at the step's start), and ``maximize`` is refused.

``torch.optim.Adam`` and ``AdamW`` step each entry by ``-lr / bc1 * m / (sqrt(v / bc2) +
eps)`` with ``m = b1 m0 + (1 - b1) g``, ``v = b2 v0 + (1 - b2) g^2`` (AMSGrad: the largest
``v`` so far), ``bc = 1 - beta^t``: ``R`` is the diagonal of that map's derivative in ``g``
at the step's gradient (``.grad``, plus ``weight_decay * theta`` for Adam's coupled decay),
per entry, of either sign (:func:`adam_rates`). Other optimizers (RMSprop, NAdam, ...) keep
the learning rate alone: T1T2's documented approximation of their step.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .._vocab import HypergradientWarning

__all__ = ["EXACT", "adam_rates", "exact_rates", "momentum_factors", "warn_inexact", "with_factors"]

#: The inner optimizers whose step T1T2 differentiates exactly.
EXACT = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def warn_inexact(optimizer: torch.optim.Optimizer) -> None:
    """Warn (at a T1T2 hyper-optimizer's construction) that T1T2 takes a step of an optimizer
    other than :data:`EXACT`'s as SGD's with its learning rate: with RMSprop a probe's
    hypergradient came out -1.05e-4 for a finite difference of +5.6e-3, with no word."""
    if type(optimizer) in EXACT:
        return
    warnings.warn(
        f"T1T2 differentiates the step of torch.optim.SGD, Adam or AdamW exactly; it takes a "
        f"{type(optimizer).__name__} step as an SGD step with the learning rate, ignoring how "
        "that optimizer rescales the gradient, so its hypergradient is an approximation that "
        "can have the wrong sign. Use hg.IFT() or hg.HOAG() (they differentiate at the "
        "weights, whatever the optimizer), or SGD, Adam or AdamW as the inner optimizer.",
        HypergradientWarning,
        stacklevel=4,
    )


def exact_rates(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor], rates: Sequence[float], saved: Any
) -> tuple[float | Tensor, ...] | float | None:
    """T1T2's ``Problem.lr`` for the step from ``saved`` (the step's transaction: the inner
    optimizer's ``state_dict()`` and the weights before the step), given each trained
    parameter's learning ``rates``: Adam's per-entry rates, SGD's ``lr * k``; None when the
    learning rates alone are exact (plain SGD) or all T1T2 can take (other optimizers)."""
    adam = adam_rates(optimizer, params, rates, saved.inner, saved.params_before)
    if adam is not None:
        return adam
    factors = momentum_factors(optimizer, params, saved.inner)
    return None if factors is None else with_factors(tuple(rates), factors)


def _positions(optimizer: torch.optim.Optimizer) -> dict[int, tuple[int, int]]:
    """``id(param) -> (group, position in the state_dict)``."""
    index, position = {}, 0
    for g, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            index[id(p)] = (g, position)
            position += 1
    return index


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
    index = _positions(optimizer)
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


def adam_rates(
    optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor],
    rates: Sequence[float],
    before: Mapping[str, Any] | None,
    theta: Sequence[Tensor] | None,
) -> tuple[float | Tensor, ...] | float | None:
    """Per trained parameter, ``-d theta' / d g`` of the ``torch.optim.Adam`` or ``AdamW``
    step from the state ``before`` (a ``state_dict()``) at the weights ``theta`` (both
    before the step), with the step's learning ``rates`` (one per parameter): a tensor of
    the parameter's shape, or 0.0 where the step did not move it (no ``.grad``, ``lr`` 0);
    0.0 when it moved none. None for another optimizer, or without ``before``/``theta``."""
    if before is None or theta is None:
        return None
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return None
    groups, state = before.get("param_groups", ()), before.get("state", {})
    index = _positions(optimizer)
    out: list[float | Tensor] = []
    for p, t, lr in zip(params, theta, rates):
        g, i = index.get(id(p), (0, -1))
        settings = groups[g] if g < len(groups) else optimizer.param_groups[g]
        if p.grad is None or lr == 0.0 or p.grad.is_sparse:
            out.append(0.0)
            continue
        default = type(optimizer) is torch.optim.AdamW  # torch < 2.6 has no such key
        decoupled = bool(settings.get("decoupled_weight_decay", default))
        out.append(_adam_entry(settings, state.get(i, {}), p.grad, t, lr, decoupled))
    return tuple(out) if any(isinstance(r, Tensor) for r in out) else 0.0


def _adam_entry(
    settings: Mapping[str, Any],
    state: Mapping[str, Any],
    grad: Tensor,
    theta: Tensor,
    lr: float,
    decoupled: bool,
) -> Tensor:
    """``lr / bc1 * d/dg [m / (sqrt(v / bc2) + eps)]`` per entry, in float64 (CPU) or
    float32, at the step's gradient (``grad``, plus the coupled decay at ``theta``)."""
    wide = torch.float64 if grad.device.type == "cpu" else torch.float32
    b1, b2 = (float(b) for b in settings["betas"])
    eps, wd = float(settings["eps"]), float(settings.get("weight_decay", 0.0) or 0.0)
    g = grad.detach().to(wide)
    if wd and not decoupled:
        g = g + wd * theta.detach().to(wide)
    zero = torch.zeros_like(g)
    m0 = state.get("exp_avg", zero).to(wide)
    v0 = state.get("exp_avg_sq", zero).to(wide)
    step = state.get("step", 0.0)  # a tensor (on the device when capturable): no host read
    t = torch.as_tensor(step, dtype=wide, device=g.device) + 1.0
    bc1, bc2 = 1.0 - torch.pow(b1, t), 1.0 - torch.pow(b2, t)
    m = b1 * m0 + (1.0 - b1) * g
    v = b2 * v0 + (1.0 - b2) * g * g
    dv = 2.0 * (1.0 - b2) * g  # dv/dg
    if settings.get("amsgrad", False):
        high = state.get("max_exp_avg_sq", zero).to(wide)
        dv = torch.where(v >= high, dv, zero)  # the largest v: g's only where it is v
        v = torch.maximum(high, v)
    root = v.sqrt()
    denom = root / bc2.sqrt() + eps
    droot = torch.where(root > 0, dv / (2.0 * root.clamp_min(torch.finfo(wide).tiny)), zero)
    du = (1.0 - b1) / denom - m / denom**2 * (droot / bc2.sqrt())
    return (lr / bc1) * du
