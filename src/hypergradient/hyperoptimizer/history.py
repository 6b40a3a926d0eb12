"""``HyperStepRecord`` and the bounded ``History`` of a hyper-optimizer, with a logging sink.

Every hyper-step produces one :class:`HyperStepRecord` holding the method's
:class:`~hypergradient.methods.base.Info`. :class:`History` keeps the last ``maxlen`` of them
(100 by default; None keeps all) and hands each to a logging sink, so that long runs keep
bounded memory and bounded checkpoints while a logger sees everything.

The newest record holds every hyperparameter's value and hypergradient in full (``
hopt.history[-1].hypergrad``); once a newer record arrives, per-hyperparameter tensors are
kept only for hyperparameters of at most :data:`SMALL` elements. Every record has summaries
(norm, mean, min, max of each value, norm of its hypergradient).
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from .._tree import wide_dtype
from .._vocab import ArgumentTypeError, Status, as_optional_int
from ..methods.base import Info

__all__ = ["SMALL", "History", "HyperStepRecord", "make_record"]

#: Hyperparameters with at most this many elements keep their tensors in each record.
SMALL = 1000

_SCALARS = ("step", "hyper_step", "val_loss", "hypergrad_norm", "seconds", "method")
#: Absent from checkpoints of older versions (``holdout_scored``: derived from the loss).
_OPTIONAL = {"holdout_loss": math.nan, "holdout_scored": False}


@dataclass
class HyperStepRecord:
    """What happened at one hyper-step.

    Attributes:
        step: inner step count at the hyper-step.
        hyper_step: index of the hyper-step (1 for the first).
        val_loss: validation loss on the hyper-step's batch, before the update.
        hypergrad_norm: norm of the hypergradient (raw parametrization).
        seconds: wall time of the hyper-step.
        method: the method's repr.
        info: the method's :class:`~hypergradient.methods.base.Info` (status, products,
            method-specific stats); in older records without its parameter-sized tensors
            (``solution``, a trajectory's ``params``: None).
        hparams: values after the update (detached copies): all of them in the newest
            record, those of at most :data:`SMALL` elements in older ones.
        hypergrad: the hypergradient applied (raw parametrization), same hyperparameters.
        summaries: per hyperparameter, ``{"norm", "mean", "min", "max"}`` of the value after
            the update and ``"hypergrad_norm"``.
        holdout_loss: the holdout guard's score at this hyper-step (the held-out loss with
            the hyperparameters before the update; NaN without ``holdout_data``).
        holdout_scored: whether the holdout guard scored this hyper-step (with
            ``holdout_data``; its score may be NaN, which is not "no holdout").
    """

    step: int
    hyper_step: int
    val_loss: float
    hypergrad_norm: float
    seconds: float
    method: str
    info: Info = field(default_factory=Info, repr=False)
    hparams: dict[str, Tensor] = field(default_factory=dict, repr=False)
    hypergrad: dict[str, Tensor] = field(default_factory=dict, repr=False)
    summaries: dict[str, dict[str, float]] = field(default_factory=dict, repr=False)
    holdout_loss: float = math.nan
    holdout_scored: bool = False

    def __post_init__(self) -> None:
        self.holdout_scored = bool(self.holdout_scored) or not math.isnan(self.holdout_loss)

    @property
    def diagnostics(self) -> dict[str, Any]:
        """The method's info as one flat dict of plain data (its ``stats`` merged in)."""
        out = self.info.as_dict()
        out.update(out.pop("stats", {}))
        return out

    def lighter(self) -> HyperStepRecord:
        """A copy keeping tensors only for hyperparameters of at most ``SMALL`` elements,
        and an info without its parameter-sized fields (:func:`_light_info`)."""
        small = [k for k, v in self.hparams.items() if v.numel() <= SMALL]
        return dataclasses.replace(
            self,
            info=_light_info(self.info),
            hparams={k: self.hparams[k] for k in small},
            hypergrad={k: self.hypergrad[k] for k in small if k in self.hypergrad},
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data and small tensors (``torch.load(weights_only=True)`` reads it)."""
        out: dict[str, Any] = {k: getattr(self, k) for k in (*_SCALARS, *_OPTIONAL)}
        out["info"] = self.info.as_dict()
        out["info_type"] = type(self.info).__name__
        out["hparams"] = {k: v.clone() for k, v in self.hparams.items()}
        out["hypergrad"] = {k: v.clone() for k, v in self.hypergrad.items()}
        out["summaries"] = {k: dict(v) for k, v in self.summaries.items()}
        return out

    @classmethod
    def from_dict(cls, data: Any) -> HyperStepRecord:
        """Inverse of :meth:`to_dict` (the info comes back as its own ``Info`` subclass, with
        its plain-data fields; tensors such as ``solution`` are not kept in checkpoints).

        Raises:
            ValueError: malformed data.
        """
        try:
            info = dict(data["info"])
            kind = _info_class(data.get("info_type"))
            base = {f.name for f in dataclasses.fields(kind)}
            stats = {**{k: v for k, v in info.items() if k not in base}, **info.get("stats", {})}
            kwargs = {k: v for k, v in info.items() if k in base and k != "stats"}
            kwargs["status"] = Status(kwargs.get("status", Status.FIXED_BUDGET))
            scalars = {k: data[k] for k in _SCALARS}
            scalars |= {k: data.get(k, default) for k, default in _OPTIONAL.items()}
            return cls(
                **scalars,
                info=kind(**kwargs, stats=stats),
                hparams=dict(data["hparams"]),
                hypergrad=dict(data["hypergrad"]),
                summaries={k: dict(v) for k, v in data["summaries"].items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(
                f"The checkpoint's history holds a malformed record ({err!r})."
            ) from None


@dataclass(frozen=True)
class HistoryMark:
    """A :class:`History`'s length, count, and oldest and newest records at one time."""

    length: int
    total: int
    first: HyperStepRecord | None
    last: HyperStepRecord | None


def _info_class(name: Any) -> type[Info]:
    """The ``Info`` subclass called ``name`` (``Info`` itself when unknown)."""
    todo: list[type[Info]] = [Info]
    while todo:
        cls = todo.pop()
        if cls.__name__ == name:
            return cls
        todo.extend(cls.__subclasses__())
    return Info


_norm = torch.linalg.vector_norm  # one op (``t.pow(2).sum().sqrt()`` took three)


def _summaries(
    values: Mapping[str, Tensor], hypergrad: Mapping[str, Tensor]
) -> dict[str, dict[str, float]]:
    """Norm, mean, min and max of each value and the norm of its hypergradient, computed in
    the device's wide dtype and read in one host synchronization."""
    stats, keys = [], ("norm", "mean", "min", "max", "hypergrad_norm")
    for k, v in values.items():
        w = v.detach().to(wide_dtype(v.device))
        g = hypergrad[k].detach().to(w)
        if w.numel():
            low, high = torch.aminmax(w)  # one pass for both (NaN propagates as in min/max)
            stats.append(torch.stack([_norm(w), w.mean(), low, high, _norm(g)]))
        else:
            nan = torch.tensor(math.nan, dtype=w.dtype, device=w.device)
            stats.append(torch.stack([_norm(w), nan, nan, nan, _norm(g)]))
    if not stats:
        return {}
    device = stats[0].device  # (one hyperparameter, the usual case: its row as it is)
    rows = (
        [stats[0].tolist()]
        if len(stats) == 1
        else torch.stack([s.to(device) for s in stats]).tolist()
    )
    return {k: dict(zip(keys, row)) for k, row in zip(values, rows)}


def make_record(
    *,
    step: int,
    hyper_step: int,
    seconds: float,
    method: str,
    info: Info,
    values: Mapping[str, Tensor],
    hypergrad: Mapping[str, Tensor],
    holdout_loss: float = math.nan,
    holdout_scored: bool = False,
) -> HyperStepRecord:
    """A record with every hyperparameter and hypergradient, and summaries for all
    (:meth:`History.append` lightens it once a newer record arrives)."""
    summaries = _summaries(values, hypergrad)
    total = math.sqrt(sum(s["hypergrad_norm"] ** 2 for s in summaries.values()))
    return HyperStepRecord(
        step=step,
        hyper_step=hyper_step,
        val_loss=float(info.outer_loss),
        hypergrad_norm=total,
        seconds=seconds,
        method=method,
        info=info,
        hparams={k: v.detach().clone() for k, v in values.items()},
        hypergrad={k: v.detach().clone() for k, v in hypergrad.items()},
        summaries=summaries,
        holdout_loss=holdout_loss,
        holdout_scored=holdout_scored,
    )


def _light_info(info: Info) -> Info:
    """``info`` without the tensors of its bulk fields (declared ``repr=False``: an implicit
    method's ``solution``, a trajectory's ``params``; lists of numbers such as
    ``inner_losses`` stay): a copy, or ``info`` itself when it holds none. Older records
    then keep no parameter-sized tensor (each held one: 100 records of a 200k-parameter
    model held 80 MB, and every hyper-step grew the heap by one vector)."""
    bulk: dict[str, Any] = {
        f.name: None
        for f in dataclasses.fields(info)
        if not f.repr and _holds_tensor(getattr(info, f.name))
    }
    return dataclasses.replace(info, **bulk) if bulk else info


def _holds_tensor(value: Any) -> bool:
    """Whether ``value`` is a tensor or a tuple, list or dict holding one."""
    if isinstance(value, Tensor):
        return True
    if isinstance(value, dict):
        value = list(value.values())
    return isinstance(value, (list, tuple)) and any(_holds_tensor(v) for v in value)


def _one_sink(logger: Any) -> Callable[[HyperStepRecord], Any]:
    log = getattr(logger, "log", None)
    if callable(log):
        return cast(Callable[[HyperStepRecord], Any], log)
    if callable(logger):
        return cast(Callable[[HyperStepRecord], Any], logger)
    raise ArgumentTypeError(
        f"`logger` must be a callable taking a HyperStepRecord, an object with a log(record) "
        f"method, or a list of those, got {type(logger).__name__}."
    )


def _as_sink(logger: Any) -> Callable[[HyperStepRecord], Any] | None:
    if logger is None:
        return None
    if not isinstance(logger, (list, tuple)):
        return _one_sink(logger)
    return _FanOut([_one_sink(one) for one in logger])


class _FanOut:
    """Several sinks as one (an object, not a closure: a hyper-optimizer logging to a list
    of loggers pickles when they do)."""

    def __init__(self, sinks: list[Callable[[HyperStepRecord], Any]]):
        self.sinks = sinks

    def __call__(self, record: HyperStepRecord) -> None:
        for sink in self.sinks:
            sink(record)


class History(Sequence[HyperStepRecord]):
    """The last ``maxlen`` hyper-step records (a sequence: ``history[-1]``, ``len``, loops).

    Args:
        maxlen: how many records to keep (None: all).
        logger: a sink that receives every record as it is appended: a callable
            ``logger(record)``, an object with ``logger.log(record)`` (e.g.
            :class:`hypergradient.integrations.TensorBoardLogger`), or a list of those.

    Attributes:
        total: how many records were ever appended (the hyper-steps taken).
    """

    def __init__(self, maxlen: int | None = 100, logger: Any = None):
        self.maxlen = as_optional_int(maxlen, "history_size", min=0)
        self.sink = _as_sink(logger)
        self.records: deque[HyperStepRecord] = deque(maxlen=self.maxlen)
        self.total = 0

    def append(self, record: HyperStepRecord) -> None:
        """Keep ``record`` (dropping the oldest beyond ``maxlen``) and log it.

        The newest record holds every hyperparameter and hypergradient in full; older ones
        keep tensors only for hyperparameters of at most ``SMALL`` elements (summaries for
        all) and an info without parameter-sized tensors, so memory and checkpoints stay
        bounded. The previous record is replaced by a
        lighter copy, never modified, so a rolled-back hyper-step restores it as it was.
        """
        if self.records:
            self.records[-1] = self.records[-1].lighter()
        self.records.append(record)
        self.total += 1
        if self.sink is not None:
            self.sink(record)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return list(self.records)[index]
        return self.records[index]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[HyperStepRecord]:
        return iter(self.records)

    def __repr__(self) -> str:
        return f"History({len(self)} of {self.total} records, maxlen={self.maxlen})"

    def snapshot(self) -> HistoryMark:
        """What :meth:`restore` needs to undo the next append: O(1), whatever the length
        (the oldest record, which an append to a full history drops, and the newest, which
        an append replaces by a lighter copy)."""
        records = self.records
        first = records[0] if records else None
        return HistoryMark(len(records), self.total, first, records[-1] if records else None)

    def restore(self, snapshot: HistoryMark | tuple[list[HyperStepRecord], int]) -> None:
        """Undo the append (a hyper-step's) made since ``snapshot`` (from :meth:`snapshot`),
        or replace the records by a ``(records, total)`` pair."""
        if not isinstance(snapshot, HistoryMark):
            self.records = deque(snapshot[0], maxlen=self.maxlen)
            self.total = snapshot[1]
            return
        records = self.records
        if self.total > snapshot.total and records:
            records.pop()
        if len(records) < snapshot.length and snapshot.first is not None:
            records.appendleft(snapshot.first)  # the append dropped it from a full history
        if records and snapshot.last is not None:
            records[-1] = snapshot.last
        self.total = snapshot.total

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "records": [r.to_dict() for r in self.records]}

    def parse_state(self, state: Any) -> tuple[list[HyperStepRecord], int]:
        """Validate :meth:`state_dict` data; returns what :meth:`restore` takes."""
        if not isinstance(state, Mapping) or not isinstance(state.get("records"), list):
            raise ValueError("The checkpoint's `history` is malformed.")
        total = state.get("total")
        if isinstance(total, bool) or not isinstance(total, int) or total < len(state["records"]):
            raise ValueError(f"The checkpoint's history count {total!r} is invalid.")
        records = [HyperStepRecord.from_dict(r) for r in state["records"]]
        keep = len(records) if self.maxlen is None else self.maxlen
        return records[max(0, len(records) - keep) :] if keep else [], total

    def load_state_dict(self, state: Any) -> None:
        self.restore(self.parse_state(state))
