"""Tune hyperparameters of a ``LightningModule`` trained by an unmodified ``lightning.Trainer``.

The Trainer keeps its loop, its optimizer and its optimizer step; the
:class:`HypergradientCallback` watches the steps and, every ``every_n_steps`` of them, takes
a hyper-step: it asks its method (any :mod:`hypergradient.methods` object) for the
hypergradient of the validation loss and steps its own outer optimizer over the
hyperparameters. The module declares what is tuned and the two losses::

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(30, 1)
            self.decay = hg.Positive(torch.full((30,), 1e-2))      # tuned by the callback

        def hyperparameters_to_tune(self):                         # name -> tensor/Constraint
            return {"decay": self.decay}

        def training_loss(self, batch, hparams):                   # differentiable in both
            x, y = batch
            w = self.net.weight.squeeze(0)
            return bce(self.net(x).squeeze(1), y) + 0.5 * (hparams["decay"] * w**2).sum()

        def validation_loss(self, batch, hparams):
            x, y = batch
            return bce(self.net(x).squeeze(1), y)

        def training_step(self, batch, batch_idx):                 # the Trainer's usual hook
            return self.training_loss(batch, tuned_values(self))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    tuner = HypergradientCallback(val_data=(x_val, y_val), every_n_steps=10,
                                  method=hg.IFT(hg.CG(maxiter=20)))
    L.Trainer(callbacks=[tuner], max_epochs=5).fit(Net(), train_loader)

During a hyper-step the losses are called on the module with its parameters replaced
functionally (``torch.func.functional_call``): they must compute from ``batch`` and
``hparams`` only (no ``self.log`` inside them; log in ``training_step``). The hyperparameters
are plain tensors or :class:`~hypergradient.constraints.Constraint` objects held by the module
(not ``nn.Parameter``: the Trainer's optimizer must not train them); the callback moves them
to the module's device at the start of fitting.

**Checkpoints.** The callback's state (hyperparameters, outer optimizer, method state,
samplers, history, holdout guard, trajectory window) is saved in the Trainer's checkpoint
under ``checkpoint["callbacks"]["HypergradientCallback"]``; ``Trainer.fit(ckpt_path=...)``
resumes it (under DDP every rank loads rank 0's; uneven shards redraw their own samplers).
``load_from_checkpoint`` restores the weights only: :func:`load_tuned` reads the values back.

**Logging.** After each hyper-step, to every logger of the Trainer (``logger.log_metrics``,
at the x Lightning gives that batch's own metrics, whatever ``log_every_n_steps``: a
hyper-step is an event), and by ``pl_module.log_dict(..., logger=False)`` into
``trainer.callback_metrics`` (``ModelCheckpoint`` and ``EarlyStopping`` can monitor them):
``hypergradient/loss/val``, ``hypergradient/hparams/<name>``, hypergradient norms and
solver diagnostics, as :func:`~hypergradient.integrations.record_scalars` names them.

**Data-parallel.** Under ``strategy="ddp"`` (any backend, gloo on CPU) every rank runs the
callback: the hypergradient is that of the losses averaged over the ranks (each rank's
training batch is its own shard; tensor ``val_data`` is split by rows between the ranks), and
the hyperparameters stay identical on every rank. Rows that do not split evenly (41 on 2
ranks) weight each rank's mean validation (and holdout) loss by its share of the rows.

**Methods.** Implicit methods (``hg.IFT``, ``hg.HOAG``) work everywhere; ``hg.T1T2`` too,
but for several optimizer steps on one batch (manual optimization), which it refuses; as in
the documented loop, a step on another gradient than ``train_loss``'s (clipping, batches
accumulated) warns (``on_divergence="skip"``: skips), and with dropout skips.
Trajectory methods (``hg.Unrolled``, ``hg.ForwardMode``, ``hg.DrMAD``) replay the Trainer's
steps differentiably, which is exact only for a plain step: one device, one SGD or Adam
optimizer, no gradient accumulation or clipping, no learning-rate scheduler, full precision;
otherwise the callback raises at the start of fitting, saying which setting prevents it.
Under manual optimization they also need one optimizer step per training batch (the
callback raises at the first batch that takes several, or none).

**Frozen parameters.** Tensors of the optimizer that do not require grad (a frozen
backbone in ``Adam(self.parameters())``) are constants of the inner problem: torch's
optimizer never moves them, and hyper-steps neither differentiate nor replay them.

**Steps.** ``every_n_steps`` counts the Trainer's optimizer steps (several per batch under
manual optimization are counted each). A batch whose ``training_step`` returned None is
skipped by Lightning (no backward, nothing moves): it is not an inner step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor

from .._vocab import ArgumentTypeError, as_bool, as_callable, as_int
from ..constraints import Constraint
from ..hyperoptimizer import HyperOptimizer, HyperStepRecord
from ..hyperoptimizer.window import parse_rng_state
from ..methods import Method
from ._lightning_checks import (
    accumulated,
    check_declared,
    check_hparams,
    check_options,
    check_replayable,
    check_schedulers,
    check_steps,
    converting,
    declared,
    load_hparams,
    load_tuned,
    log_record,
    shard,
    shard_weight,
    skipped,
    step_loss,
    trainer_autocast,
    weighted,
)
from ._lightning_grads import StepGrads, shown
from ._lightning_resume import carried, restore

__all__ = ["HypergradientCallback", "load_tuned", "tuned_values"]

LossFn = Callable[[Any, dict[str, Tensor], Any], Tensor]
OuterFactory = Callable[[list[Tensor]], torch.optim.Optimizer]


def tuned_values(module: Any) -> dict[str, Tensor]:
    """The current values of ``module.hyperparameters_to_tune()`` (detached): what
    ``training_step`` passes its loss."""
    hparams = declared(module).items()
    return {k: h.value if isinstance(h, Constraint) else h.detach() for k, h in hparams}


def _module_loss(name: str) -> LossFn:
    def loss(module: Any, hparams: dict[str, Tensor], batch: Any) -> Tensor:
        return getattr(module, name)(batch, hparams)

    loss.__qualname__ = f"module.{name}"
    return loss


def _sinks(user: Any, rank: int, records: list[HyperStepRecord]) -> list[Any]:
    """The user's sinks (on global rank 0 only: every rank duplicated each record), then the
    callback's own, which every committed record reaches (``history_size=0`` keeps none)."""
    user = user if rank == 0 else None
    user = [] if user is None else list(user) if isinstance(user, (list, tuple)) else [user]
    return [*user, records.append]  # last: reached only if the others succeeded


def _default_outer(params: list[Tensor]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=0.01)


class HypergradientCallback(pl.Callback):
    """Take hyper-steps while a ``lightning.Trainer`` trains (see the module's docstring).

    Args:
        val_data: validation data: a tuple of tensors (sampled by ``val_batch_size`` rows,
            split by rows between data-parallel ranks), or an iterable of batches such as
            a ``DataLoader`` (each rank iterates its own; give each its shard).
        val_batch_size: rows per validation batch (None: all rows of the rank's part).
        method: a :mod:`hypergradient.methods` method (default ``hg.IFT()``).
        every_n_steps: optimizer steps of the Trainer between hyper-steps.
        outer_optimizer: a factory ``params -> torch.optim optimizer`` over the raw
            hyperparameters (default ``Adam(lr=0.01)``).
        hparams: ``{name: tensor or Constraint}`` instead of the module's
            ``hyperparameters_to_tune()``.
        train_loss, val_loss: ``loss(module, hparams, batch)`` instead of the module's
            ``training_loss(batch, hparams)`` / ``validation_loss(batch, hparams)``.
        holdout_data, holdout_batch_size, patience, keep_best: the validation-overfit
            guard of :class:`~hypergradient.HyperOptimizer` (held-out split, early stop of
            the hyper-steps, best hyperparameters by holdout score).
        log_elements: hyperparameters with at most this many elements are logged element
            by element (larger ones as mean, min, max, norm).
        log: log through ``pl_module.log_dict`` (the Trainer's logger).
        logger: extra sinks for the records (e.g. a
            :class:`~hypergradient.integrations.TensorBoardLogger`), as in ``HyperOptimizer``;
            under a data-parallel strategy only global rank 0 writes to them (as Lightning's
            own loggers: the records are the same on every rank).
        **options: other ``HyperOptimizer`` arguments (``seed``, ``nonfinite``,
            ``history_size``, ``holdout_loss``, ``min_delta``, ``on_divergence``,
            ``optimizer_hparams``, ``autocast``: by default the Trainer's AMP dtype).

    Attributes:
        hopt: the :class:`~hypergradient.HyperOptimizer` behind it (from the start of
            training): ``hopt.hparams``, ``hopt.history``, ``hopt.best_hparams``.

    Cost: that of the method every ``every_n_steps`` steps, plus one copy of the trained
    parameters and optimizer state per hyper-step (the rollback snapshot).
    """

    def __init__(
        self,
        *,
        val_data: Any,
        val_batch_size: int | None = None,
        method: Method | None = None,
        every_n_steps: int = 10,
        outer_optimizer: OuterFactory | None = None,
        hparams: Mapping[str, Tensor | Constraint] | None = None,
        train_loss: LossFn | None = None,
        val_loss: LossFn | None = None,
        holdout_data: Any = None,
        holdout_batch_size: int | None = None,
        patience: int | None = None,
        keep_best: bool = True,
        log_elements: int = 8,
        log: bool = True,
        logger: Any = None,
        **options: Any,
    ):
        if val_data is None:
            raise ValueError("`val_data` is required: hyper-steps need validation batches.")
        if method is not None and not isinstance(method, Method):
            raise ArgumentTypeError(f"`method` must be a method such as hg.IFT(), got {method!r}.")
        self.every_n_steps = as_int(every_n_steps, "every_n_steps", min=1)
        self.log_elements = as_int(log_elements, "log_elements", min=1)
        self.log_records = as_bool(log, "log")
        for name, fn in (("train_loss", train_loss), ("val_loss", val_loss)):
            if fn is not None:
                as_callable(fn, name, "(module, hparams, batch)")
        outer = _default_outer if outer_optimizer is None else outer_optimizer
        self.outer_factory = as_callable(outer, "outer_optimizer", "(params) -> optimizer")
        if hparams is not None and not isinstance(hparams, Mapping):
            raise ArgumentTypeError(
                f"`hparams` must be a dict {{name: tensor or Constraint}}, got "
                f"{type(hparams).__name__}."
            )
        self.hparams_arg = None if hparams is None else check_hparams(hparams, "hparams")
        self.losses = (train_loss, val_loss)
        self.method = method
        self.data = {
            "val": (val_data, val_batch_size),
            "holdout": (holdout_data, holdout_batch_size),
        }
        for sink in logger if isinstance(logger, (list, tuple)) else [logger]:
            if isinstance(sink, pl.loggers.Logger):
                raise ArgumentTypeError(
                    f"`logger` takes hypergradient sinks (e.g. hypergradient.integrations."
                    f"TensorBoardLogger), got Lightning's {type(sink).__name__}: pass it as "
                    "Trainer(logger=...), where the callback writes every hyper-step."
                )
        check_options(options)
        self.options = dict(options, patience=patience, keep_best=keep_best, logger=logger)
        self.hopt: HyperOptimizer | None = None
        self._loaded: Mapping[str, Any] | None = None
        self._steps_before = 0
        self._records: list[HyperStepRecord] = []  # committed during the current batch
        self._stage: tuple[str, Any] = ("fit", None)
        self._grads: StepGrads | None = None  # the step's gradients (manual optimization)
        self._fit: Any = None  # the last fit's hopt, trainer and module (weakly)

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the module's declarations and, for trajectory methods, the Trainer."""
        self._stage = (stage, pl_module)  # read by load_state_dict (called after setup)
        if stage != "fit":
            return
        if self.hparams_arg is None:
            check_declared(pl_module)
        names = (("training_loss", "train_loss"), ("validation_loss", "val_loss"))
        for fn, (name, arg) in zip(self.losses, names):
            if fn is None and not callable(getattr(pl_module, name, None)):
                raise ValueError(
                    f"{type(pl_module).__name__} has no {name}(batch, hparams); define it or "
                    f"pass {arg}=... to the callback."
                )
        if self.method is not None and self.method.needs_trajectory:
            check_replayable(trainer, self.method)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Move the hyperparameters to the module's device (the strategy placed it)."""
        device = pl_module.device
        for h in self._hparams(pl_module).values():
            raw = h.raw if isinstance(h, Constraint) else h
            if raw.device != device:
                raw.data = raw.data.to(device)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the hyper-optimizer over the Trainer's optimizer; resume a checkpoint."""
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(
                f"HypergradientCallback needs exactly one optimizer, the module configures "
                f"{len(optimizers)}."
            )
        if self.method is not None and self.method.needs_trajectory:
            check_schedulers(trainer)
        self.hopt = self._build(trainer, pl_module, optimizers[0])
        self._grads = StepGrads.attach(self._grads, self.hopt, optimizers[0], pl_module)
        self._fit, again = carried(self._fit, self.hopt, trainer, pl_module)  # a second fit
        loaded, self._loaded = self._loaded or again, None
        if loaded is not None:
            shards = [data for data, _ in self.data.values()]
            restore(self.hopt, loaded, shards, trainer, loaded is again)

    def _hparams(self, pl_module: Any) -> dict[str, Tensor | Constraint]:
        return self.hparams_arg if self.hparams_arg is not None else declared(pl_module)

    def _build(self, trainer: pl.Trainer, pl_module: Any, inner: Any) -> HyperOptimizer:
        world, rank = trainer.world_size, trainer.global_rank
        group = dist.group.WORLD if world > 1 and dist.is_initialized() else None
        train_loss, val_loss = self.losses
        (val, val_size), (holdout, holdout_size) = self.data["val"], self.data["holdout"]
        # The batches in the precision the Trainer gives training_step ("64-true": float64)
        convert = trainer.precision_plugin.convert_input
        val_loss = converting(val_loss or _module_loss("validation_loss"), convert)
        # Uneven shards of tensor data: each rank's mean weighted by its share of the rows.
        options = self.options | {"logger": _sinks(self.options["logger"], rank, self._records)}
        if options.get("autocast") is None:  # (False: the user says none)
            options["autocast"] = trainer_autocast(trainer)
        if holdout is not None:
            base = options.get("holdout_loss")
            base = val_loss if base is None else converting(base, convert)
            options["holdout_loss"] = weighted(base, shard_weight(holdout, rank, world))
        return HyperOptimizer(
            pl_module,
            self._hparams(pl_module),
            inner_optimizer=inner,
            outer_optimizer=self.outer_factory,
            train_loss=train_loss or _module_loss("training_loss"),
            val_loss=weighted(val_loss, shard_weight(val, rank, world)),
            val_data=shard(val, rank, world, pl_module.device),
            val_batch_size=val_size,
            holdout_data=shard(holdout, rank, world, pl_module.device),
            holdout_batch_size=holdout_size,
            method=self.method,
            inner_steps=self.every_n_steps,
            process_group=group,
            **options,
        )

    # ------------------------------------------------------------------ steps
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._steps_before = trainer.global_step
        self._require_hopt().begin_step()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # training_step returned None: the optimizer step moved nothing
        skip = skipped(trainer, pl_module, outputs)
        steps = 0 if skip else trainer.global_step - self._steps_before
        hopt = self._require_hopt()
        check_steps(steps, pl_module, hopt.method)
        if steps == 0:  # no optimizer step (gradient accumulation, a skipped batch)
            return None if skip else accumulated(hopt)
        self._records.clear()
        with shown(self._grads):  # (under manual optimization: the step's own .grad)
            hopt.end_step(batch, loss=step_loss(trainer, pl_module, outputs))
        for _ in range(steps - 1):  # manual optimization stepped more than once (implicit)
            hopt.begin_step()
            hopt.end_step(batch)
        if self.log_records:
            for record in self._records:
                log_record(trainer, pl_module, record, self.log_elements)
        self._records.clear()

    def _require_hopt(self) -> HyperOptimizer:
        if self.hopt is None:
            raise RuntimeError("HypergradientCallback was not set up by a Trainer.fit() call.")
        return self.hopt

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The hyper-optimizer's checkpoint (saved by the Trainer with its own)."""
        if self.hopt is not None:
            return {"hopt": self.hopt.state_dict()}
        return {} if self._loaded is None else {"hopt": self._loaded}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the state until training starts (the optimizer does not exist yet); write
        its hyperparameters into the module now, as Lightning restores the weights (a fit
        with nothing left to train, a sanity check, ``Trainer.validate``, ``test`` or
        ``predict``, which load nothing else, score the two together).

        Fitting, torch's CPU random-number state is restored now, before the Trainer creates
        the epoch's data iterator: in the uninterrupted run, that iterator (its worker seed,
        a shuffling sampler's permutation) drew from the generator *after* the checkpoint
        was saved, so the resumed run draws the same data order and dropout masks.
        """
        if state_dict:
            hopt = state_dict.get("hopt") if isinstance(state_dict, Mapping) else None
            if not isinstance(hopt, Mapping):
                raise ValueError("The checkpoint's HypergradientCallback state is malformed.")
            stage, module = self._stage
            if module is not None:
                load_hparams(self._hparams(module), hopt.get("hparams"))
            if hopt.get("rng") is not None and stage == "fit":
                torch.set_rng_state(parse_rng_state(hopt["rng"])[0])
            self._loaded = hopt if stage == "fit" else None
