"""The differentiable twins of ``torch.optim.SGD`` and ``torch.optim.Adam``, with their state.

:func:`from_torch` reads a torch optimizer's settings, buffers and step counts into a
:class:`~hypergradient.optim.functional.FunctionalOptimizer` and its state, so that a
differentiable replay continues exactly where the torch optimizer is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._vocab import ArgumentTypeError
from .checks import check_setting_names
from .functional import SGD, Adam, FunctionalOptimizer

__all__ = [
    "check_setting_names",
    "PER_GROUP",
    "adam_twin",
    "from_torch",
    "group_settings",
    "sgd_twin",
    "with_groups",
    "zeros_or_copy",
]


#: Settings that may differ between param groups (each parameter steps with its group's).
PER_GROUP = ("lr", "weight_decay")


def group_settings(optimizer: torch.optim.Optimizer, keys: Sequence[str]) -> dict[str, Any]:
    """The first param group's ``keys``; the others must agree but in :data:`PER_GROUP`."""
    groups = optimizer.param_groups
    first = {k: groups[0][k] for k in keys}
    for g in groups[1:]:
        for k in keys:
            a, b = g[k], first[k]
            if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
                a, b = tuple(a), tuple(b)  # betas from a config file: a list, not a tuple
            tensor = isinstance(a, Tensor) or isinstance(b, Tensor)
            same = a is b if tensor else a == b
            if not same and (k not in PER_GROUP or tensor):  # a tensor in any group: refused
                raise ValueError(
                    f"The inner optimizer's param groups differ in `{k}`; trajectory methods "
                    f"support per-group {' and '.join(PER_GROUP)} as numbers only (a tensor "
                    f"setting, e.g. a tuned learning rate, must be the same tensor in every "
                    f"group): give the groups one `{k}`."
                )
    return first


def with_groups(
    fopt: FunctionalOptimizer, optimizer: torch.optim.Optimizer, params: Sequence[Tensor]
) -> FunctionalOptimizer:
    """Give ``fopt`` the param groups' own :data:`PER_GROUP` settings (``fopt.groups``,
    ``fopt.group_of``) where they differ from the first group's."""
    groups = optimizer.param_groups
    own = [
        {k: float(g[k]) for k in PER_GROUP if k in g and g[k] != groups[0][k]} for g in groups[1:]
    ]
    if not any(own):
        return fopt
    index = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
    fopt.groups = own
    fopt.group_of = [index.get(id(p), 0) for p in params]
    fopt.group_shapes = [tuple(p.shape) for p in params]
    return fopt


def from_torch(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor], *, tuned: Sequence[str] = ()
) -> tuple[FunctionalOptimizer, list[Tensor] | None, int]:
    """The functional twin of a ``torch.optim.SGD``, ``Adam`` or ``AdamW`` and its state.

    Returns ``(functional_optimizer, state, step)``: the same update rule and settings,
    the optimizer's current buffers for ``params`` (in that order; None before the first
    step; zeros for a parameter that never had a gradient) and how many steps it has
    taken, so a differentiable replay continues exactly where the torch optimizer is.

    Step counts are per parameter in ``torch.optim`` (a parameter whose ``.grad`` was None
    was skipped); where they differ, ``step`` is the largest and the functional optimizer's
    ``offsets`` hold each parameter's count minus ``step`` (trajectory methods read them).

    ``tuned`` names the settings a replay will supply as tensors (``update(...,
    settings=...)``, e.g. hyperparameters linked to the optimizer): an SGD whose
    ``momentum`` is tuned keeps momentum buffers even while its value is 0 (without them
    the momentum's effect, and its hypergradient, would be lost).

    ``params`` may be any iterable of the optimizer's parameters (a generator included).

    Raises:
        ValueError: a tensor of ``params`` that the optimizer does not step.
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``, ``tuned`` a string; for
            other optimizers (their update rules are not implemented here) or
            options without a functional twin (``maximize``; ``amsgrad``, ``foreach`` and
            ``fused`` variants are fine; ``AdamW`` is Adam with ``decoupled=True``).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ArgumentTypeError(
            f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}."
        )
    if isinstance(tuned, str):
        raise ArgumentTypeError(f"`tuned` must be a sequence of setting names, got {tuned!r}.")
    params = list(params)  # an iterator would be spent by the check below (state lost)
    for flag in ("maximize",):
        if any(g.get(flag, False) for g in optimizer.param_groups):
            raise ArgumentTypeError(
                f"`{flag}=True` has no differentiable twin in hypergradient.optim; use "
                "torch.optim.SGD, Adam or AdamW without it (a weight_decay is "
                "fine), or an implicit method (hg.IFT, hg.HOAG, hg.T1T2)."
            )
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    stray = [i for i, p in enumerate(params) if id(p) not in owned]
    if stray:
        raise ValueError(
            f"params[{stray[0]}] is not a parameter of the optimizer, whose settings and "
            "buffers the twin takes; pass the parameters the optimizer steps."
        )
    if type(optimizer) is torch.optim.SGD:
        return sgd_twin(optimizer, params, "momentum" in tuned)
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        return adam_twin(optimizer, params)
    raise ArgumentTypeError(
        f"Trajectory methods replay the inner optimizer differentiably; {type(optimizer).__name__} "
        "has no functional twin. Use torch.optim.SGD, Adam or AdamW, or an implicit method "
        "(hg.IFT, hg.HOAG, hg.T1T2)."
    )


def sgd_twin(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor], tuned_momentum: bool
) -> tuple[FunctionalOptimizer, list[Tensor] | None, int]:
    s = group_settings(optimizer, ("lr", "momentum", "dampening", "weight_decay", "nesterov"))
    momentum = s["momentum"]
    if tuned_momentum and not isinstance(momentum, Tensor) and momentum == 0:
        momentum = torch.zeros(())  # a tensor setting: buffers kept, value supplied by replay
    fopt = SGD(s["lr"], momentum, s["dampening"], s["weight_decay"], s["nesterov"])
    with_groups(fopt, optimizer, params)
    bufs = [optimizer.state.get(p, {}).get("momentum_buffer") for p in params]
    if not fopt.uses_momentum or all(b is None for b in bufs):
        return fopt, None, 0
    # A parameter that never had a gradient (unused by the loss) has no buffer: zeros, not
    # a fresh start for every parameter (that dropped the others' momentum), and its own
    # count 0 (its first update starts its buffer at its gradient, as torch's does).
    if any(b is None for b in bufs):
        fopt.offsets = [-1 if b is None else 0 for b in bufs]
    return fopt, [zeros_or_copy(b, p) for b, p in zip(bufs, params)], 1


def adam_twin(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor]
) -> tuple[FunctionalOptimizer, list[Tensor] | None, int]:
    s = group_settings(optimizer, ("lr", "betas", "eps", "weight_decay"))
    # torch < 2.6: AdamW is no Adam and its groups have no `decoupled_weight_decay` key
    default = type(optimizer) is torch.optim.AdamW
    decoupled = {bool(g.get("decoupled_weight_decay", default)) for g in optimizer.param_groups}
    if len(decoupled) > 1:
        raise ValueError(
            "The inner optimizer's param groups differ in `decoupled_weight_decay`; give them "
            "one (trajectory methods replay one Adam update rule)."
        )
    amsgrad = bool(group_settings(optimizer, ("amsgrad",))["amsgrad"])
    betas = tuple(s["betas"])
    adam = Adam(
        s["lr"], betas, s["eps"], s["weight_decay"], decoupled=decoupled.pop(), amsgrad=amsgrad
    )
    fopt = with_groups(adam, optimizer, params)
    st = [optimizer.state.get(p, {}) for p in params]
    if all("exp_avg" not in x for x in st):
        return fopt, None, 0
    # torch counts steps per parameter (a step without a gradient does not count): each
    # parameter's own count, as offsets from the largest.
    counts = [int(x["step"]) if "exp_avg" in x else 0 for x in st]
    step0 = max(counts)
    if any(c != step0 for c in counts):
        fopt.offsets = [c - step0 for c in counts]
    # A parameter that never had a gradient (unused by the loss) has no moments: zeros,
    # not a fresh start for every parameter (that dropped the others' moments).
    avg = [zeros_or_copy(x.get("exp_avg"), p) for x, p in zip(st, params)]
    sq = [zeros_or_copy(x.get("exp_avg_sq"), p) for x, p in zip(st, params)]
    high = [zeros_or_copy(x.get("max_exp_avg_sq"), p) for x, p in zip(st, params) if amsgrad]
    return fopt, avg + sq + high, step0


def zeros_or_copy(buffer: Tensor | None, like: Tensor) -> Tensor:
    """A detached copy of an optimizer buffer, or zeros shaped like ``like`` if it is None."""
    return torch.zeros_like(like.detach()) if buffer is None else buffer.detach().clone()
