"""Validated public attributes of the HippoTrainer classes.

HippoTrainer's settings (``inner_steps``, ``num_terms``, ``epsilon``, ``cg_max_iter``,
``T``, ``weight_decay``) are plain attributes a user may reassign between epochs. A
:class:`Setting` checks every assignment, as the constructor does, so a bad value is named
when it is set instead of surfacing at a later hyper-step as another name's error (``maxiter``),
a ``ZeroDivisionError`` or, for ``T = 0``, one training step taken silently.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..._vocab import as_float, as_int

__all__ = ["Setting", "at_least_one", "non_negative", "optional_non_negative"]


class Setting:
    """A data descriptor whose assignments go through ``check(value, name)``."""

    def __init__(self, check: Callable[[Any, str], Any]):
        self.check = check
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        try:
            return obj.__dict__[self.name]
        except KeyError:
            raise AttributeError(self.name) from None

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.name] = self.check(value, self.name)


def at_least_one(value: Any, name: str) -> int:
    return as_int(value, name, min=1)


def non_negative(value: Any, name: str) -> float:
    return as_float(value, name, min=0.0)


def optional_non_negative(value: Any, name: str) -> float | None:
    return None if value is None else as_float(value, name, min=0.0)
