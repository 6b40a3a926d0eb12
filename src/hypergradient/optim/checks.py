"""What :meth:`FunctionalOptimizer.update <hypergradient.optim.FunctionalOptimizer.update>`
is given, checked before anything is computed: lists of matching lengths and shapes, a step
count (or one per parameter) that is a non-negative int, and ``settings`` that obey the
constructor's rules (known names; a floating-point scalar tensor, or a finite number in the
setting's range).

Without these checks a negative step count made Adam's bias correction ``1 - beta1^0 = 0``
(``ZeroDivisionError``, or silently infinite parameters with a tensor ``beta1``), a step
list shorter than the parameters an ``IndexError``, and a vector ``lr`` given to the
update ``RuntimeError: shape '[]' is invalid``, and a twin made by ``from_torch`` for other
parameters than those it steps an ``IndexError`` (or, for fewer, silently the first ones'
param groups).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from .._vocab import ArgumentTypeError, as_float

__all__ = ["RANGES", "check_setting_names", "check_settings", "check_step", "check_update"]

#: ``[low, high)`` of the settings of this package's optimizers (high None: unbounded), as
#: their constructors check them; a setting of another name need only be finite.
RANGES: dict[str, tuple[float, float | None]] = {
    "lr": (0.0, None),
    "momentum": (0.0, None),
    "dampening": (0.0, None),
    "weight_decay": (0.0, None),
    "eps": (0.0, None),
    "beta1": (0.0, 1.0),
    "beta2": (0.0, 1.0),
}


def check_update(
    opt: Any, params: Sequence[Tensor], grads: Sequence[Any], state: Any, step: Any = None
) -> None:
    """``ValueError`` unless there is a gradient (or None) of each parameter's shape,
    ``opt.buffers`` state tensors per parameter (``zip`` would drop the rest), per-parameter
    lists of ``from_torch`` (``group_of``, ``offsets``) of the same length and, if ``step``
    is given, a valid step count (:func:`check_step`)."""
    name = type(opt).__name__
    if not (hasattr(params, "__len__") and hasattr(grads, "__len__") and hasattr(state, "__len__")):
        raise ArgumentTypeError(f"{name}.update takes lists, not iterators.")
    n = len(params)
    if len(grads) != n or len(state) != opt.buffers * n:
        raise ValueError(
            f"{name}.update: {n} params need {n} grads and {opt.buffers * n} state tensors "
            f"({opt.buffers} per parameter, as init() makes them); got {len(grads)} and "
            f"{len(state)}."
        )
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is not None and g.shape != p.shape:
            raise ValueError(
                f"{name}.update: grads[{i}] has shape {tuple(g.shape)}, params[{i}] "
                f"{tuple(p.shape)}."
            )
    for attr in ("group_of", "offsets"):  # from_torch's per-parameter lists
        per = getattr(opt, attr, None)
        if per is not None and len(per) != n:
            raise ValueError(
                f"{name}.update: {n} params, but the optimizer's `{attr}` has an entry for each "
                f"of {len(per)} (from_torch(optimizer, params) was given other params): make "
                "the twin from the parameters the run steps, in the same order."
            )
    if step is not None:
        check_step(step, n, name)


def check_step(step: Any, n: int, name: str = "update") -> None:
    """``step``: the number of updates before this one, an int >= 0, or a list or tuple of
    ``n`` of them (one per parameter); ``ArgumentTypeError`` / ``ValueError`` otherwise."""
    if type(step) is int and step >= 0:
        return  # the usual case
    counts = step if isinstance(step, (list, tuple)) else None
    if counts is not None and len(counts) != n:
        raise ValueError(
            f"{name}.update: `step` has {len(counts)} counts for {n} params (one per "
            "parameter, or one int for all)."
        )
    for c in [step] if counts is None else counts:
        if type(c) is not int:  # bool, float, numpy or tensor: _count would misread it
            raise ArgumentTypeError(
                f"{name}.update: `step` must be an int (or a list of one int per parameter), "
                f"got {type(c).__name__} {c!r:.40}; pass int(step)."
            )
        if c < 0:
            raise ValueError(
                f"{name}.update: `step` counts the updates before this one and must be >= 0, "
                f"got {c} (Adam's bias correction 1 - beta1^(step + 1) would be 0 or less)."
            )


def check_settings(opt: Any, settings: Mapping[str, Any]) -> None:
    """``settings`` given to an update: names ``opt`` has, values that are floating-point
    scalar tensors (their values are not read: no host synchronization) or finite numbers in
    the setting's :data:`RANGES`."""
    check_setting_names(opt, settings)
    for key, value in settings.items():
        what = f"settings[{key!r}]"
        if isinstance(value, Tensor):
            if value.numel() != 1 or not value.is_floating_point():
                raise ArgumentTypeError(
                    f"`{what}` must be a floating-point scalar tensor (one value for every "
                    f"parameter), got shape {tuple(value.shape)} and dtype {value.dtype}."
                )
            continue
        low, high = RANGES.get(key, (None, None))
        fine = type(value) is float and math.isfinite(value)
        if fine and (low is None or value >= low) and (high is None or value < high):
            continue  # the usual case
        as_float(value, what, min=low, max=high, open_max=high is not None)


def check_setting_names(optimizer: Any, settings: Mapping[str, Any]) -> None:
    """Refuse ``settings`` that name no setting of ``optimizer`` (a typo, or torch's ``betas``
    for Adam's ``beta1``/``beta2``: silently a zero hypergradient)."""
    known = getattr(optimizer, "settings", None)
    if isinstance(known, Mapping) and not known.keys() >= dict(settings).keys():
        bad = sorted(set(settings) - set(known))
        raise ValueError(
            f"`settings` names {bad}, which {type(optimizer).__name__} does not have: its "
            f"settings are {sorted(known)} (Adam's betas are 'beta1' and 'beta2')."
        )
