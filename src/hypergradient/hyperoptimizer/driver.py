"""``HyperOptimizer``: gradient-based hyperparameter tuning inside your own training loop.

Shaped like ``torch.optim.Optimizer``: you keep your loop (forward, backward,
``hopt.step(batch)``); every ``inner_steps`` steps the hyper-optimizer draws a validation
batch, asks its method for the hypergradient, writes it to the hyperparameters' ``.grad``
and steps *your* outer ``torch.optim`` optimizer. It is a thin transaction over small
collaborators: :class:`~.model.ModelView` (the model and functional calls),
:class:`~.hparams.HyperParameters` (constraints, domain checks, optimizer-setting links),
:class:`~.window.TrajectoryWindow` (the steps trajectory methods replay),
:class:`~.sampler.BatchSampler` and :class:`~.history.History`. It owns no mathematics:
the methods live in :mod:`hypergradient.methods`.

Example::

    decay = hg.Positive(torch.full((n_features,), 1e-3))     # stays > 0
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    hopt = hg.HyperOptimizer(
        model, {"decay": decay},
        inner_optimizer=inner,
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.05),
        train_loss=lambda m, h, batch: ce(m(batch[0]), batch[1]) + penalty(m, h["decay"]),
        val_loss=lambda m, h, batch: ce(m(batch[0]), batch[1]),
        val_data=(x_val, y_val), val_batch_size=256,
        method=hg.IFT(hg.Neumann(maxiter=20, alpha="auto")), inner_steps=50,
    )
    for batch in loader:
        hopt.zero_grad()
        hopt.train_loss(batch).backward()     # or your own loss with hopt.hparams
        hopt.step(batch)

Notes:

A diverging inner run is never differentiated silently: before each hyper-step the
parameter norms and training losses (from :meth:`train_loss`) of the last steps are
checked (:mod:`~.divergence`); non-finite ones raise
:class:`~hypergradient.NonFiniteHypergradientError` (or skip, ``nonfinite="skip"``);
sustained geometric growth raises a ``HypergradientWarning`` naming the knobs (a lower
inner learning rate, clipping, damping) and, with ``on_divergence="skip"``, skips the
hyper-step (counted in :attr:`skipped`). Trajectory methods replay a window with the inner
optimizer's settings at its start: a setting changed inside it (a learning-rate scheduler
stepped every step) skips that hyper-step with a warning naming it; step schedulers right
after a hyper-step. So does a step of the window taken in another train/eval mode (the
replay runs every step in the hyper-step's). A replay that ends more than 10% (relative)
from the trained parameters (gradient clipping in the loop, another loss) skips its
hyper-step with a warning: its hypergradient is another run's. With param groups of
different learning rates T1T2 differentiates the step each group took (``Problem.lr``, one
rate per trained parameter).

A step that raises (anything, ``KeyboardInterrupt`` included) during a hyper-step is
undone: weights and buffers, both optimizers, hyperparameters, samplers, the method's
state, the window, counters, history, the holdout guard and torch's random-number state
are as before the call. A hyper-step whose outer update leaves a hyperparameter's domain
raises :class:`~hypergradient.constraints.HyperparameterDomainError`.

Trajectory methods replay the window's steps on copies of their batches, from torch's
random-number state before each step (dropout masks as in training): captured by
:meth:`train_loss`, else at the end of the previous step (at construction or load for
the first), or just before a ``closure``.

A hyper-step runs outside ``torch.autocast`` even when ``step()`` is called inside it (the
AMP loop): its outer gradients, products, solves and holdout score are in the parameters'
precision; the replays of training steps (a trajectory method's window, T1T2's draws
check) run in the autocast state of the step's forward pass, as trained: ``autocast=``
if given, else ``hopt.train_loss``'s, else that of the model's last forward pass (a loop
computing its own loss under autocast and stepping outside it), else the one around
``step()`` (:mod:`~.precision`); float16 steps are replayed in float32 by trajectory
methods (an unscaled float16 replay underflows). A float16 loop with
``torch.amp.GradScaler`` steps by ``scaler.step(hopt, batch)``: the gradients are unscaled,
a step the scaler skips (inf/NaN) is neither taken nor recorded, and the scale never
reaches a hypergradient (:mod:`~.scaling`). A ``torch.compile``'d model
(``fullgraph=True`` included) compiles a few graphs, not one per hyper-step: the
hyper-steps' module hooks keep their keys and do nothing in compiled graphs
(:mod:`~hypergradient.operators.global_hooks`).

Cost per hyper-step, besides the method's: one copy of the trained parameters, the
buffers, both optimizers' states and the method's state (the rollback snapshot);
trajectory methods also keep ``inner_steps`` batch copies and RNG states (a few kB each);
the holdout guard one forward pass on a held-out batch. T1T2 replays the step's draws:
its first hyper-step evaluates ``train_loss`` twice from one random-number state (a loss
drawing from numpy or its own generator gives two values: skipped with a warning). Every
T1T2 hyper-step then compares the step's ``.grad`` with ``train_loss``'s gradient replayed
at the step's start (after a ``hopt.train_loss`` step read off its own backward pass,
no pass; else one backward pass, the forward pass shared with T1T2's; under autocast or a
process group a forward and a backward pass, and one all-reduce: :mod:`~.step_grads`): after a step
whose loss was not ``hopt.train_loss`` and whose replay draws, another direction
(something drew between the steps) skips the hyper-step with a warning (:mod:`~.draws`); a
constant multiple of it applied inside autograd (a scaled loss, summed micro-batches) is
accounted for exactly; another gradient (a clipped step, a term outside ``train_loss``)
warns, or skips with ``on_divergence="skip"`` (:mod:`~.step_grads`). T1T2 differentiates
the step ``torch.optim.SGD`` (momentum, dampening, Nesterov), ``Adam`` or ``AdamW`` took
exactly (:mod:`~.step_rates`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._vocab import ArgumentTypeError, as_callable, as_choice, as_int
from ..constraints import Constraint
from ..methods import Method
from . import checkpoint, optimizers, scaling, step_checks, step_grads, step_tap, stepping
from .build import (
    LossFn,
    check_inner,
    check_method,
    make_guard,
    make_hyperparameters,
    make_sampler,
    make_train_sampler,
)
from .config import check_group, check_nonfinite, write_checked
from .history import History
from .holdout import HoldoutGuard, HoldoutViews
from .hparams import HyperParameters
from .model import ModelView
from .scaling import OptimizerSurface, watch
from .transaction import LoopState, Transaction

__all__ = ["HyperOptimizer"]


class HyperOptimizer(HoldoutViews, OptimizerSurface):
    """Tune hyperparameters by hypergradient descent while the model trains.

    Args:
        model: an ``nn.Module`` (possibly in ``DistributedDataParallel``; losses receive the
            module, reparametrized during hyper-steps, whose buffers are then copies: a
            hyper-step never changes BatchNorm statistics), a tree of parameter tensors, or
            a :class:`~.model.ModelView`.
        hparams: ``{name: tensor or Constraint}`` (a tensor is an
            :class:`~hypergradient.constraints.Unconstrained` floating-point leaf), or a
            :class:`~.hparams.HyperParameters`.
        inner_optimizer: the ``torch.optim`` optimizer training the model (SGD, Adam or AdamW for
            trajectory methods, which replay it); implicit ones add its L2 ``weight_decay``.
        outer_optimizer: a ``torch.optim`` optimizer over ``hopt.raw_hparams()`` or a
            factory ``params -> optimizer``.
        train_loss, val_loss: ``loss(model_or_params, hparams, batch) -> scalar``.
        val_data: a tuple of tensors (sampled by ``val_batch_size`` rows; all when None or
            at least the rows), an iterable of batches (cycled), or a
            :class:`~.sampler.BatchSampler`.
        method: a :mod:`hypergradient.methods` method (default ``IFT()``, with a group seed 0).
        inner_steps: inner steps between hyper-steps.
        train_data, train_batch_size: where hyper-steps draw a training batch when
            ``step()`` got none (implicit methods); same forms as ``val_data``.
        optimizer_hparams: ``{setting: hparams name}`` to tune numeric settings of the
            inner optimizer (``lr``, SGD's ``momentum``, ...; trajectory methods only),
            written into its param groups after each (validated) hyper-step.
        seed: seed of the mini-batch sampling.
        process_group: a ``torch.distributed`` group for data-parallel training: each rank
            passes its shard's batches; hypergradients are those of the averaged objectives;
            the ranks' hyperparameters and configuration are checked to agree.
        nonfinite: ``"raise"`` (default alone) rolls the step back and raises;
            ``"skip"`` (default with ``process_group``) keeps the inner step, skips the
            hyper-step with a warning, on every rank together.
        history_size: records kept in ``hopt.history`` (None: all).
        logger: receives every :class:`~.history.HyperStepRecord`: ``logger(record)``,
            ``logger.log(record)`` (:mod:`hypergradient.integrations` has TensorBoard, CSV
            and progress-bar loggers), or a list of those.
        holdout_data, holdout_batch_size: a held-out split, *not* the validation data, that
            the :class:`~.holdout.HoldoutGuard` scores at every hyper-step (same forms as
            ``val_data``): with many hyperparameters the validation loss is fitted, and the
            holdout loss tells when that stops helping (``record.holdout_loss``).
        holdout_loss: ``loss(model, hparams, batch)`` scored on it (default ``val_loss``).
        keep_best: keep the hyperparameters with the best holdout score
            (:attr:`best_hparams`, :meth:`restore_best`; restored when hyper-steps stop).
        patience: stop the hyper-steps (training goes on) after this many holdout scores
            in a row without an improvement larger than ``min_delta`` (None: never).
        on_divergence: the inner run diverges (:mod:`~.divergence`) or T1T2's step used a
            gradient other than ``train_loss``'s (clipped, :mod:`~.step_grads`): ``"warn"``
            (default) warns and applies it (it may pull back the divergence); ``"skip"``.
        autocast: the steps' autocast dtype (False: none; None: detected, :mod:`~.precision`).

    AMP: hyper-steps compute outside autocast; a float16 loop steps by ``scaler.step(hopt,
    batch)`` (:mod:`~.scaling`). Rollback, replays, autocast, compile, cost: :mod:`~.driver`.
    """

    def __init__(
        self,
        model: nn.Module | ModelView | Any,
        hparams: Mapping[str, Tensor | Constraint] | HyperParameters,
        *,
        inner_optimizer: torch.optim.Optimizer,
        outer_optimizer: torch.optim.Optimizer | Callable[[list[Tensor]], torch.optim.Optimizer],
        train_loss: LossFn,
        val_loss: LossFn,
        val_data: Any,
        method: Method | None = None,
        inner_steps: int = 10,
        train_data: Any = None,
        val_batch_size: int | None = None,
        train_batch_size: int | None = None,
        optimizer_hparams: Mapping[str, str] | None = None,
        seed: int = 0,
        process_group: Any = None,
        nonfinite: str | None = None,
        history_size: int | None = 100,
        logger: Any = None,
        holdout_data: Any = None,
        holdout_batch_size: int | None = None,
        holdout_loss: LossFn | None = None,
        keep_best: bool = True,
        patience: int | None = None,
        min_delta: float = 0.0,
        on_divergence: str = "warn",
        autocast: Any = None,
    ):
        if not isinstance(inner_optimizer, torch.optim.Optimizer):
            raise ArgumentTypeError("`inner_optimizer` must be a torch.optim.Optimizer.")
        self.train_loss_fn = as_callable(train_loss, "train_loss", "(model, hparams, batch)")
        self.val_loss_fn = as_callable(val_loss, "val_loss", "(model, hparams, batch)")
        if val_data is None:
            raise ValueError("`val_data` is required: hyper-steps need validation batches.")
        self.method = check_method(method, optimizer_hparams, process_group)
        self.inner_steps = as_int(inner_steps, "inner_steps", min=1)
        seed = as_int(seed, "seed", min=0)
        check_group(process_group)
        self.nonfinite = check_nonfinite(nonfinite, process_group)
        self.on_divergence = as_choice(on_divergence, "on_divergence", ("warn", "skip"))
        self.process_group = process_group
        self.val_sampler = make_sampler(val_data, val_batch_size, seed, "val_data")
        self.train_sampler = make_train_sampler(train_data, train_batch_size, seed)
        options = {"keep_best": keep_best, "patience": patience, "min_delta": min_delta}
        self.guard: HoldoutGuard | None = make_guard(
            holdout_data, holdout_batch_size, holdout_loss, self.val_loss_fn, seed, **options
        )
        self.inner_optimizer = inner_optimizer
        self.view = model if isinstance(model, ModelView) else ModelView(model, inner_optimizer)
        self.hyperparameters = make_hyperparameters(
            hparams, self.view, inner_optimizer, optimizer_hparams, self.method
        )
        check_inner(inner_optimizer, self.view, self.method, self.hyperparameters.links)
        self.outer_optimizer = optimizers.build_outer(outer_optimizer, self.raw_hparams())
        self.history = History(history_size, logger)
        self.loop = LoopState(rng_next=stepping.capture(self), amp_watch=watch(self, autocast))
        self._pending: Transaction | None = None  # begin_step's snapshot
        self._begun = False
        write_checked(self)
        step_grads.watch(self)  # T1T2 at step 1: who writes .grad

    # ------------------------------------------------------------------ public views
    @property
    def hparams(self) -> dict[str, Tensor]:
        """Current hyperparameter values (constrained), detached: use them in your loss."""
        return self.hyperparameters.values()

    def raw_hparams(self) -> list[Tensor]:
        """The unconstrained leaves the outer optimizer updates."""
        return self.hyperparameters.leaves()

    @property
    def hyper_steps(self) -> int:
        """Hyper-steps applied so far (``len(history)`` is bounded by ``history_size``)."""
        return self.history.total

    @property
    def skipped(self) -> int:
        """Hyper-steps skipped: non-finite values (``nonfinite="skip"``), a diverging inner
        run, changed inner settings, a replay that is not the run (see the class notes)."""
        return self.loop.skipped

    def train_loss(self, batch: Any) -> Tensor:
        """The training loss on ``batch`` with the current hyperparameters (for backward).

        Records torch's random-number state first: the next step's replay uses it, so that
        dropout masks are those of this pass (not of a call under ``torch.no_grad()``).
        """
        state = stepping.before_forward(self)
        loss = step_tap.call(self, batch)  # train_loss_fn, watched for T1T2's check
        stepping.after_forward(self, state, loss)
        self.loop.loss_pending = loss.detach() if isinstance(loss, Tensor) else None
        return loss

    # ------------------------------------------------------------------ stepping
    def step(self, batch: Any = None, closure: Callable[[], Tensor] | None = None) -> Any:
        """One inner step; every ``inner_steps`` steps, also one hyper-step.

        Args:
            batch: the training batch the gradients were computed on. Trajectory methods
                need it at every step (they replay a copy of it); implicit methods use the
                last one at the hyper-step (or a fresh one from ``train_data``).
            closure: passed to ``inner_optimizer.step``.

        Returns:
            What ``inner_optimizer.step`` returns.
        """
        if scaling.scaled_step(self, closure):  # GradScaler.step(hopt) found inf: skipped
            return None
        saved = Transaction(self) if step_checks.checked_step(self, batch, closure) else None
        self._begun, self._pending, self.loop.lrs = False, None, None  # supersedes begin_step
        try:
            result = stepping.inner_step(self, batch, closure)
            if saved is not None:
                stepping.hyper_step(self, batch, saved)
        except BaseException as err:
            if saved is None:
                raise
            stepping.undo(self, err, saved, inner=True)
        stepping.after_step(self)
        return result

    def begin_step(self) -> None:
        """Announce an inner step that someone else takes (a Lightning ``Trainer``, a loop
        whose optimizer must be stepped directly); call it before that step's forward pass.

        Takes torch's random-number state (trajectory methods replay the step from it),
        the step's learning rates (a scheduler stepped before :meth:`end_step`, as
        Lightning's are, does not change them for T1T2), the window's start and the
        rollback snapshot when a hyper-step is due. A new call replaces an unfinished one
        (a step that did not happen, e.g. under gradient accumulation).
        """
        self._begun, self._pending = True, stepping.announce(self)

    def end_step(self, batch: Any = None, loss: Tensor | None = None) -> None:
        """Account for the inner step announced by :meth:`begin_step`, now taken; every
        ``inner_steps`` steps, take a hyper-step (as :meth:`step` does after its own).

        A hyper-step that raises is undone (hyperparameters, outer optimizer, method state,
        samplers, history, guard), its window dropped; the inner step stands. A float16
        step a ``GradScaler`` skipped is not recorded (:mod:`~.scaling`).

        Args:
            batch: the step's training batch (as for :meth:`step`).
            loss: the step's training loss, if known (watched for divergence).

        Raises:
            ValueError: no :meth:`begin_step` before, or no ``batch`` where one is needed.
        """
        if not self._begun:
            raise ValueError("end_step() needs a begin_step() before the inner step.")
        if scaling.skipped_outside(self):  # a GradScaler skipped it: nothing to record
            return
        step_checks.checked_end(self, batch, self._pending is not None)
        saved, self._begun, self._pending = self._pending, False, None
        if isinstance(loss, Tensor):
            self.loop.loss_pending = loss.detach()
        stepping.record_step(self, batch, self.loop.rng_pending)
        if saved is not None:
            try:
                stepping.hyper_step(self, batch, saved)
            except BaseException as err:
                stepping.undo(self, err, saved, inner=False)
        stepping.after_step(self)
        self.loop.lrs = None  # (a raise leaves them to the next begin_step or step)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (the model's weights are saved separately).

        Tensors and plain data only, so ``torch.load(weights_only=True)`` reads it. A
        checkpoint taken mid-window (trajectory methods) holds that window's batches.
        """
        return checkpoint.state_dict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the model's weights must be restored by the caller.

        Everything is validated before anything is assigned: a checkpoint from another
        method, inner optimizer, model or set of hyperparameters (or with the optimizers'
        tensors in another order: torch's state is by position), with a missing entry or
        non-finite hyperparameters raises ``ValueError`` naming the difference and changes
        nothing. The optimizers' states are loaded as copies. A ``DataLoader`` given as
        ``val_data`` restarts a fresh pass (nothing is re-fetched); tensor data resumes
        exactly; one saved without ``train_data`` starts the train sampler afresh (with a
        ``HypergradientWarning``).
        """
        checkpoint.load_state_dict(self, state)
        self._begun, self._pending = False, None

    def __repr__(self) -> str:
        names = list(self.hyperparameters.raw)
        return f"HyperOptimizer(method={self.method!r}, inner_steps={self.inner_steps}, {names})"
