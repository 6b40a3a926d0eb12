"""Batches as the hyper-optimizer keeps them: copies in memory, tensors plus plain data on disk.

A trajectory window replays the training batches of its steps, so it keeps *copies*
(:func:`copy_batch`): refilling the caller's buffer in place cannot change the replay.

A checkpoint must load with ``torch.load(weights_only=True)``, which reads tensors and plain
containers only, not namedtuples, dataclasses or numpy arrays. :func:`pack` turns a batch
into its tensors and a plain-data description of its structure; :func:`unpack` rebuilds it:
tuples, lists, dicts (as ``dict``), numpy arrays and scalars (as numpy), Python scalars,
strings and None exactly; namedtuples and dataclasses as their own class when that class
is importable from a module already imported (looked up by module and qualified name; a
checkpoint never causes an import), otherwise as an equivalent namedtuple or a
``types.SimpleNamespace`` with the same fields.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import sys
from collections.abc import Mapping, MutableMapping
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["copy_batch", "pack", "unpack"]

_PLAIN = (type(None), bool, int, float, str)


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _is_record(x: Any) -> bool:
    """A namedtuple, a dataclass instance or a SimpleNamespace: named fields."""
    dataclass = dataclasses.is_dataclass(x) and not isinstance(x, type)
    return _is_namedtuple(x) or dataclass or isinstance(x, SimpleNamespace)


def _fields(x: Any) -> list[str]:
    if _is_namedtuple(x):
        return list(type(x)._fields)
    if dataclasses.is_dataclass(x):
        return [f.name for f in dataclasses.fields(x)]
    return list(vars(x))  # SimpleNamespace


def _copy_record(batch: Any) -> Any:
    if _is_namedtuple(batch):
        return type(batch)(*(copy_batch(v) for v in batch))
    out = copy.copy(batch)
    for name in _fields(batch):
        object.__setattr__(out, name, copy_batch(getattr(batch, name)))
    return out


def copy_batch(batch: Any) -> Any:
    """A copy of ``batch`` sharing no tensor or array memory with it (same types)."""
    if isinstance(batch, Tensor):
        return batch.detach().clone()
    if isinstance(batch, np.ndarray):
        return batch.copy()
    if isinstance(batch, (*_PLAIN, np.generic)):
        return batch
    if _is_record(batch):
        return _copy_record(batch)
    if isinstance(batch, (tuple, list)):
        return type(batch)(copy_batch(v) for v in batch)
    if type(batch) is dict:
        return {k: copy_batch(v) for k, v in batch.items()}
    if isinstance(batch, MutableMapping):
        out = copy.copy(batch)
        for k, v in batch.items():
            out[k] = copy_batch(v)
        return out
    try:
        return copy.deepcopy(batch)
    except RuntimeError:  # torch: a non-leaf tensor (one computed with grad) has no deepcopy
        if not hasattr(batch, "__dict__"):
            raise ValueError(
                f"A training batch of type {type(batch).__name__} holds a tensor computed with "
                "autograd, which cannot be deep-copied for the replay; detach it, or pass a "
                "tuple, dict or dataclass of tensors."
            ) from None
    out = copy.copy(batch)  # an object of the user's class: its attributes copied one by one
    for name, value in vars(batch).items():
        object.__setattr__(out, name, copy_batch(value))
    return out


def _pack_leaf(batch: Any, tensors: list[Tensor]) -> dict[str, Any] | None:
    if isinstance(batch, Tensor):
        tensors.append(batch.detach())
        return {"t": "tensor", "i": len(tensors) - 1, "device": str(batch.device)}
    if isinstance(batch, (np.ndarray, np.generic)):
        try:
            tensors.append(torch.from_numpy(np.array(batch, copy=True)))
        except TypeError:
            raise ValueError(
                f"A batch holds a numpy array of dtype {batch.dtype}, which a checkpoint cannot "
                "store as a tensor; convert it to numbers or tensors."
            ) from None
        kind = "numpy" if isinstance(batch, np.ndarray) else "numpy_scalar"
        return {"t": kind, "i": len(tensors) - 1}
    if isinstance(batch, _PLAIN):
        return {"t": "value", "v": batch}
    return None


def pack(batch: Any, tensors: list[Tensor]) -> Any:
    """The plain-data description of ``batch``; its tensors are appended to ``tensors``.

    Raises:
        ValueError: the batch holds an object a checkpoint cannot store.
    """
    leaf = _pack_leaf(batch, tensors)
    if leaf is not None:
        return leaf
    if isinstance(batch, Mapping):
        keys = list(batch)
        if not all(isinstance(k, (str, int)) for k in keys):
            raise ValueError("A batch's dict keys must be strings or integers to be checkpointed.")
        return {"t": "dict", "keys": keys, "items": [pack(batch[k], tensors) for k in keys]}
    if _is_record(batch):
        cls, names = type(batch), _fields(batch)
        return {
            "t": "namedtuple" if _is_namedtuple(batch) else "record",
            "module": cls.__module__,
            "qualname": cls.__qualname__,
            "fields": names,
            "items": [pack(getattr(batch, n), tensors) for n in names],
        }
    if isinstance(batch, (tuple, list)):
        kind = "tuple" if isinstance(batch, tuple) else "list"
        return {"t": kind, "items": [pack(v, tensors) for v in batch]}
    raise ValueError(
        f"A training batch holds a {type(batch).__name__}, which a checkpoint cannot store; "
        "batches must be made of tensors, numpy arrays, numbers, strings, and tuples, lists, "
        "dicts, namedtuples or dataclasses of those."
    )


def _find_class(module: str, qualname: str) -> type | None:
    obj: Any = sys.modules.get(module)  # never imports: only modules already loaded
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) else None


def _rebuild(desc: Mapping[str, Any], items: list[Any]) -> Any:
    found = _find_class(desc["module"], desc["qualname"])
    names = list(desc["fields"])
    if desc["t"] == "namedtuple":
        same = found is not None and issubclass(found, tuple)
        if same and list(getattr(found, "_fields", ())) == names:
            return found(*items)  # type: ignore[misc]
        return collections.namedtuple(desc["qualname"].split(".")[-1], names)(*items)
    if found is None or not dataclasses.is_dataclass(found):
        return SimpleNamespace(**dict(zip(names, items)))
    if [f.name for f in dataclasses.fields(found)] != names:
        return SimpleNamespace(**dict(zip(names, items)))
    out = object.__new__(found)
    for n, v in zip(names, items):
        object.__setattr__(out, n, v)
    return out


def unpack(desc: Any, tensors: list[Tensor]) -> Any:
    """Inverse of :func:`pack`.

    Raises:
        ValueError: a malformed description (a checkpoint that was not written by
            :func:`pack`).
    """
    try:
        kind = desc["t"]
        if kind == "tensor":  # on its device, whatever torch.load's map_location was
            return tensors[desc["i"]].to(desc["device"])
        if kind in ("numpy", "numpy_scalar"):
            arr = tensors[desc["i"]].cpu().numpy().copy()
            return arr if kind == "numpy" else arr[()]
        if kind == "value":
            return desc["v"]
        items = [unpack(d, tensors) for d in desc["items"]]
        if kind == "dict":
            return dict(zip(desc["keys"], items))
        if kind in ("tuple", "list"):
            return tuple(items) if kind == "tuple" else items
        if kind in ("namedtuple", "record"):
            return _rebuild(desc, items)
    except (KeyError, IndexError, TypeError, RuntimeError) as err:
        raise ValueError(f"A stored batch is malformed ({err!r}).") from None
    raise ValueError(f"A stored batch has an unknown kind {kind!r}.")
