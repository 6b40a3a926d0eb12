"""``check_arity``: whether a user's function takes the arguments a method passes it."""

from __future__ import annotations

import contextlib
import inspect
import types
import weakref
from collections.abc import Callable
from typing import Any

from .._vocab import ArgumentTypeError

__all__ = ["check_arity"]


def check_arity(fn: Callable[..., Any], n: int, name: str, signature: str, hint: str) -> None:
    """Raise if ``fn`` cannot be called with ``n`` positional arguments.

    Functions whose signature Python cannot read (some builtins) are accepted as they are.
    An accepted ``(fn, n)`` is remembered while ``fn`` lives, for a plain function without
    defaults by its code object (closures made again at each call share it): reading a
    signature is about 3% of a small implicit call, 0.2 training steps of a small T1T2 one.
    """
    key = _bind_key(fn)
    try:
        if n in _BINDS.get(key, ()):
            return
    except TypeError:  # unhashable, or no weak reference to it
        pass
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*([None] * n))
    except TypeError:
        raise ArgumentTypeError(
            f"`{name}` must take {signature} ({n} arguments), but its signature is "
            f"{name}{sig}. {hint}"
        ) from None
    with contextlib.suppress(TypeError):
        _BINDS.setdefault(key, set()).add(n)


_BINDS: weakref.WeakKeyDictionary[Any, set[int]] = weakref.WeakKeyDictionary()


def _bind_key(fn: Any) -> Any:
    """``fn``'s code object when it alone decides the signature (a plain function without
    defaults, ``__signature__`` or ``__wrapped__``), else ``fn``."""
    if type(fn) is not types.FunctionType or fn.__defaults__ or fn.__kwdefaults__:
        return fn
    own = fn.__dict__
    return fn if "__signature__" in own or "__wrapped__" in own else fn.__code__
