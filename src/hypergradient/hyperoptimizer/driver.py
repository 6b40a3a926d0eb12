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
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from .._vocab import (
    ArgumentTypeError,
    HypergradientWarning,
    NonFiniteHypergradientError,
    as_callable,
    as_choice,
    as_int,
    as_optional_int,
)
from ..constraints import Constraint
from ..methods import IFT, Method, Problem
from ..optim.functional import from_torch
from . import checkpoint, optimizers
from .batches import copy_batch
from .config import check_group, check_ranks
from .history import History, make_record
from .hparams import HyperParameters
from .model import ModelView
from .sampler import BatchSampler
from .transaction import LoopState, Transaction
from .window import TrajectoryWindow, capture_rng

__all__ = ["HyperOptimizer"]

LossFn = Callable[[Any, dict[str, Tensor], Any], Tensor]


def _sampler(data: Any, batch_size: Any, seed: int, name: str) -> BatchSampler:
    if isinstance(data, BatchSampler):
        return data
    return BatchSampler(data, batch_size, seed, name)


def _method(method: Method | None, links: Mapping[str, str] | None) -> Method:
    method = IFT() if method is None else method
    if not isinstance(method, Method):
        raise ArgumentTypeError(f"`method` must be a method such as hg.IFT(), got {method!r}.")
    if links and not method.tunes_optimizer:
        raise ValueError(
            f"{type(method).__name__} differentiates at the current parameters, where the "
            "optimizer's settings have no effect; tune them with hg.Unrolled(), "
            "hg.ForwardMode() or hg.DrMAD()."
        )
    return method


def _hyperparameters(
    hparams: Any, view: ModelView, inner: torch.optim.Optimizer, links: Any
) -> HyperParameters:
    if isinstance(hparams, HyperParameters):
        return hparams
    forbidden = view.all_parameters()
    return HyperParameters(
        hparams, device=view.device, forbidden=forbidden, inner_optimizer=inner, links=links
    )


def _problem(
    hopt: HyperOptimizer, train_batch: Any, val_batch: Any, before: list[Tensor]
) -> Problem:
    """The bilevel problem at a hyper-step (with the recorded window for trajectory methods)."""
    view, hp, window = hopt.view, hopt.hyperparameters, hopt.loop.window
    params = view.detached()
    trajectory = None
    if window is not None:
        step_loss = view.functional(hopt.train_loss_fn, hp.transform)
        trajectory = window.to_trajectory(view, step_loss, hp.setting_fns(), params)
    return Problem(
        inner_loss=view.at_batch(hopt.train_loss_fn, hp.transform, train_batch),
        outer_loss=view.at_batch(hopt.val_loss_fn, hp.transform, val_batch),
        params=params,
        hparams=hp.detached_raw(),
        lr=float(hopt.inner_optimizer.param_groups[0]["lr"]),
        prev_params=view.tree(before),
        trajectory=trajectory,
        process_group=hopt.process_group,
    )


class HyperOptimizer:
    """Tune hyperparameters by hypergradient descent while the model trains.

    Args:
        model: an ``nn.Module`` (possibly in ``DistributedDataParallel``; losses receive the
            module, reparametrized during hyper-steps, whose buffers are then copies: a
            hyper-step never changes BatchNorm statistics), a tree of parameter tensors, or
            a :class:`~.model.ModelView`.
        hparams: ``{name: tensor or Constraint}`` (a tensor is an
            :class:`~hypergradient.constraints.Unconstrained` floating-point leaf), or a
            :class:`~.hparams.HyperParameters`.
        inner_optimizer: the ``torch.optim`` optimizer training the model (SGD or Adam for
            trajectory methods, which replay it differentiably).
        outer_optimizer: a ``torch.optim`` optimizer over ``hopt.raw_hparams()`` or a
            factory ``params -> optimizer``.
        train_loss, val_loss: ``loss(model_or_params, hparams, batch) -> scalar``.
        val_data: a tuple of tensors (sampled by ``val_batch_size`` rows; all when None),
            an iterable of batches (cycled), or a :class:`~.sampler.BatchSampler`.
        method: a :mod:`hypergradient.methods` method (default ``IFT()``).
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
        logger: receives every :class:`~.history.HyperStepRecord`: ``logger(record)`` or
            ``logger.log(record)``.

    A step that raises (anything, ``KeyboardInterrupt`` included) during a hyper-step is
    undone: weights and buffers, both optimizers, hyperparameters, samplers, the method's
    state, the window, counters, history and torch's random-number state are as before the
    call. A hyper-step whose outer update leaves a hyperparameter's domain raises
    :class:`~hypergradient.constraints.HyperparameterDomainError`.

    Trajectory methods replay the window's steps on copies of their batches, from torch's
    random-number state before each step (dropout masks as in training): captured by
    :meth:`train_loss`, else at the end of the previous step (at construction or load for
    the first), or just before a ``closure``.

    Cost per hyper-step, besides the method's: one copy of the trained parameters, the
    buffers, both optimizers' states and the method's state (the rollback snapshot);
    trajectory methods also keep ``inner_steps`` batch copies and RNG states (a few kB each).
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
    ):
        if not isinstance(inner_optimizer, torch.optim.Optimizer):
            raise ArgumentTypeError("`inner_optimizer` must be a torch.optim.Optimizer.")
        self.train_loss_fn = as_callable(train_loss, "train_loss", "(model, hparams, batch)")
        self.val_loss_fn = as_callable(val_loss, "val_loss", "(model, hparams, batch)")
        if val_data is None:
            raise ValueError("`val_data` is required: hyper-steps need validation batches.")
        self.method = _method(method, optimizer_hparams)
        self.inner_steps = as_int(inner_steps, "inner_steps", min=1)
        seed = as_int(seed, "seed", min=0)
        default = "skip" if process_group is not None else "raise"
        nonfinite = default if nonfinite is None else nonfinite
        self.nonfinite = as_choice(nonfinite, "nonfinite", ("raise", "skip"))
        if process_group is not None:
            check_group(process_group)
        self.process_group = process_group
        hint = " Pass a positive number of rows."
        val_size = as_optional_int(val_batch_size, "val_batch_size", min=1, hint=hint)
        train_size = as_optional_int(train_batch_size, "train_batch_size", min=1, hint=hint)
        self.val_sampler = _sampler(val_data, val_size, seed, "val_data")
        self.train_sampler = (
            None if train_data is None else _sampler(train_data, train_size, seed + 1, "train_data")
        )
        self.inner_optimizer = inner_optimizer
        self.view = model if isinstance(model, ModelView) else ModelView(model, inner_optimizer)
        self.hyperparameters = _hyperparameters(
            hparams, self.view, inner_optimizer, optimizer_hparams
        )
        self.outer_optimizer = optimizers.build_outer(outer_optimizer, self.raw_hparams())
        if self.method.needs_trajectory:
            from_torch(inner_optimizer, self.view.params)  # raises for unsupported ones
        self.history = History(history_size, logger)
        self.loop = LoopState(rng_next=self._capture())
        self.hyperparameters.write_settings(inner_optimizer)
        check_ranks(self)

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
        """Hyper-steps skipped because of non-finite values (``nonfinite="skip"``)."""
        return self.loop.skipped

    def train_loss(self, batch: Any) -> Tensor:
        """The training loss on ``batch`` with the current hyperparameters (for backward).

        Records torch's random-number state first: the next step's replay uses it, so
        that dropout masks are those of this forward pass.
        """
        self.loop.rng_pending = self._capture()
        return self.train_loss_fn(self.view.loop_model(), self.hparams, batch)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients of the model's parameters (as ``inner_optimizer.zero_grad``)."""
        self.inner_optimizer.zero_grad(set_to_none=set_to_none)

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
        trajectory, loop = self.method.needs_trajectory, self.loop
        if batch is None and (trajectory or self.train_sampler is None):
            need = "trajectory methods replay the inner steps" if trajectory else "hyper-steps do"
            raise ValueError(f"step() needs the training `batch` ({need}) or train_data=....")
        saved = Transaction(self) if (loop.count + 1) % self.inner_steps == 0 else None
        try:
            result = self._inner_step(batch, closure)
            if saved is not None:
                self._hyper_step(batch, saved)
        except BaseException as err:
            if saved is None:
                raise
            self._undo(err, saved)
        self.loop.rng_pending, self.loop.rng_next = None, self._capture()
        return result

    def _inner_step(self, batch: Any, closure: Callable[[], Tensor] | None) -> Any:
        """The torch optimizer's step, recorded in the window (trajectory methods)."""
        loop = self.loop
        rng = loop.rng_pending if loop.rng_pending is not None else loop.rng_next
        if self.method.needs_trajectory and loop.window is None:
            loop.window = TrajectoryWindow.start(self.view, self.inner_optimizer)
        copied = None if loop.window is None else copy_batch(batch)
        if closure is not None:
            rng = self._capture()  # the closure's forward pass draws from here
        step = self.inner_optimizer.step
        result = step(closure) if closure else step()  # type: ignore[arg-type]
        if loop.window is not None:
            loop.window.record(copied, rng)
        loop.count += 1
        return result

    def _hyper_step(self, batch: Any, saved: Transaction) -> None:
        started = time.perf_counter()
        train_batch = batch if batch is not None else self.train_sampler.next()  # type: ignore[union-attr]
        val_batch = self.val_sampler.next()
        check_ranks(self)
        problem = _problem(self, train_batch, val_batch, saved.params_before)
        result, info = self.method(problem)
        hyper = cast(Mapping[str, Tensor], result)  # the structure of problem.hparams
        hp = self.hyperparameters
        hp.apply(hyper, self.outer_optimizer)
        hp.write_settings(self.inner_optimizer)
        self.loop.window = None
        seconds = time.perf_counter() - started
        self.history.append(
            make_record(
                step=self.loop.count,
                hyper_step=self.history.total + 1,
                seconds=seconds,
                method=repr(self.method),
                info=info,
                values=hp.values(),
                hypergrad=hyper,
            )
        )
        saved.commit()

    def _undo(self, err: BaseException, saved: Transaction) -> None:
        """Undo the hyper-step and, unless it is skipped, the inner step; re-raise."""
        saved.undo_hyper_step()
        if not (isinstance(err, NonFiniteHypergradientError) and self.nonfinite == "skip"):
            saved.undo_inner_step()
            raise err
        # Every rank sees the same (averaged) non-finite values, so every rank skips this
        # hyper-step together and the hyperparameters stay identical.
        self.loop.window = None
        self.loop.skipped += 1
        message = f"Hyper-step at step {self.loop.count} skipped: {err}"
        warnings.warn(message, HypergradientWarning, stacklevel=3)

    def _capture(self) -> Any:
        return capture_rng(self.view.device) if self.method.needs_trajectory else None

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
        method, inner optimizer, model or set of hyperparameters, with a missing entry or
        non-finite hyperparameters raises ``ValueError`` naming the difference and changes
        nothing. A ``DataLoader`` given as ``val_data`` restarts a fresh pass (nothing is
        re-fetched); tensor data resumes exactly.
        """
        checkpoint.load_state_dict(self, state)

    def __repr__(self) -> str:
        names = list(self.hyperparameters.raw)
        return f"HyperOptimizer(method={self.method!r}, inner_steps={self.inner_steps}, {names})"
