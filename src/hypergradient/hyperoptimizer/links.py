"""Optimizer-setting links (``optimizer_hparams={'lr': 'lr'}``): a scalar hyperparameter
that is the value of a numeric setting of the inner ``torch.optim`` optimizer.

A setting is numeric when it is a real number or a 0-d floating-point tensor (``lr`` as a
tensor: compiled and capturable optimizers). A tensor setting is written in place, so an
optimizer step compiled on it keeps reading it; a number is replaced.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .._vocab import ArgumentTypeError

__all__ = ["check_links", "link_conflict", "numeric", "write_links"]


def numeric(value: Any) -> bool:
    """A real number (not a bool) or a 0-d floating-point tensor."""
    if isinstance(value, Tensor):
        return value.dim() == 0 and value.is_floating_point()
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_links(
    links: Any, optimizer: torch.optim.Optimizer | None, raw: Mapping[str, Tensor]
) -> dict[str, str]:
    """``links`` as ``{setting: name}``, after checking that each setting is numeric in the
    optimizer's param groups and each name a scalar hyperparameter of ``raw``.

    Raises:
        ArgumentTypeError: ``links`` is not a dict.
        ValueError: a setting that is not numeric, a name not in ``raw``, or not a scalar.
    """
    if not isinstance(links, Mapping):
        raise ArgumentTypeError(
            f"`optimizer_hparams` must be a dict {{setting: hparams name}}, got {links!r}."
        )
    groups = [{}] if optimizer is None else optimizer.param_groups
    out = {}
    for setting, name in links.items():
        if not all(numeric(g.get(setting)) for g in groups):
            found = sorted(k for k, v in groups[0].items() if numeric(v))
            raise ValueError(
                f"optimizer_hparams key {setting!r} is not a numeric setting of the inner "
                f"{type(optimizer).__name__} in every param group (a number or a 0-d "
                f"floating-point tensor; its numeric settings: {found}); link one of those."
            )
        if name not in raw:
            raise ValueError(
                f"optimizer_hparams[{setting!r}] = {name!r} is not in hparams ({sorted(raw)})."
            )
        if raw[name].numel() != 1:
            raise ValueError(
                f"hparams[{name!r}] tunes `{setting}` and must be a scalar, got shape "
                f"{tuple(raw[name].shape)}."
            )
        out[str(setting)] = str(name)
    return out


def write_links(
    links: Mapping[str, str], values: Mapping[str, Tensor], optimizer: torch.optim.Optimizer
) -> None:
    """Write each linked value into every param group (a tensor setting in place)."""
    for setting, name in links.items():
        value = float(values[name])
        for g in optimizer.param_groups:
            current = g[setting]
            if isinstance(current, Tensor):
                with torch.no_grad():
                    current.fill_(value)
            else:
                g[setting] = value


def link_conflict(
    links: Mapping[str, str], values: Mapping[str, Tensor], optimizer: torch.optim.Optimizer
) -> str | None:
    """Why a linked setting in ``optimizer`` is not the hyperparameter's value (it was written
    after the driver: a learning-rate scheduler, a warm-up), or None."""
    for setting, name in links.items():
        want = float(values[name])
        for i, g in enumerate(optimizer.param_groups):
            have: Any = g.get(setting)
            if not numeric(have) or float(have) != want:
                return (
                    f"the inner optimizer's {setting!r} (param group {i}) is "
                    f"{have!r} at the window's start, not {want!r}, the value of "
                    f"the hyperparameter {name!r} it is linked to (optimizer_hparams): the "
                    "replay would step with the hyperparameter, the training did not. A "
                    "linked setting is the hyperparameter's: do not step a learning-rate "
                    "scheduler on it (tune an unlinked setting instead, or unlink it)"
                )
    return None
