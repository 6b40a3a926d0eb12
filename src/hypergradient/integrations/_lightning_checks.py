"""Checks of a Lightning Trainer's steps for :class:`~.lightning.HypergradientCallback`:
which settings a trajectory method can replay, which batches are inner steps, and the
validation data's shard of each rank."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from .._vocab import ArgumentTypeError
from ..constraints import Constraint
from ..hyperoptimizer import HyperOptimizer
from ..hyperoptimizer.sampler import BatchSampler
from ..methods import Method

__all__ = [
    "check_hparams",
    "check_replayable",
    "check_schedulers",
    "check_steps",
    "log_step",
    "redraw_samplers",
    "shard",
    "shard_weight",
    "skipped",
    "weighted",
]


def shard(data: Any, rank: int, world: int, device: torch.device) -> Any:
    """Tensor data: this rank's rows (``rank::world``), on ``device``; anything else as is."""
    tensors = (data,) if isinstance(data, Tensor) else data
    if not isinstance(tensors, (tuple, list)) or not all(isinstance(t, Tensor) for t in tensors):
        return data
    return tuple(t[rank::world].to(device) for t in tensors)


def shard_weight(data: Any, rank: int, world: int) -> float:
    """``world * n_rank / n``: the weight that makes the average over the ranks of this
    rank's mean loss (over its ``n_rank`` of the ``n`` rows :func:`shard` gives it) the
    mean over all ``n`` rows. 1.0 when the rows split evenly, or the data is not tensors.

    With 41 rows on 2 ranks (21 and 20), unweighted means would count rank 0's rows as
    1/42 each and rank 1's as 1/40: the hypergradient of another validation loss.
    """
    tensors = (data,) if isinstance(data, Tensor) else data
    if world <= 1 or not isinstance(tensors, (tuple, list)) or not tensors:
        return 1.0
    if not all(isinstance(t, Tensor) and t.dim() > 0 for t in tensors):
        return 1.0
    n = tensors[0].shape[0]
    if n == 0 or n % world == 0:
        return 1.0
    mine = len(range(rank, n, world))
    return world * mine / n


def weighted(loss: Any, weight: float) -> Any:
    """``loss`` multiplied by ``weight`` (``loss`` itself when the weight is 1)."""
    if weight == 1.0:
        return loss

    def scaled(module: Any, hparams: Any, batch: Any) -> Tensor:
        return loss(module, hparams, batch) * weight

    scaled.__qualname__ = getattr(loss, "__qualname__", "loss")  # the same on every rank
    return scaled


def check_hparams(hparams: Mapping[str, Any], source: str) -> dict[str, Tensor | Constraint]:
    """``hparams`` as a dict, after checking that every value is a tensor or a Constraint
    (a float or a NumPy array used to crash later in ``on_fit_start``)."""
    for name, h in hparams.items():
        if not isinstance(h, (Tensor, Constraint)):
            raise ArgumentTypeError(
                f"{source}[{name!r}] must be a floating-point tensor or a Constraint such as "
                f"hg.Positive(...), got {type(h).__name__}; wrap it, e.g. "
                f"torch.tensor(value, dtype=torch.float64), and keep it on the module."
            )
    return dict(hparams)


def check_replayable(trainer: pl.Trainer, method: Method) -> None:
    """Raise unless the Trainer's step is one a trajectory method can replay exactly."""
    why = None
    if trainer.world_size > 1:
        why = (
            f"the Trainer runs on {trainer.world_size} processes: each step uses gradients "
            "averaged across them inside backward, which a per-rank replay cannot reproduce"
        )
    elif trainer.accumulate_grad_batches != 1:
        why = f"accumulate_grad_batches={trainer.accumulate_grad_batches} (one step spans batches)"
    elif trainer.gradient_clip_val:
        why = f"gradient_clip_val={trainer.gradient_clip_val} (the replay does not clip)"
    elif str(trainer.precision) not in ("32-true", "64-true", "32", "64"):
        why = f"precision={trainer.precision!r} (the replay runs in full precision)"
    if why is not None:
        raise ValueError(
            f"{type(method).__name__} replays the Trainer's optimizer steps, which is not exact "
            f"here: {why}. Use an implicit method (hg.IFT(), hg.T1T2()) or change the setting."
        )


def skipped(trainer: pl.Trainer, pl_module: Any, outputs: Any) -> bool:
    """Whether automatic optimization skipped the batch: ``training_step`` returned None
    (Lightning then passes ``{}``), so no backward ran and the optimizer's step, taken on
    gradients just set to None, moved nothing (under accumulation it steps on the earlier
    batches' gradients: not skipped)."""
    automatic = getattr(pl_module, "automatic_optimization", True)
    empty = isinstance(outputs, Mapping) and outputs.get("loss") is None
    return automatic and empty and trainer.accumulate_grad_batches == 1


def check_steps(steps: int, pl_module: Any, method: Method) -> None:
    """Raise when a batch's optimizer steps are not one a trajectory method can replay:
    several steps on one batch, or (manual optimization) a batch whose gradients may be
    accumulated into a later step."""
    if not method.needs_trajectory or steps == 1:
        return
    if steps > 1:
        why = f"training_step took {steps} optimizer steps on one batch"
    elif getattr(pl_module, "automatic_optimization", True):
        return  # automatic optimization without accumulation: the batch was skipped
    else:
        why = (
            "a batch ended without an optimizer step under manual optimization (its "
            "gradients would be accumulated into a later step)"
        )
    raise ValueError(
        f"{type(method).__name__} replays one optimizer step per training batch, but {why}. "
        "Take one optimizer step per training_step, or use an implicit method (hg.IFT(), "
        "hg.T1T2())."
    )


def log_step(trainer: pl.Trainer, pl_module: Any) -> int:
    """The x at which Lightning's loggers receive the current batch's metrics (read in
    ``on_train_batch_end``): the batches that stepped before this one. Automatic
    optimization: the optimizer steps before this batch's (one per stepping batch, under
    gradient accumulation too). Manual optimization: the batches before this one, however
    many steps each took (``global_step`` counted those: with one step every 2 batches the
    records landed at half the x of their batches, with 2 steps per batch at twice)."""
    if getattr(pl_module, "automatic_optimization", True):
        return max(trainer.global_step - 1, 0)
    return int(trainer.fit_loop.epoch_loop.batch_progress.total.completed)


def check_schedulers(trainer: pl.Trainer) -> None:
    if trainer.lr_scheduler_configs:
        raise ValueError(
            "Trajectory methods replay the optimizer with the settings at the start of each "
            "window, but the module configures a learning-rate scheduler that changes them "
            "in between; drop the scheduler or use an implicit method (hg.IFT(), hg.T1T2())."
        )


def redraw_samplers(hopt: HyperOptimizer, shards: list[Any], rank: int, world: int) -> None:
    """Put this rank's own state into ``hopt``'s tensor samplers after a checkpoint load,
    when the ranks' shards of the tensor data ``shards`` (:func:`shard`) differ in size.

    Lightning saves rank 0's callback state, and every rank loads it. A sampler's state is
    its generator's, which its draws advance by an amount that depends on the number of
    rows (``randperm(n)``): with uneven shards (21 and 20 rows), rank 1 took over rank 0's
    generator and drew other rows than in the uninterrupted run. A seeded sampler's state
    is a function of its seed, rows, batch size and number of draws (a rolled-back draw is
    undone), so each rank redraws its own ``drawn`` batches from a fresh sampler.

    Cost: ``drawn`` draws of a batch per sampler (no loss, no product).
    """
    if all(shard_weight(data, rank, world) == 1.0 for data in shards):
        return  # even shards: every rank's draws advanced its generator alike
    guard = hopt.guard
    for sampler in (hopt.val_sampler, None if guard is None else guard.sampler):
        if sampler is None or sampler.tensors is None:
            continue
        fresh = BatchSampler(sampler.tensors, sampler.batch_size, sampler.seed, sampler.name)
        for _ in range(sampler.drawn):
            fresh.next()
        sampler.load_state_dict(fresh.state_dict())
