"""Checkpoints of a hyper-optimizer: what :meth:`HyperOptimizer.state_dict` holds, and an
atomic, validated :meth:`HyperOptimizer.load_state_dict`.

The checkpoint holds tensors and plain data only (``torch.load(weights_only=True)`` reads
it): the model's signature (names, shapes, dtypes of the trained parameters), the method's
type and state, both optimizers' types and states, the raw hyperparameters, counters, the
samplers' states, the current window (batches as tensors plus a plain description), the
bounded history, the holdout guard's state (sampler, best score and values, patience
counter, stop flag), the divergence watch's last parameter norms (a resumed run takes
the same skip decisions by the norm rule), and torch's random-number state (CPU and the
model's accelerator) at the time of the call. Loading restores that random-number state
too, so a run resumed from a checkpoint draws the same dropout masks and random
augmentations as the uninterrupted run without the caller saving the generator separately.
Loading checks every entry against this hyper-optimizer first and assigns only when all of
them fit, so a failing load changes nothing.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from torch import Tensor

from .. import distributed
from .._vocab import ArgumentTypeError, HypergradientWarning, as_int
from ..optim.functional import from_torch
from . import divergence, optimizers, step_grads, stepping
from .build import tuned
from .holdout import GuardState
from .transaction import clone_state
from .window import TrajectoryWindow, capture_rng, parse_rng_state, restore_rng

if TYPE_CHECKING:  # pragma: no cover
    from .driver import HyperOptimizer

__all__ = ["FORMAT", "load_state_dict", "state_dict"]

FORMAT = 2
KEYS = (
    "format",
    "model",
    "method",
    "inner_optimizer",
    "outer_optimizer",
    "hparams",
    "counters",
    "val_sampler",
    "train_sampler",
    "window",
    "history",
)


def state_dict(hopt: HyperOptimizer) -> dict[str, Any]:
    """The checkpoint of ``hopt`` (see the module's docstring)."""
    loop = hopt.loop
    train = hopt.train_sampler
    return {
        "format": FORMAT,
        "model": hopt.view.signature(),
        "method": {"type": type(hopt.method).__name__, "state": hopt.method.state_dict()},
        "inner_optimizer": optimizers.state(hopt.inner_optimizer, _names(hopt, "model")),
        "outer_optimizer": optimizers.state(hopt.outer_optimizer, _names(hopt, "hparams")),
        "hparams": hopt.hyperparameters.state_dict(),
        "counters": {"count": loop.count, "skipped": loop.skipped},
        "val_sampler": hopt.val_sampler.state_dict(),
        "train_sampler": None if train is None else train.state_dict(),
        "window": None if loop.window is None else loop.window.state_dict(),
        "history": hopt.history.state_dict(),
        "rng": list(capture_rng(hopt.view.device)),
        "holdout": None if hopt.guard is None else hopt.guard.state_dict(),
        # the losses the loop reported (hopt.train_loss, end_step(loss=)) too: without
        # them a resumed run missed the loss rules' divergence and applied its hypergradient
        "watch": {
            "norms": [t.clone() for t in loop.norms],
            "losses": [t.clone() for t in loop.losses],
        },
        # the saving rank (data-parallel): a window holds that rank's shard's batches
        "rank": _rank(hopt),
    }


def _rank(hopt: HyperOptimizer) -> int | None:
    group = hopt.process_group
    return None if group is None else int(dist.get_rank(group))


def _check_rank(hopt: HyperOptimizer, state: Mapping[str, Any]) -> None:
    """Another rank's checkpoint holds that rank's own parts: its random-number state (rank
    1 took rank 0's: per-rank dropout seeds drew the same masks from then on), its samplers'
    positions on its shard (uneven shards: another run than the uninterrupted one) and,
    mid-window, its batches (the replay differentiated another shard's steps: every rank
    skipped that hyper-step, blaming the loop). Refused before anything is assigned."""
    saved, own = state.get("rank"), _rank(hopt)
    if saved is None or own is None or saved == own:
        return
    window = " and the window's batches" if state["window"] is not None else ""
    raise ValueError(
        f"This checkpoint was saved on rank {saved}, and this is rank {own}: it holds rank "
        f"{saved}'s random-number state, samplers' positions{window}, which would replace "
        f"this rank's (its dropout masks and batches would be rank {saved}'s). Save and load "
        "one hopt.state_dict() per rank (e.g. f'hopt_rank{rank}.pt')."
    )


def _names(hopt: HyperOptimizer, of: str) -> dict[int, str]:
    """The trained parameters' names (``of="model"``) or the raw hyperparameters' (by id)."""
    if of == "model":
        return {id(p): n for n, p in zip(hopt.view.names, hopt.view.params)}
    return {id(r): n for n, r in hopt.hyperparameters.raw.items()}


def _watch(value: Any, key: str = "norms") -> tuple[Tensor, ...]:
    """The divergence watch's recorded parameter norms or training losses (``key``; none
    in older checkpoints)."""
    if value is None:
        return ()
    if key == "losses" and isinstance(value, Mapping) and "losses" not in value:
        return ()  # saved before the losses were
    entries: Any = value.get(key) if isinstance(value, Mapping) else None
    if not isinstance(entries, (list, tuple)) or len(entries) > divergence.KEEP:
        entries = [None]  # malformed
    if not all(isinstance(t, Tensor) and t.dim() == 0 for t in entries):
        raise ValueError("The checkpoint's divergence `watch` entry is malformed.")
    return tuple(entries)


def _entries(state: Any, method: str) -> None:
    if not isinstance(state, Mapping):
        raise ArgumentTypeError(
            f"`state` must be a dict from HyperOptimizer.state_dict(), got {type(state).__name__}."
        )
    missing = [k for k in KEYS if k not in state]
    if missing or state["format"] != FORMAT:
        raise ValueError(
            f"The checkpoint lacks {missing or ['format 2']}; it was not written by this "
            "version's HyperOptimizer.state_dict()."
        )
    saved = state["method"].get("type") if isinstance(state["method"], Mapping) else None
    if saved != method:
        raise ValueError(
            f"The checkpoint was saved with the method {saved}, this hyper-optimizer uses "
            f"{method}; resume with the same method."
        )
    if not isinstance(state["counters"], Mapping):
        raise ValueError("The checkpoint's `counters` entry is malformed.")


def validate(hopt: HyperOptimizer, state: Any) -> tuple[TrajectoryWindow | None, Any, Any]:
    """Check every entry of ``state``; returns the rebuilt window, history and guard state.

    Raises:
        ValueError: naming the first entry that does not fit ``hopt``.
    """
    _entries(state, type(hopt.method).__name__)
    _check_rank(hopt, state)
    _watch(state.get("watch"))
    _watch(state.get("watch"), "losses")
    hopt.view.check_signature(state["model"])
    hopt.hyperparameters.check_state(state["hparams"])
    for which, names in (("inner", _names(hopt, "model")), ("outer", _names(hopt, "hparams"))):
        key = f"{which}_optimizer"
        optimizers.check_state(getattr(hopt, key), state[key], key, names)
    hopt.val_sampler.check_state(state["val_sampler"])
    count = as_int(state["counters"].get("count"), "counters['count']", min=0)
    as_int(state["counters"].get("skipped"), "counters['skipped']", min=0)
    since = count % hopt.inner_steps  # steps since the last hyper-step
    # a run whose holdout guard stopped the hyper-steps records no window any more
    holdout = state.get("holdout")
    recording = not (isinstance(holdout, Mapping) and holdout.get("stopped") is True)
    window = None
    if state["window"] is None and hopt.method.needs_trajectory and since and recording:
        raise ValueError(
            f"The checkpoint holds no trajectory window, and {since} steps since the last "
            f"hyper-step were expected ({count} steps, inner_steps={hopt.inner_steps} here): "
            "it was saved with another inner_steps."
        )
    if state["window"] is not None or (hopt.method.needs_trajectory and since and recording):
        window = TrajectoryWindow.from_state_dict(
            state["window"], hopt.view, hopt.inner_optimizer, since, tuned(hopt)
        )
    if state.get("rng") is not None:
        parse_rng_state(state["rng"])
    guard = None  # a checkpoint without the guard's state (or from before it) starts it fresh
    if hopt.guard is not None and state.get("holdout") is not None:
        guard = hopt.guard.parse_state(state["holdout"], hopt.hyperparameters)
    history = hopt.history.parse_state(state["history"])
    _check_train_sampler(hopt, state["train_sampler"])  # last: it may warn
    return window, history, guard


def _validated(hopt: HyperOptimizer, state: Any) -> tuple[TrajectoryWindow | None, Any, Any]:
    """:func:`validate`; with a process group every rank then joins one check, so a
    failure on one rank raises on all (nothing is assigned on any)."""
    if hopt.process_group is None:
        return validate(hopt, state)
    try:
        out, error = validate(hopt, state), None
    except Exception as exc:  # noqa: BLE001 - raised by check_consistent after the collective
        out, error = None, exc
    distributed.check_consistent([], hopt.process_group, "the checkpoint", error=error)
    assert out is not None  # check_consistent raised otherwise
    return out


def _check_train_sampler(hopt: HyperOptimizer, saved: Any) -> None:
    """Warn, before anything is assigned (under warnings-as-errors the load then changes
    nothing), when a checkpoint saved without ``train_data`` meets a train sampler: it
    starts afresh (as a new hyper-optimizer's, not where this one's earlier draws left
    it), and a hyper-step given no batch draws from data the saving run did not have."""
    if hopt.train_sampler is None:
        return
    if saved is not None:
        hopt.train_sampler.check_state(saved)
        return
    warnings.warn(
        "The checkpoint holds no `train_data` sampler state (it was saved by a "
        "HyperOptimizer without train_data); this one's train sampler starts afresh from "
        "its seed. A hyper-step given no batch draws its training batch from there, which "
        "the saving run did not do.",
        HypergradientWarning,
        stacklevel=5,
    )


def load_state_dict(hopt: HyperOptimizer, state: Any) -> None:
    """Validate ``state`` entirely, then assign it to ``hopt`` (the method first: if its
    own ``load_state_dict`` raises, its previous state is put back). Under a process group
    every rank calls it: one collective after the validation, so a rank whose checkpoint
    does not fit raises its error and the others :class:`~hypergradient.RankFailedError`,
    together, instead of training on alone into DDP's next all-reduce."""
    window, history, guard = _validated(hopt, state)
    before = copy.deepcopy(hopt.method.state_dict())
    try:
        hopt.method.load_state_dict(state["method"]["state"])
    except Exception as err:
        hopt.method.load_state_dict(before)
        raise ValueError(f"The checkpoint's method state does not load: {err}") from err
    hopt.hyperparameters.load_state_dict(state["hparams"])
    # copies: torch's load keeps the checkpoint's tensors as the live buffers, so two
    # hyper-optimizers loaded from one checkpoint in memory stepped each other's momentum
    hopt.inner_optimizer.load_state_dict(clone_state(state["inner_optimizer"]["state_dict"]))
    hopt.outer_optimizer.load_state_dict(clone_state(state["outer_optimizer"]["state_dict"]))
    hopt.val_sampler.load_state_dict(state["val_sampler"])
    if hopt.train_sampler is not None and state["train_sampler"] is not None:
        hopt.train_sampler.load_state_dict(state["train_sampler"])
    elif hopt.train_sampler is not None:  # warned by validate
        hopt.train_sampler.reset()
    if window is not None:  # the twin with the settings just loaded (those at its start)
        twin = from_torch(hopt.inner_optimizer, hopt.view.params, tuned=tuned(hopt))[0]
        twin.offsets = window.optimizer.offsets  # the start's per-parameter step counts
        window.optimizer = twin
    loop = hopt.loop
    loop.count = int(state["counters"]["count"])
    loop.skipped = int(state["counters"]["skipped"])
    loop.window = window
    loop.norms = tuple(t.to(hopt.view.device) for t in _watch(state.get("watch")))
    loop.losses = tuple(t.to(hopt.view.device) for t in _watch(state.get("watch"), "losses"))
    loop.loss_pending = None
    loop.lrs = None
    loop.rng_pending, loop.drawn, loop.forward_drew = None, False, None
    if state.get("rng") is not None:
        restore_rng(parse_rng_state(state["rng"]), hopt.view.device)
    # the state the first step after loading draws from, as at construction (T1T2 replays
    # it too: None made its first hyper-step draw fresh noise, another step's)
    loop.rng_next = stepping.capture(hopt)
    step_grads.rewatch(hopt)  # T1T2's hooks for the step the loaded count is at
    hopt.history.restore(history)
    if guard is not None and hopt.guard is not None:
        hopt.guard.sampler.load_state_dict(state["holdout"]["sampler"])
        hopt.guard.restore(guard)
    elif hopt.guard is not None:  # not this hyper-optimizer's later scores, best, stop
        hopt.guard.sampler.reset()  # nor where its earlier draws left the holdout batches
        hopt.guard.restore(GuardState())
    hopt.hyperparameters.write_settings(hopt.inner_optimizer)
