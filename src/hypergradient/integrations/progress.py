"""A ``tqdm`` progress bar over hyper-steps (a logger of :mod:`.loggers`), and what its
copy writes to."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

from .._vocab import as_optional_int
from ..hyperoptimizer import HyperStepRecord
from .records import check_record

__all__ = ["ProgressBar"]


class ProgressBar:
    """A ``tqdm`` progress bar over hyper-steps, showing the latest losses.

    Args:
        total: the number of hyper-steps expected (None: unknown).
        desc: the bar's label.
        **tqdm_kwargs: passed to ``tqdm.tqdm`` (``disable=True`` to silence it, ``file=``).

    A copy (``pickle``, ``torch.save(hopt)``, ``copy.deepcopy``) leaves the bar out (its
    output stream does not pickle) and opens one at the same count, with the same
    settings, when :attr:`bar` is first used. It writes to:

    - ``sys.stdout`` or ``sys.stderr`` (tqdm's default) of the process it is used in, where
      the original wrote to the standard output or error stream;
    - the same file, opened in append mode (the copy closes it in :meth:`close`), where
      ``file=`` was a file opened from a path (its ``name``, made absolute when copied);
    - ``sys.stderr``, with a ``UserWarning`` when copied, for any other stream (an
      ``io.StringIO``, a socket): pass ``file=sys.stdout``, a file opened from a path, or
      ``disable=True`` to copy without the warning.
    """

    def __init__(self, total: int | None = None, *, desc: str = "hyper-steps", **tqdm_kwargs: Any):
        try:
            from tqdm.auto import tqdm
        except ImportError as err:  # tqdm is an optional dependency
            raise ImportError("ProgressBar needs tqdm: pip install tqdm.") from err
        total = as_optional_int(total, "total", min=0)
        self._bar: Any = tqdm(total=total, desc=desc, **tqdm_kwargs)
        self._options = {"desc": desc} | {k: v for k, v in tqdm_kwargs.items() if k != "file"}
        self._file: Any = tqdm_kwargs.get("file")  # the stream (None: tqdm's, sys.stderr)
        self._reopen: dict[str, Any] | None = None  # a copy's bar, before it is opened

    # Class defaults: a bar pickled before they existed loads.
    _stream: tuple[str, ...] = ("std", "stderr")  # a copy's stream, before it is opened
    _opened: Any = None  # the file a copy opened (and closes)

    @property
    def bar(self) -> Any:
        """The ``tqdm`` bar (in a copy, opened here at first use)."""
        if self._bar is None and self._reopen is not None:
            from tqdm.auto import tqdm

            self._file = _open_stream(self._stream)
            if self._stream[0] == "path":
                self._opened = self._file
            self._bar, self._reopen = tqdm(file=self._file, **self._reopen), None
        return self._bar

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._bar is not None:
            state["_reopen"] = self._options | {"total": self._bar.total, "initial": self._bar.n}
            state["_bar"] = None
            disabled = bool(self._options.get("disable"))
            state["_stream"] = _stream_spec(self._file, warn=not disabled)
        state["_file"] = state["_opened"] = None
        return state

    def log(self, record: HyperStepRecord) -> None:
        record = check_record(record)
        shown = {"val": f"{record.val_loss:.4g}"}
        if record.holdout_scored:
            shown["holdout"] = f"{record.holdout_loss:.4g}"
        if not record.info.status.ok:
            shown["status"] = record.info.status.value
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    __call__ = log

    def __repr__(self) -> str:
        bar, later = self._bar, self._reopen or {}
        n, total = (bar.n, bar.total) if bar is not None else (later["initial"], later["total"])
        return f"ProgressBar(n={n}, total={total})"

    def close(self) -> None:
        """Close the bar (and the file a copy opened)."""
        if self._bar is not None:  # a copy that has shown nothing: no bar to close
            self._bar.close()
        if self._opened is not None:
            self._opened.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stream_spec(file: Any, warn: bool) -> tuple[str, ...]:
    """How a copy finds ``file`` again: ``("std", "stdout" | "stderr")`` or
    ``("path", absolute path, encoding)``; other streams: ``("std", "stderr")``."""
    if file is None:
        return ("std", "stderr")
    for name in ("stdout", "stderr"):
        if file is getattr(sys, name) or file is getattr(sys, f"__{name}__"):
            return ("std", name)
    path = getattr(file, "name", None)
    if isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
        return ("path", os.path.abspath(path), getattr(file, "encoding", None) or "utf-8")
    if warn:
        warnings.warn(
            f"ProgressBar: a copy cannot write to the bar's `file=` ({type(file).__name__}, "
            "which has no file path); it writes to sys.stderr. Pass file=sys.stdout, a file "
            "opened from a path (the copy appends to it), or disable=True.",
            UserWarning,
            stacklevel=3,
        )
    return ("std", "stderr")


def _open_stream(spec: tuple[str, ...]) -> Any:
    if spec[0] == "path":
        return open(spec[1], "a", encoding=spec[2])  # noqa: SIM115 (closed by close())
    return getattr(sys, spec[1])
