"""Logging sinks for :class:`~hypergradient.HyperOptimizer`: TensorBoard, CSV, a progress bar.

Pass one (or a list) as ``HyperOptimizer(..., logger=...)``; each receives every
:class:`~hypergradient.HyperStepRecord` as the hyper-step that made it commits (a
rolled-back hyper-step is never logged, with one exception: a sink that raises rolls the
step back, after the sinks before it in the list have written its record). What is written,
under the same names everywhere (:func:`record_scalars`):

- ``loss/val``, ``loss/holdout`` (with ``holdout_data``): the validation batch's loss and
  the holdout guard's score;
- ``hypergrad/norm`` and ``hypergrad/<name>``: norms of the hypergradient, in total and
  per hyperparameter (raw parametrization; a hyperparameter named ``norm`` gets
  ``hypergrad/norm/norm``, the total keeps its name);
- ``hparams/<name>`` for a scalar hyperparameter, ``hparams/<name>/<i>`` per element for a
  small one (at most ``scalar_limit`` elements), ``hparams/<name>/{mean,min,max,norm}`` for
  a larger one (TensorBoard also gets histograms of its values, ``hparams/<name>``, and
  of its hypergradient, ``hypergrad_values/<name>``: a tag holds one kind of data);
- ``solver/num_hvps``, ``solver/ok`` (1 when the method vouches for its answer) and the
  method's numeric diagnostics (``solver/residual``, ``solver/iterations``,
  ``solver/inner_grad_norm``, ...; a NaN diagnostic, one the method did not compute, such
  as T1T2's ``inner_grad_norm`` with its hyperparameters-first product, is left out); the
  status itself as text;
- ``time/seconds``: wall time of the hyper-step.

The x axis is the inner step count (``record.step``), so the curves line up with training
curves logged by the same loop.
"""

from __future__ import annotations

import csv
import inspect
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import Tensor

from .._vocab import ArgumentTypeError, as_bool, as_int
from ..hyperoptimizer import HyperStepRecord
from .progress import ProgressBar
from .records import check_record, record_scalars

__all__ = ["CSVLogger", "ProgressBar", "TensorBoardLogger", "record_scalars"]


class TensorBoardLogger:
    """Write hyper-step records to TensorBoard through ``torch.utils.tensorboard``.

    Args:
        log_dir: the run's directory (``SummaryWriter(log_dir)``; None: ``runs/<date>``).
        writer: an existing ``SummaryWriter`` to write into instead (not closed by
            :meth:`close`; not with ``log_dir``).
        prefix: prepended to every tag (``"hypergradient/loss/val"``; ``""``: none).
        scalar_limit: see :func:`record_scalars`.
        histograms: also write histograms of the values and hypergradients of the
            hyperparameters larger than ``scalar_limit``.

    Example::

        with TensorBoardLogger("runs/decay") as tb:
            hopt = hg.HyperOptimizer(..., logger=tb)
            ...                                  # then: tensorboard --logdir runs

    Cost per record: a few dozen scalars, and a histogram per large hyperparameter (one
    pass over its values); nothing is kept in memory.

    A copy (``pickle``, ``torch.save(hopt)``, ``copy.deepcopy``) leaves the
    ``SummaryWriter`` out (its lock and open event file do not pickle) and opens one of the
    same class (a subclass of the user's stays one), with the same directory and settings
    (``log_dir``, ``max_queue``, ``flush_secs``, ``filename_suffix``; a subclass's own
    constructor arguments take their defaults), when its :attr:`writer` is first used: its
    records go to a new event file in that directory. The copy owns that writer
    (:meth:`close` closes it). A ``writer`` that is not a ``SummaryWriter`` is copied as
    it is.

    A run resumed from a copy redoes the hyper-steps after it, whose records the original
    may have written already (a crash after a checkpoint). The copy's writer therefore
    opens with ``purge_step`` one past the step of the last record the copied logger had
    written (a logger copied before its first record: the step of the copy's first
    record). TensorBoard reads a directory's event files in the order they were created
    and hides every event read before that purge at its step or later, so that each step
    shows one value, the resumed run's. ``purge_step`` acts on the whole directory: the
    crashed run's records (scalars, histograms, texts) and the events of any other writer
    there at those steps, also those of a writer the resumed run opened before the copy's
    (write such curves through the copy's :attr:`writer`, which opens it), and those
    between the last record and the copy (the logger does not know the copy's step),
    which the resumed run does not write again. ``pickle``
    refuses a writer subclass whose constructor does not take these arguments.
    """

    def __init__(
        self,
        log_dir: str | Path | None = None,
        *,
        writer: Any = None,
        prefix: str = "hypergradient",
        scalar_limit: int = 8,
        histograms: bool = True,
    ):
        self.scalar_limit = as_int(scalar_limit, "scalar_limit", min=1)
        self.histograms = as_bool(histograms, "histograms")
        if not isinstance(prefix, str):
            raise ArgumentTypeError(f"`prefix` must be a string, got {type(prefix).__name__}.")
        if log_dir is not None and not isinstance(log_dir, (str, Path)):
            raise ArgumentTypeError(
                f"`log_dir` must be a directory path, got {type(log_dir).__name__}."
            )
        if writer is not None and log_dir is not None:
            raise ValueError(
                "Pass `log_dir` or `writer`, not both: the writer writes into its own "
                f"directory ({getattr(writer, 'log_dir', '?')}), not into {str(log_dir)!r}."
            )
        self.prefix = prefix.rstrip("/") + "/" if prefix.rstrip("/") else ""
        self.owns_writer = writer is None
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # tensorboard is an optional dependency
                raise ImportError(
                    "TensorBoardLogger needs the tensorboard package: "
                    "pip install 'hypergradient[integrations]' (or pip install tensorboard)."
                ) from err
            writer = SummaryWriter(None if log_dir is None else str(log_dir))
        elif not callable(getattr(writer, "add_scalar", None)):
            raise ArgumentTypeError(
                f"`writer` must be a torch.utils.tensorboard.SummaryWriter, got "
                f"{type(writer).__name__}."
            )
        self._writer = writer
        self._reopen: dict[str, Any] | None = None  # a copy's writer, before it is opened
        self.last_status: str | None = None

    # Class defaults: a logger pickled before they existed loads.
    _writer_class: Any = None  # a copy's writer class (None: SummaryWriter)
    _last_step: int | None = None  # the step of the last record written

    @property
    def writer(self) -> Any:
        """The writer (in a copy, opened here at first use)."""
        return self._open()

    def _open(self, step: int | None = None) -> Any:
        """The writer; a copy's is opened here, purging from ``step`` if its original had
        written no record."""
        if self._writer is None and self._reopen is not None:
            kwargs = dict(self._reopen)
            if kwargs["purge_step"] is None:
                kwargs["purge_step"] = step
            self._writer, self._reopen = _reopen_class(self._writer_class)(**kwargs), None
        return self._writer

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if _is_summary_writer(self._writer):
            cls, last = type(self._writer), self._last_step
            names = ("log_dir", "max_queue", "flush_secs", "filename_suffix")
            kwargs = {k: getattr(self._writer, k) for k in names}
            kwargs["purge_step"] = None if last is None else last + 1
            _check_writer_class(cls, kwargs)
            state["_reopen"], state["_writer_class"] = kwargs, cls
            state["_writer"], state["owns_writer"] = None, True
        return state

    def log(self, record: HyperStepRecord) -> None:
        """Write one record (the sink the hyper-optimizer calls)."""
        record = check_record(record)
        step, tag = record.step, self.prefix
        scalars = record_scalars(record, self.scalar_limit)
        # Not "hypergrad/<name>": that tag is the norm's scalar, and TensorBoard's
        # dashboards fail on a tag holding both (the scalars one raises).
        kinds = (("hparams", record.hparams), ("hypergrad_values", record.hypergrad))
        large = [(f"{kind}/{n}", t) for kind, ts in kinds for n, t in ts.items()]
        large = [(k, t) for k, t in large if t.numel() > self.scalar_limit and self.histograms]
        for key in (k for k, _ in large if k in scalars):  # "a" of 2 elements, "a/0" of 9
            raise ValueError(
                f"The tag {key!r} would hold a scalar and a histogram (the names of two "
                "hyperparameters overlap); rename one of them."
            )
        writer = self._open(step)
        for name, value in scalars.items():
            writer.add_scalar(tag + name, value, step)
        self._last_step = step
        for key, t in large:
            writer.add_histogram(tag + key, _cpu(t), step)
        status = record.info.status
        if status.value != self.last_status:  # text only when it changes
            writer.add_text(tag + "solver/status", f"{status.value}: {status.message}", step)
            self.last_status = status.value

    __call__ = log

    def __repr__(self) -> str:
        where = getattr(self._writer, "log_dir", (self._reopen or {}).get("log_dir", ""))
        return f"TensorBoardLogger({where!r}, prefix={self.prefix!r})"

    def flush(self) -> None:
        if self._writer is not None:  # a copy that has written nothing: nothing to flush
            self._writer.flush()

    def close(self) -> None:
        """Flush; close the writer if this logger created it."""
        self.flush()
        if self.owns_writer and self._writer is not None:
            self._writer.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cpu(t: Tensor) -> Tensor:
    return t.detach().float().cpu()


def _reopen_class(cls: Any) -> Any:
    if cls is None:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter
    return cls


def _check_writer_class(cls: type, kwargs: dict[str, Any]) -> None:
    """Raise ``TypeError`` if a copy could not reopen a writer of class ``cls``."""
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as err:
        raise TypeError(
            f"TensorBoardLogger cannot copy its writer: a copy reopens it as "
            f"{cls.__name__}({', '.join(f'{k}=...' for k in kwargs)}), which {cls.__name__} "
            f"refuses ({err}). Let {cls.__name__}.__init__ take these arguments (**kwargs "
            "passed on to SummaryWriter.__init__)."
        ) from None


def _is_summary_writer(writer: Any) -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # then it is not one
        return False
    return isinstance(writer, SummaryWriter)


class CSVLogger:
    """Write one row per hyper-step to a UTF-8 CSV file (flushed after every row).

    Columns: ``step``, ``hyper_step``, ``status``, then the names of
    :func:`record_scalars`. A record with a name not seen before (a diagnostic that
    appears later) widens the file: it is rewritten once with the new column, earlier rows
    empty there. The file's header is read before each row, so that loggers sharing a file
    (or a file truncated or removed meanwhile) write rows under the right columns.

    Args:
        path: the file (its folder is created).
        scalar_limit: see :func:`record_scalars`.
        append: continue an existing file (a resumed run) instead of starting a new one.
            A run resumed from a checkpoint redoes the hyper-steps after it: at its first
            row, the rows the file held when the logger was made from that hyper-step on
            (those of the steps redone after a crash) are dropped, as TensorBoard's
            ``purge_step`` does, so that each hyper-step has one row.

    A copy (``pickle``, ``torch.save(hopt)``, ``copy.deepcopy``) writes to the same file and
    drops, at its first row, every row of the file from one past the last hyper-step the
    copied logger had written (a logger copied before its first row: from the copy's first
    row's hyper-step): the rows a run resumed from that copy redoes, which the original may
    have written before a crash. As TensorBoard's purge, it acts on the whole file, other
    loggers' rows included.

    Read it back with ``csv.DictReader`` or ``pandas.read_csv``.
    """

    # Class defaults: a logger pickled before they existed loads.
    _last_hyper_step: int | None = None  # the hyper-step of the last row written
    _purge_from: int | None | bool = False  # a copy's (None: its first row's hyper-step)

    def __init__(self, path: str | Path, *, scalar_limit: int = 8, append: bool = False):
        if not isinstance(path, (str, Path)):
            raise ArgumentTypeError(f"`path` must be a file path, got {type(path).__name__}.")
        self.path = Path(path)
        self.scalar_limit = as_int(scalar_limit, "scalar_limit", min=1)
        append = as_bool(append, "append")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not append:
            self.path.write_text("")
        self.columns: list[str] = self._header()
        # The purge's candidates, by content: another logger of the file may rewrite it
        # (its own purge, a new column), so that they are no longer its first rows.
        self._inherited = Counter(map(_row_key, self.rows())) if self.columns else Counter()

    def log(self, record: HyperStepRecord) -> None:
        """Append one row (the sink the hyper-optimizer calls)."""
        record = check_record(record)
        row: dict[str, Any] = {"step": record.step, "hyper_step": record.hyper_step}
        row["status"] = record.info.status.value
        row.update({k: repr(v) for k, v in record_scalars(record, self.scalar_limit).items()})
        self.columns = self._header()  # the file's: another logger may have changed it
        new = [k for k in row if k not in self.columns]
        copied = self._purge_from
        if copied is not False:
            self._purge_from = False
            start = record.hyper_step if copied is None else copied
            self._widen(new, purge=record.hyper_step, everything_from=start)
        elif self._inherited:
            self._widen(new, purge=record.hyper_step)
        elif new or not self.columns:
            self._widen(new)
        with self.path.open("a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, self.columns, restval="").writerow(row)
        self._last_hyper_step = record.hyper_step

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        last = self._last_hyper_step
        state["_purge_from"] = None if last is None else last + 1
        return state

    __call__ = log

    def __repr__(self) -> str:
        return f"CSVLogger({str(self.path)!r}, columns={len(self.columns)})"

    def _header(self) -> list[str]:
        """The file's columns (none when it is empty or missing)."""
        try:
            with self.path.open(newline="", encoding="utf-8") as f:
                return next(csv.reader(f), [])
        except FileNotFoundError:
            return []

    def _widen(
        self, new: Iterable[str], purge: int | None = None, everything_from: float = math.inf
    ) -> None:
        """Rewrite the file with the columns ``new`` added; with ``purge``, without the
        inherited rows whose hyper-step is ``purge`` or later, and without any row whose
        hyper-step is ``everything_from`` or later (a copy's first row)."""
        rows: list[dict[str, str]] = []
        if self.columns:
            with self.path.open(newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        if purge is not None:
            pending, kept = self._inherited, []
            for r in rows:
                step = _hyper_step(r)
                if pending[key := _row_key(r)] > 0 and step >= purge:
                    pending[key] -= 1
                elif step < everything_from:
                    kept.append(r)
            rows, self._inherited = kept, Counter()
        self.columns = self.columns + list(new)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, self.columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.path)

    def rows(self) -> list[dict[str, str]]:
        """The rows written so far, as ``csv.DictReader`` reads them."""
        with self.path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    def close(self) -> None:
        """Nothing to release (each row is written and the file closed at once); for code
        that closes every logger, and ``with CSVLogger(path) as log:``."""

    def __enter__(self) -> CSVLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _row_key(row: dict[Any, Any]) -> tuple[tuple[str, str], ...]:
    """A CSV row's filled cells (the same after a rewrite that adds empty columns)."""
    return tuple(sorted((k, v) for k, v in row.items() if isinstance(k, str) and v))


def _hyper_step(row: dict[str, str]) -> float:
    """A CSV row's hyper-step; -inf (never purged) where it has no readable one."""
    try:
        return int(row.get("hyper_step") or "")
    except ValueError:
        return -math.inf
