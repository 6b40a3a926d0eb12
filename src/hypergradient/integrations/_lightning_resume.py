"""Where a fit of :class:`~.lightning.HypergradientCallback` starts its hyper-optimizer from:
a checkpoint the Trainer loaded, or the previous fit of the same Trainer and module."""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch

from .._vocab import HypergradientWarning
from ..hyperoptimizer import HyperOptimizer
from ..hyperoptimizer.window import parse_rng_state
from ._lightning_checks import redraw_samplers

__all__ = ["carried", "restore"]


def carried(
    previous: Any, new: HyperOptimizer, trainer: Any, module: Any
) -> tuple[Any, dict[str, Any] | None]:
    """This fit's record for the next (``new`` and weak references to ``trainer`` and
    ``module``), and the state a second ``Trainer.fit`` of the same Trainer and module goes
    on from (None for another fit): the previous fit's hyper-optimizer (``previous``' first
    element) with its hyper-step count, history, outer optimizer, method state, samplers,
    holdout guard and window, but the new fit's inner optimizer (Lightning builds it afresh
    from ``configure_optimizers``) and the current random-number state. A second fit used to
    build a new hyper-optimizer: its counter, history and outer optimizer restarted, and the
    library's own loggers wrote its hyper-steps over the first fit's at the same steps."""
    fit = (new, weakref.ref(trainer), weakref.ref(module))
    if previous is None or previous[1]() is not trainer or previous[2]() is not module:
        return fit, None
    state = dict(previous[0].state_dict())
    fresh = new.state_dict()
    state["inner_optimizer"], state["rng"] = fresh["inner_optimizer"], fresh["rng"]
    return fit, state


def restore(
    hopt: HyperOptimizer, loaded: Any, shards: list[Any], trainer: Any, again: bool
) -> None:
    """Load ``loaded`` into ``hopt`` (the CPU generator as it is now: a checkpoint's was
    restored when the Trainer loaded it); uneven shards redraw their own samplers. A state
    carried from the previous fit (``again``) that does not fit this one (the module
    configures another optimizer now) is dropped with a warning: the fit starts afresh."""
    state = dict(loaded)
    if state.get("rank") is not None:  # rank 0's, which Lightning hands every rank: the
        state["rank"] = trainer.global_rank  # samplers are redrawn below (no window: DDP)
    if state.get("rng") is not None:
        state["rng"] = [torch.get_rng_state(), parse_rng_state(state["rng"])[1]]
    try:
        hopt.load_state_dict(state)  # (validated before anything is assigned)
    except ValueError as err:
        if not again:
            raise
        warnings.warn(
            f"HypergradientCallback starts this fit's hyper-steps afresh: the previous fit's "
            f"state does not fit it ({err})",
            HypergradientWarning,
            stacklevel=2,
        )
        return
    redraw_samplers(hopt, shards, trainer.global_rank, trainer.world_size)
