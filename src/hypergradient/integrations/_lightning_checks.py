"""Checks of a Lightning Trainer's steps for :class:`~.lightning.HypergradientCallback`:
which settings a trajectory method can replay, which batches are inner steps, and the
validation data's shard of each rank; the module's declarations and the callback's
options, checked; a checkpoint's hyperparameters, loaded; the records, logged."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from .._vocab import ArgumentTypeError
from ..constraints import Constraint
from ..hyperoptimizer import HyperOptimizer
from ..hyperoptimizer.hparams import HyperParameters
from ..hyperoptimizer.sampler import BatchSampler
from ..hyperoptimizer.stepping import capture
from ..methods import T1T2, Method
from ..methods.rng import same_state
from .loggers import record_scalars

__all__ = [
    "accumulated",
    "check_declared",
    "check_hparams",
    "check_options",
    "check_replayable",
    "check_schedulers",
    "check_steps",
    "converting",
    "declared",
    "load_hparams",
    "log_record",
    "log_step",
    "redraw_samplers",
    "shard",
    "shard_weight",
    "skipped",
    "step_loss",
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


def declared(module: Any) -> dict[str, Tensor | Constraint]:
    """``module.hyperparameters_to_tune()``, checked."""
    declare = getattr(module, "hyperparameters_to_tune", None)
    if not callable(declare):
        raise ValueError(
            f"{type(module).__name__} declares no hyperparameters: define "
            "hyperparameters_to_tune(self) -> {name: tensor or hg.Positive(...)}, or pass "
            "hparams=... to HypergradientCallback."
        )
    hparams = declare()
    if not isinstance(hparams, Mapping) or not hparams:
        raise ValueError(
            "hyperparameters_to_tune() must return a non-empty dict {name: tensor or Constraint}."
        )
    return check_hparams(hparams, "hyperparameters_to_tune()")


def check_declared(module: Any) -> None:
    """Raise unless ``module.hyperparameters_to_tune()`` returns the same tensors at every
    call: new ones (``{"decay": self.decay.value}``) were tuned as copies that training
    never saw (3 hyper-steps moved them; training_step kept the initial decays)."""
    first, second = declared(module), declared(module)
    for name, h in first.items():
        a, b = (x.raw if isinstance(x, Constraint) else x for x in (h, second.get(name, h)))
        if a.data_ptr() != b.data_ptr() or a.shape != b.shape:
            raise ValueError(
                f"hyperparameters_to_tune()[{name!r}] is a new tensor at each call (such as "
                f"hg.Positive(...).value): the callback would tune a copy that training never "
                f"sees. Return the module's own tensor or Constraint (e.g. self.{name})."
            )


def load_hparams(hparams: Mapping[str, Tensor | Constraint], state: Any) -> None:
    """Write a checkpoint's hyperparameters (``HyperOptimizer.state_dict()["hparams"]``)
    into ``hparams``, after checking names, shapes, dtypes, finiteness and domains (a
    mismatch raises ``ValueError`` and changes nothing)."""
    first = next(iter(hparams.values()))
    device = first.raw.device if isinstance(first, Constraint) else first.device
    if isinstance(state, Mapping):  # the values only: the hyper-optimizer checks its links
        state = {k: v for k, v in state.items() if k != "links"}
    HyperParameters(hparams, device=device).load_state_dict(state)


def load_tuned(
    module: Any,
    checkpoint: Mapping[str, Any],
    hparams: Mapping[str, Tensor | Constraint] | None = None,
) -> None:
    """Write the hyperparameters a ``HypergradientCallback`` tuned, as a Trainer checkpoint
    saved them, into ``module``'s (``hyperparameters_to_tune()``, or ``hparams``).

    ``LightningModule.load_from_checkpoint`` restores the weights only: the tuned values are
    the callback's state, so a module loaded without the callback holds its initial
    hyperparameters (for a model hyperparameter, a gate or a temperature, predictions with
    the tuned weights and the untuned values). Call it from the module's hook::

        def on_load_checkpoint(self, checkpoint):
            load_tuned(self, checkpoint)

    (``Trainer.validate/test/predict(ckpt_path=...)`` with the callback attached, and
    ``Trainer.fit(ckpt_path=...)``, restore them already; writing the same values twice is
    harmless.)

    Raises:
        ValueError: the checkpoint holds no hyperparameters of a ``HypergradientCallback``
            (saved before its first training step, or without it), more than one, or they
            do not match the module's (names, shapes, dtypes, domains); nothing changes.
    """
    callbacks = checkpoint.get("callbacks") if isinstance(checkpoint, Mapping) else None
    found = [
        (key, state["hopt"]["hparams"])
        for key, state in (callbacks.items() if isinstance(callbacks, Mapping) else ())
        if isinstance(state, Mapping)
        and isinstance(state.get("hopt"), Mapping)
        and "hparams" in state["hopt"]
    ]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({[k for k, _ in found]})"
        raise ValueError(
            f"The checkpoint holds {what} HypergradientCallback hyperparameters; pass the "
            "dict a Trainer saved with the callback attached after a training step (as "
            "on_load_checkpoint(checkpoint) receives it)."
        )
    load_hparams(declared(module) if hparams is None else hparams, found[0][1])


def converting(loss: Any, convert: Any) -> Any:
    """``loss`` on ``convert(batch)``: the validation and holdout batches in the precision
    the Trainer gives ``training_step`` (``precision="64-true"`` converts float32 data to
    float64; the hyper-step on float32 rows crashed on the float64 weights)."""

    def converted(module: Any, hparams: Any, batch: Any) -> Tensor:
        return loss(module, hparams, convert(batch))

    converted.__qualname__ = getattr(loss, "__qualname__", "loss")  # the same on every rank
    return converted


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


#: ``HyperOptimizer`` arguments the callback passes on from its ``**options``.
OPTIONS = {
    "seed", "nonfinite", "history_size", "holdout_loss", "min_delta", "on_divergence",
    "optimizer_hparams", "autocast",
}  # fmt: skip
#: ``HyperOptimizer`` arguments the callback sets itself, and the callback's name for them.
OWN = {
    "inner_steps": "every_n_steps",
    "inner_optimizer": "the Trainer's optimizer",
    "process_group": "the Trainer's strategy",
    # Every hyper-step gets the Trainer's batch: a sampler over them was never drawn from.
    "train_data": "the Trainer's training batch of each hyper-step",
    "train_batch_size": "the Trainer's training batch of each hyper-step",
}


def check_options(options: Mapping[str, Any]) -> None:
    """Refuse, at construction, an option the callback does not pass on to its
    ``HyperOptimizer`` (a typo, or one the callback sets itself: ``inner_steps=5`` failed
    only once training started, as "multiple values for keyword argument")."""
    for name in options:
        if name in OPTIONS:
            continue
        if name in OWN:
            raise ArgumentTypeError(
                f"HypergradientCallback sets `{name}` itself (from {OWN[name]}); do not pass it."
            )
        raise ArgumentTypeError(
            f"HypergradientCallback got an unknown argument `{name}`; the HyperOptimizer "
            f"options it passes on are {sorted(OPTIONS)}."
        )


def trainer_autocast(trainer: pl.Trainer) -> torch.dtype | None:
    """The autocast dtype the Trainer runs ``training_step`` in (``precision="bf16-mixed"``,
    ``"16-mixed"``), for ``HyperOptimizer(autocast=...)``; None otherwise (detected). The
    driver's own guess watches the module's forward pass, which a ``training_step`` calling
    its layers directly (``self.linear(x)``) never runs: it took the bfloat16 steps for
    float32 ones, and T1T2's step check warned (or skipped) at every hyper-step."""
    make = getattr(trainer.precision_plugin, "autocast_context_manager", None)
    dtype = getattr(make(), "fast_dtype", None) if callable(make) else None
    return dtype if isinstance(dtype, torch.dtype) else None


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


def accumulated(hopt: HyperOptimizer) -> None:
    """A batch whose gradient a later optimizer step accumulates: note whether its forward
    pass drew random numbers (dropout), as ``hopt.train_loss`` notes it in the documented
    loop, where T1T2 then skips that step's hyper-step with a warning (its one replayed
    forward pass cannot reproduce several batches' masks). Under the Trainer, T1T2
    applied it (0.2 from the documented loop's decays after 6 steps of 2 batches)."""
    before = hopt.loop.rng_pending  # captured at the batch's start (T1T2 only)
    if before is not None:
        hopt.loop.drawn |= not same_state(before, capture(hopt))


def step_loss(trainer: pl.Trainer, pl_module: Any, outputs: Any) -> Tensor | None:
    """The loss ``training_step`` returned, for the divergence watch. Automatic
    optimization passes the hook that loss divided by ``accumulate_grad_batches`` (what
    backward saw): the warning quoted the training losses halved under accumulation by 2."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    if not isinstance(loss, Tensor):
        return None
    if getattr(pl_module, "automatic_optimization", True):
        return loss * trainer.accumulate_grad_batches
    return loss


def check_steps(steps: int, pl_module: Any, method: Method) -> None:
    """Raise when a batch's optimizer steps are not one a trajectory method can replay:
    several steps on one batch, or (manual optimization) a batch whose gradients may be
    accumulated into a later step. T1T2 differentiates the last step from the parameters
    before it, which the callback reads at the start of the batch: after several steps on
    one batch, those are the parameters before the first (its hypergradient was another
    step's: decay 0.35 away from the documented loop's after 8 steps)."""
    several = steps > 1 and isinstance(method, T1T2)
    if not (method.needs_trajectory or several) or steps == 1:
        return
    if several and not method.needs_trajectory:
        raise ValueError(
            f"T1T2 differentiates the last optimizer step from the parameters before it, "
            f"but training_step took {steps} optimizer steps on one batch (the callback "
            "sees the parameters only between batches). Take one optimizer step per "
            "training_step, or use hg.IFT() or hg.HOAG()."
        )
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


def log_record(trainer: pl.Trainer, pl_module: Any, record: Any, limit: int) -> None:
    """Log a hyper-step's record (:func:`~.loggers.record_scalars`, elements up to
    ``limit``) to ``trainer.callback_metrics`` and to every logger of the Trainer."""
    scalars = record_scalars(record, limit)
    values = {f"hypergradient/{k}": v for k, v in scalars.items() if k != "time/seconds"}
    # log_dict alone writes every log_every_n_steps batches: most records would be lost
    pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=1, logger=False)
    for logger in trainer.loggers:
        logger.log_metrics(values, step=log_step(trainer, pl_module))


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
