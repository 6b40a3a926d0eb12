"""Argument checks of :func:`hypergradient.integrations.optuna.refine`."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

from .._vocab import ArgumentTypeError, as_callable, as_int
from ..hyperoptimizer import HyperOptimizer

__all__ = ["check_refine", "no_hyper_step"]


def check_refine(hopt: Any, data: Any, epochs: Any, score: Any, several: bool) -> int:
    """:func:`~.optuna.refine`'s argument checks, before any training; returns ``epochs``
    (``several``: a study of several objectives and no ``direction``)."""
    from_history = score is None
    if score is not None:  # (a value, score=accuracy(model), failed after an epoch)
        as_callable(score, "score", "() -> float: e.g. lambda: accuracy(model)")
        if several:  # (the worst epoch's score was kept)
            raise ValueError(
                "The study has several objectives: refine cannot tell whether `score` is "
                "better high or low; pass direction='maximize' or 'minimize'."
            )
    if not isinstance(hopt, HyperOptimizer):
        raise ArgumentTypeError(f"`hopt` must be a hg.HyperOptimizer, got {type(hopt).__name__}.")
    epochs = as_int(epochs, "epochs", min=1)
    if epochs > 1 and isinstance(data, Iterator):
        raise ArgumentTypeError(
            f"`data` is an iterator ({type(data).__name__}): it would be exhausted after the "
            f"first of the {epochs} epochs. Pass a list or a DataLoader."
        )
    if from_history and hopt.history.maxlen == 0:
        raise ValueError(
            "refine reports each hyper-step's record from hopt.history, but the "
            "hyper-optimizer keeps none (history_size=0); build it with history_size >= 1 "
            "or pass score=...."
        )
    if from_history and no_hyper_step(hopt, data, epochs):
        raise ValueError(
            f"refine reports each hyper-step, but the hyper-optimizer would take none over "
            f"{epochs} epoch(s) of `data` (inner_steps={hopt.inner_steps}, after "
            f"{hopt.loop.count} steps; stopped by its holdout guard: {hopt.stopped}): every "
            f"trial would be pruned. Pass more `data` or `epochs`, or score=...."
        )
    return epochs


def no_hyper_step(hopt: HyperOptimizer, data: Any, epochs: int) -> bool:
    """Whether ``epochs`` passes over ``data`` surely end before the next hyper-step (its
    holdout guard stopped them, or there are too few batches; unknown length: False)."""
    try:
        batches = epochs * len(data) if isinstance(data, Sized) else None
    except TypeError:  # a DataLoader over an IterableDataset
        batches = None
    needed = hopt.inner_steps - hopt.loop.count % hopt.inner_steps
    return hopt.stopped or (batches is not None and batches < needed)
