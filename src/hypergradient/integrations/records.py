"""The numbers of a hyper-step record, by name: what every logger of
:mod:`hypergradient.integrations.loggers` writes (the names are listed there)."""

from __future__ import annotations

import math
from typing import Any

from .._vocab import ArgumentTypeError, as_int
from ..hyperoptimizer import HyperStepRecord

__all__ = ["check_record", "record_scalars"]

#: Diagnostics that are not solver statistics (they have their own names, or are text).
_NOT_SOLVER = {"method", "seconds", "outer_loss", "status", "num_hvps"}


def check_record(record: Any) -> HyperStepRecord:
    """``record`` itself if it is a :class:`~hypergradient.HyperStepRecord`.

    Raises:
        ArgumentTypeError: it is not (a logger called with something else).
    """
    if not isinstance(record, HyperStepRecord):
        raise ArgumentTypeError(
            f"A logger receives HyperStepRecord objects, got {type(record).__name__}."
        )
    return record


def _hypergrad_key(name: str) -> str:
    """``hypergrad/<name>``; ``hypergrad/norm`` is the total's, so ``norm`` gets one more."""
    return "hypergrad/norm/norm" if name == "norm" else f"hypergrad/{name}"


def _loggable(key: str, value: Any) -> bool:
    """A numeric diagnostic the method computed (NaN: not computed, e.g. T1T2's
    ``inner_grad_norm`` with its hyperparameters-first product)."""
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return key not in _NOT_SOLVER and numeric and not math.isnan(value)


def record_scalars(record: HyperStepRecord, scalar_limit: int = 8) -> dict[str, float]:
    """Every number of a hyper-step record, by the names listed in
    :mod:`hypergradient.integrations.loggers`.

    Args:
        record: what the hyper-optimizer passes its logger.
        scalar_limit: hyperparameters with at most this many elements are written element
            by element; larger ones as mean, min, max and norm.

    Returns:
        ``{name: float}``, in a stable order.

    Raises:
        ValueError: two hyperparameters would be written under one name (``"w"`` of 2
            elements and ``"w/1"``; ``"norm"`` and ``"norm/norm"``).
    """
    scalar_limit = as_int(scalar_limit, "scalar_limit", min=1)
    out = {"loss/val": float(record.val_loss)}
    if record.holdout_scored:  # a NaN score too: it is not "no holdout"
        out["loss/holdout"] = float(record.holdout_loss)
    out["hypergrad/norm"] = float(record.hypergrad_norm)
    for name, summary in record.summaries.items():
        key = _hypergrad_key(name)
        if key in out:  # "norm" and "norm/norm"
            raise ValueError(
                f"Two hyperparameters' hypergradient norms would both be logged as {key!r} "
                f"(one of them is {name!r}); rename it."
            )
        out[key] = float(summary["hypergrad_norm"])
    out |= _hparam_scalars(record, scalar_limit)
    out["solver/num_hvps"] = float(record.info.num_hvps)
    out["solver/ok"] = 1.0 if record.info.status.ok else 0.0
    for key, value in record.diagnostics.items():
        if _loggable(key, value):
            out[f"solver/{key}"] = float(value)
    out["time/seconds"] = float(record.seconds)
    return out


def _hparam_scalars(record: HyperStepRecord, scalar_limit: int) -> dict[str, float]:
    """``hparams/...`` of :func:`record_scalars`; a name two hyperparameters would share
    (``"w"`` of 2 elements and ``"w/1"``) raises instead of writing one value over the other."""
    out: dict[str, float] = {}
    owner: dict[str, str] = {}
    for name, summary in record.summaries.items():
        value = record.hparams.get(name)
        if value is not None and value.numel() == 1:
            items = {f"hparams/{name}": float(value.reshape(()))}
        elif value is not None and value.numel() <= scalar_limit:
            flat = value.detach().reshape(-1).tolist()
            items = {f"hparams/{name}/{i}": float(v) for i, v in enumerate(flat)}
        else:
            stats = ("mean", "min", "max", "norm")
            items = {f"hparams/{name}/{stat}": float(summary[stat]) for stat in stats}
        for key in items:
            if key in owner:
                raise ValueError(
                    f"The hyperparameters {owner[key]!r} and {name!r} would both be logged "
                    f"as {key!r}; rename one of them."
                )
            owner[key] = name
        out |= items
    return out
