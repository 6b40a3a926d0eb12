"""``BatchSampler``: where hyper-steps draw validation (and training) batches.

Two sources:

- **tensors** (a tensor or a tuple/list of tensors with a common first dimension): a
  mini-batch of ``batch_size`` rows drawn without replacement by a seeded
  ``torch.Generator`` at each draw (all rows when ``batch_size`` is None or at least the
  number of rows). The generator's state is the sampler's state: a resumed run draws
  exactly the batches the uninterrupted run would have drawn.
- **an iterable of batches** (a ``DataLoader``, a list): cycled, a fresh pass starting
  when one ends. Its position is *not* restored on resume: replaying the stream would
  fetch every batch drawn before (a ``DataLoader`` has no cheap seek), so a resumed
  sampler starts a fresh pass (with a shuffling ``DataLoader``, a new random order). The
  state records how many batches were drawn, for information. A *copy* of the sampler
  (``pickle``, ``torch.save(hopt)``, ``copy.deepcopy``), by contrast, continues the pass:
  the live iterator (a ``DataLoader``'s does not pickle) is left out, and the copy's first
  draw starts the pass again from the random-number states it started from (torch's, and
  the ``generator`` of the loader and of its sampler) and skips the batches already drawn
  from it, so that it draws the batches the original draws next. That first draw fetches
  those batches again once (under a fork of the random-number states, so nothing else
  changes). A ``DataLoader`` with ``persistent_workers=True`` is copied without its
  worker processes: the copy starts its own, and draws the same batches in the same order;
  randomness drawn *inside* the workers (an augmentation in ``Dataset.__getitem__``) is
  continued only in the workers' first pass (later passes of the original go on with the
  random-number streams of its long-lived workers, which a copy cannot take along).

A hyper-step that fails is undone: :meth:`BatchSampler.mark` / :meth:`BatchSampler.rollback`
restore the generator, or push the drawn batches back so that they are drawn again. One that
is skipped (``nonfinite="skip"``, a skip check) keeps its draws (:meth:`BatchSampler.commit`):
the next hyper-step takes the next batches.
"""

from __future__ import annotations

import copy
import random
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._vocab import ArgumentTypeError, as_int, as_optional_int

__all__ = ["BatchSampler"]


class BatchSampler:
    """Mini-batches from in-memory tensors (seeded) or from an iterable (cycled).

    Args:
        data: a tensor or a tuple/list of tensors (sampled by rows; a batch of a tensor is
            a tensor, of a tuple or list a tuple), or an iterable of batches such as a
            ``DataLoader``.
        batch_size: rows per batch for tensors (None, or at least the number of rows: all
            rows, every batch); must be None for an iterable, which batches itself.
        seed: seed of the row sampling.
        name: the argument's name, for messages.

    Raises:
        ArgumentTypeError, ValueError: bad ``data``, ``batch_size`` or ``seed``.
    """

    # An iterable's pass (class defaults: a sampler pickled before they existed loads):
    _pass_rng: Any = None  # the random-number states the current pass started from
    _pass_drawn = 0  # batches the current pass's iterator has given
    _resume = False  # a copy: start the pass again and skip `_pass_drawn` batches
    _pass_reset = False  # the pass restarted a persistent-workers iterator (not its first)
    _fresh_workers = False  # a copy of a loader whose original had started its workers

    def __init__(self, data: Any, batch_size: Any = None, seed: Any = 0, name: str = "data"):
        self.name = name
        hint = f" Pass a positive number of rows (or None for all of `{name}`)."
        self.batch_size = as_optional_int(batch_size, f"{_size_name(name)}", min=1, hint=hint)
        self.seed = as_int(seed, "seed", min=0)
        self.drawn = 0
        self._pushback: deque[Any] = deque()
        self._recent: list[Any] | None = None
        self._mark_state: Tensor | None = None
        self.bare = isinstance(data, Tensor)  # batches are tensors too, not 1-tuples
        if self.bare:
            data = (data,)
        self.tensors: tuple[Tensor, ...] | None = None
        if isinstance(data, (tuple, list)):
            if not data:  # (refused now rather than at the first hyper-step's draw)
                raise ValueError(
                    f"`{name}` is an empty {type(data).__name__}: pass a tuple of tensors "
                    "(rows sampled in mini-batches) or an iterable of batches such as a "
                    "DataLoader."
                )
            _check_columns(data, name)
        if isinstance(data, (tuple, list)) and data and all(isinstance(t, Tensor) for t in data):
            self._init_tensors(tuple(data))
        elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, Mapping)):
            if self.batch_size is not None:
                raise ValueError(
                    f"`{_size_name(name)}` applies to tensors; `{name}` is an iterable that "
                    "batches itself (set the DataLoader's batch_size instead)."
                )
            self.iterable = data
            self._iter: Iterator[Any] | None = None
        else:
            raise ArgumentTypeError(
                f"`{name}` must be a tuple of tensors (sampled in mini-batches) or an iterable "
                f"of batches such as a DataLoader, got {type(data).__name__}."
            )

    def _init_tensors(self, tensors: tuple[Tensor, ...]) -> None:
        n = tensors[0].shape[0] if tensors[0].dim() else 0
        if n == 0 or any(t.dim() == 0 or t.shape[0] != n for t in tensors):
            raise ValueError(
                f"The tensors of `{self.name}` must have the same, non-zero first dimension "
                f"(rows), got shapes {[tuple(t.shape) for t in tensors][:4]}; a list of "
                "batches (list(loader) of bare tensors) is read as columns: pass the DataLoader."
            )
        self.tensors = tensors
        self.generator = torch.Generator().manual_seed(self.seed)

    # ------------------------------------------------------------------ drawing
    def next(self) -> Any:
        """The next batch."""
        batch = self._pushback.popleft() if self._pushback else self._draw()
        self.drawn += 1
        if self._recent is not None:
            self._recent.append(batch)
        return batch

    def _draw(self) -> Any:
        if self.tensors is not None:
            n = self.tensors[0].shape[0]
            if self.batch_size is None or self.batch_size >= n:
                rows = self.tensors
            else:
                idx = torch.randperm(n, generator=self.generator)[: self.batch_size]
                rows = tuple(t[idx.to(t.device)] for t in self.tensors)
            return rows[0] if self.bare else rows
        for _ in range(2):
            if self._iter is None:
                self._iter = self._start_pass()
            try:
                batch = next(self._iter)
            except StopIteration:
                self._iter = None
            else:
                self._pass_drawn += 1
                return batch
        if self.drawn and iter(self.iterable) is self.iterable:
            raise ValueError(
                f"`{self.name}` is an iterator (a generator?) that ran out after {self.drawn} "
                "batches and cannot start a new pass; pass a re-iterable (a list, a "
                "DataLoader) or an endless one (itertools.cycle(...))."
            )
        if self.drawn:  # a stream read once (a one-shot IterableDataset): not "no batches"
            raise ValueError(
                f"`{self.name}` gave {self.drawn} batches, then a new pass yielded none (a "
                "dataset that streams only once?); pass one that yields batches on every pass "
                "(a list, a map-style Dataset's DataLoader) or an endless one."
            )
        short = getattr(self.iterable, "drop_last", False)  # a DataLoader's
        why = " (drop_last=True with fewer rows than its batch_size)" if short else ""
        raise ValueError(f"`{self.name}` yields no batches{why}.")

    def _start_pass(self) -> Iterator[Any]:
        """A new pass over the iterable; in a copy, its original's pass at the same place."""
        if self._resume:
            self._resume = False
            return self._continue_pass()
        if self._fresh_workers:  # the original's next pass restarts its workers: so does ours
            self._fresh_workers, now = False, _rng_states(self.iterable)
            iter(self.iterable)
            _set_rng_states(self.iterable, now)
        self._pass_rng, self._pass_drawn = _rng_states(self.iterable), 0
        self._pass_reset = _persistent_iterator(self.iterable) is not None
        return iter(self.iterable)

    def _continue_pass(self) -> Iterator[Any]:
        """The pass the original was in, started again from its random-number states, with
        the ``_pass_drawn`` batches the original drew from it skipped; every random-number
        state (torch's, the loader's generators, Python's, numpy's) is left as it was."""
        now, py = _rng_states(self.iterable), random.getstate()
        npy = np.random.get_state()  # noqa: NPY002 (the global state augmentations draw from)
        try:
            if self._pass_reset and self._fresh_workers:
                iter(self.iterable)  # start the workers, so that the pass below is a restart
            self._fresh_workers = False
            _set_rng_states(self.iterable, self._pass_rng)
            it = iter(self.iterable)
            for _ in range(self._pass_drawn):
                next(it, None)  # a shorter pass now: the next draw starts a new one
        finally:
            _set_rng_states(self.iterable, now)
            random.setstate(py)
            np.random.set_state(npy)  # noqa: NPY002
        return it

    def __getstate__(self) -> dict[str, Any]:
        """The sampler without the live iterator of a re-iterable (a ``DataLoader``'s does
        not pickle); the copy continues the pass (see the module's docstring). An iterable
        that is its own iterator keeps its place itself, and is pickled as it is. A
        ``DataLoader`` with ``persistent_workers=True`` holds its live iterator (its worker
        processes) itself: the copy gets a shallow copy of the loader without it, which
        starts its own workers at its first draw."""
        state = self.__dict__.copy()
        live = state.get("_iter")
        if live is not None and live is not self.iterable:
            state["_iter"], state["_resume"] = None, True
        if _persistent_iterator(getattr(self, "iterable", None)) is not None:
            loader = copy.copy(self.iterable)  # DataLoader's __setattr__ guards some names
            loader.__dict__["_iterator"] = None
            state["iterable"], state["_fresh_workers"] = loader, True
        return state

    def mark(self) -> None:
        """Start recording draws, so that :meth:`rollback` can undo them."""
        self._recent = []
        self._mark_state = None if self.tensors is None else self.generator.get_state()

    def commit(self) -> None:
        """Stop recording: the draws since :meth:`mark` stand."""
        self._recent = None

    def rollback(self) -> None:
        """Undo the draws since :meth:`mark` (they will be drawn again, in order)."""
        if self._recent is None:
            return
        self.drawn -= len(self._recent)
        if self._mark_state is not None:
            self.generator.set_state(self._mark_state)
        else:
            self._pushback.extendleft(reversed(self._recent))
        self._recent = None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Tensors: the generator's state (resumes exactly). Iterables: the draw count only."""
        if self.tensors is not None:
            return {"kind": "tensors", "drawn": self.drawn, "generator": self.generator.get_state()}
        return {"kind": "iterable", "drawn": self.drawn}

    def check_state(self, state: Any) -> None:
        """Raise ``ValueError`` if ``state`` does not fit this sampler (nothing changes)."""
        kind = "tensors" if self.tensors is not None else "iterable"
        if not isinstance(state, Mapping) or state.get("kind") != kind:
            got = state.get("kind") if isinstance(state, Mapping) else state
            raise ValueError(f"The checkpoint's `{self.name}` sampler is {got!r}, here {kind!r}.")
        as_int(state.get("drawn"), f"{self.name} sampler's drawn", min=0)
        if kind == "tensors":
            g = state.get("generator")
            try:
                if not isinstance(g, Tensor):
                    raise TypeError
                torch.Generator().set_state(g.cpu())
            except (TypeError, RuntimeError):
                raise ValueError(
                    f"The checkpoint's `{self.name}` sampler holds no valid generator state."
                ) from None

    def reset(self) -> None:
        """Start afresh, as just constructed: the seeded generator (tensors) or a new pass
        (an iterable), no draws counted, nothing pushed back."""
        self.drawn = 0
        self._pushback.clear()
        self._recent = None
        if self.tensors is not None:
            self.generator.manual_seed(self.seed)
        else:
            self._iter, self._resume = None, False

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (an iterable restarts a fresh pass: nothing is re-fetched)."""
        self.check_state(state)
        self.drawn = int(state["drawn"])
        self._pushback.clear()
        self._recent = None
        if self.tensors is not None:
            # a CPU generator's state (torch.load(map_location=...) may have moved it)
            self.generator.set_state(state["generator"].cpu())
        else:
            self._iter, self._resume = None, False


#: Where a ``DataLoader`` keeps the generators its order is drawn from.
_GENERATOR_PATHS = (
    ("generator",),
    ("sampler", "generator"),
    ("batch_sampler", "sampler", "generator"),
)


def _generators(iterable: Any) -> list[torch.Generator]:
    """The distinct ``torch.Generator`` objects of a loader (and of its samplers)."""
    found: list[torch.Generator] = []
    for path in _GENERATOR_PATHS:
        obj = iterable
        for attr in path:
            obj = getattr(obj, attr, None)
        if isinstance(obj, torch.Generator) and all(obj is not g for g in found):
            found.append(obj)
    return found


def _rng_states(iterable: Any) -> tuple[Tensor, list[Tensor]]:
    """torch's CPU random-number state and the states of ``iterable``'s generators."""
    return torch.get_rng_state(), [g.get_state() for g in _generators(iterable)]


def _set_rng_states(iterable: Any, states: tuple[Tensor, list[Tensor]]) -> None:
    torch.set_rng_state(states[0])
    for g, state in zip(_generators(iterable), states[1]):
        g.set_state(state)


def _persistent_iterator(iterable: Any) -> Any:
    """The live iterator a ``DataLoader`` with ``persistent_workers=True`` keeps between
    passes (None before its first pass, and for any other iterable)."""
    if isinstance(iterable, torch.utils.data.DataLoader) and iterable.persistent_workers:
        return iterable.__dict__.get("_iterator")
    return None


def _size_name(name: str) -> str:
    return name.replace("_data", "_batch_size")


def _check_columns(data: tuple | list, name: str) -> None:
    """Refuse a tuple or list that mixes tensors with other objects or holds numpy arrays
    (``(x_val.numpy(), y_val.numpy())``, ``(x_val, labels_list)``): meant as columns to
    sample rows from, it would otherwise be cycled as a sequence of batches (the first
    batch the whole first array) and fail inside the loss at the first hyper-step."""
    tensors = sum(isinstance(t, Tensor) for t in data)
    arrays = any(isinstance(t, np.ndarray) for t in data)
    if arrays or 0 < tensors < len(data):
        kinds = ", ".join(type(t).__name__ for t in data[:4])
        raise ArgumentTypeError(
            f"`{name}` is a {type(data).__name__} of {kinds}{', ...' if len(data) > 4 else ''}: "
            "to sample rows, every item must be a tensor (torch.as_tensor(...) converts numpy "
            "arrays and lists); to cycle through batches, pass a DataLoader or a list of "
            "batches that are not bare tensors or arrays."
        )
