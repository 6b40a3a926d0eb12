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
"""

from __future__ import annotations

import copy
import functools
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

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
from . import optimizers
from .batches import copy_batch
from .config import check_group, check_ranks
from .hparams import HyperParameters
from .history import History, make_record
from .model import ModelView
from .sampler import BatchSampler
from .window import TrajectoryWindow, capture_rng, restore_rng

__all__ = ["HyperOptimizer"]

LossFn = Callable[[Any, dict[str, Tensor], Any], Tensor]
_KEYS = ("format", "model", "method", "inner_optimizer", "outer_optimizer", "hparams",
         "counters", "val_sampler", "train_sampler", "window", "history")  # fmt: skip


def _sampler(data: Any, batch_size: int | None, seed: int, name: str) -> BatchSampler | None:
    if data is None or isinstance(data, BatchSampler):
        return data
    return BatchSampler(data, batch_size, seed, name)


class HyperOptimizer:
    """Tune hyperparameters by hypergradient descent while the model trains.

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
            method=hg.IFT(hg.Neumann(iters=20, alpha="auto")), inner_steps=50,
        )
        for batch in loader:
            hopt.zero_grad()
            hopt.train_loss(batch).backward()     # or your own loss with hopt.hparams
            hopt.step(batch)

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
        self._train_loss_fn = as_callable(train_loss, "train_loss", "(model, hparams, batch)")
        self._val_loss_fn = as_callable(val_loss, "val_loss", "(model, hparams, batch)")
        if val_data is None:
            raise ValueError("`val_data` is required: hyper-steps need validation batches.")
        self.method = IFT() if method is None else method
        if not isinstance(self.method, Method):
            raise ArgumentTypeError(f"`method` must be a method such as hg.IFT(), got {method!r}.")
        self.inner_steps = as_int(inner_steps, "inner_steps", min=1)
        sizes = [as_optional_int(b, n, min=1) for b, n in
                 ((val_batch_size, "val_batch_size"), (train_batch_size, "train_batch_size"))]  # fmt: skip
        seed = as_int(seed, "seed", min=0)
        self.nonfinite = as_choice(
            nonfinite or ("skip" if process_group is not None else "raise"),
            "nonfinite",
            ("raise", "skip"),
        )
        if process_group is not None:
            check_group(process_group)
        self.process_group = process_group
        self.inner_optimizer = inner_optimizer
        self.view = model if isinstance(model, ModelView) else ModelView(model, inner_optimizer)
        if optimizer_hparams and not self.method.tunes_optimizer:
            raise ValueError(
                f"{type(self.method).__name__} differentiates at the current parameters, where "
                "the optimizer's settings have no effect; tune them with hg.Unrolled(), "
                "hg.ForwardMode() or hg.DrMAD()."
            )
        self._hp = hparams if isinstance(hparams, HyperParameters) else HyperParameters(
            hparams, device=self.view.device, forbidden=self.view.all_parameters(),
            inner_optimizer=inner_optimizer, links=optimizer_hparams,
        )  # fmt: skip
        self.outer_optimizer = optimizers.build_outer(outer_optimizer, self._hp.leaves())
        if self.method.needs_trajectory:
            from_torch(inner_optimizer, self.view.params)  # raises for unsupported ones
        self._val = _sampler(val_data, sizes[0], seed, "val_data")
        self._train = _sampler(train_data, sizes[1], seed + 1, "train_data")
        self.history = History(history_size, logger)
        self._count, self.skipped = 0, 0
        self._window: TrajectoryWindow | None = None
        self._rng_pending: Any = None
        self._rng_next = self._capture()
        self._hp.write_settings(inner_optimizer)
        self._check_ranks()

    # ------------------------------------------------------------------ public views
    @property
    def hparams(self) -> dict[str, Tensor]:
        """Current hyperparameter values (constrained), detached: use them in your loss."""
        return self._hp.values()

    def raw_hparams(self) -> list[Tensor]:
        """The unconstrained leaves the outer optimizer updates."""
        return self._hp.leaves()

    @property
    def hyper_steps(self) -> int:
        """How many hyper-steps were applied (``len(history)`` is bounded by its size)."""
        return self.history.total

    def train_loss(self, batch: Any) -> Tensor:
        """The training loss on ``batch`` with the current hyperparameters (for backward).

        Also records torch's random-number state before the loss (the state the next
        step's replay uses, so that dropout masks match).
        """
        self._rng_pending = self._capture()
        return self._train_loss_fn(self.view.loop_model(), self.hparams, batch)

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
        trajectory = self.method.needs_trajectory
        if batch is None and (trajectory or self._train is None):
            why = (
                "trajectory methods replay the inner steps"
                if trajectory
                else "the hyper-step needs a training batch"
            )
            raise ValueError(f"step() needs the training `batch` (or construct with train_data=...): {why}.")  # fmt: skip
        closing = (self._count + 1) % self.inner_steps == 0
        saved = self._save() if closing else None
        copied = copy_batch(batch) if trajectory else None
        rng = self._rng_pending if self._rng_pending is not None else self._rng_next
        try:
            if trajectory and self._window is None:
                self._window = TrajectoryWindow.start(self.view, self.inner_optimizer)
            if closure is not None:
                rng = self._capture()
            result = self.inner_optimizer.step(closure) if closure else self.inner_optimizer.step()
            if self._window is not None:
                self._window.record(copied, rng)
            self._count += 1
            if saved is not None:
                self._hyper_step(batch, saved)
        except BaseException as err:
            if saved is None:
                raise
            self._fail(err, saved)
        self._rng_pending, self._rng_next = None, self._capture()
        return result

    def _hyper_step(self, batch: Any, saved: dict[str, Any]) -> None:
        started = time.perf_counter()
        train_batch = batch if batch is not None else self._train.next()  # type: ignore[union-attr]
        val_batch = self._val.next()
        self._check_ranks()
        view, hp = self.view, self._hp
        f = view.functional(self._train_loss_fn, hp.transform)
        g = view.functional(self._val_loss_fn, hp.transform)
        params = view.detached()
        trajectory = None
        if self._window is not None:
            trajectory = self._window.to_trajectory(view, f, hp.setting_fns(), params)
        problem = Problem(
            inner_loss=functools.partial(f, batch=train_batch),
            outer_loss=functools.partial(g, batch=val_batch),
            params=params,
            hparams=hp.detached_raw(),
            lr=float(self.inner_optimizer.param_groups[0]["lr"]),
            prev_params=view.tree(saved["model"][0]),
            trajectory=trajectory,
            process_group=self.process_group,
        )
        hyper, info = self.method(problem)
        hp.apply(hyper, self.outer_optimizer)
        hp.write_settings(self.inner_optimizer)
        self._window = None
        record = make_record(step=self._count, hyper_step=self.history.total + 1,
                             seconds=time.perf_counter() - started, method=repr(self.method),
                             info=info, values=hp.values(), hypergrad=hyper)  # fmt: skip
        self.history.append(record)
        for sampler in (self._val, self._train):
            if sampler is not None:
                sampler.commit()

    # ------------------------------------------------------------------ transactions
    def _capture(self) -> Any:
        return capture_rng(self.view.device) if self.method.needs_trajectory else None

    def _save(self) -> dict[str, Any]:
        """Everything a failed hyper-step must restore (inner part, then hyper part)."""
        for sampler in (self._val, self._train):
            if sampler is not None:
                sampler.mark()
        window = self._window
        return {
            "model": self.view.snapshot(),
            "inner": copy.deepcopy(self.inner_optimizer.state_dict()),
            "count": self._count,
            "window": (window, 0 if window is None else len(window)),
            "rng": (capture_rng(self.view.device), self._rng_pending, self._rng_next),
            "hparams": self._hp.snapshot(),
            "outer": copy.deepcopy(self.outer_optimizer.state_dict()),
            "method": copy.deepcopy(self.method.state_dict()),
            "history": self.history.snapshot(),
        }

    def _fail(self, err: BaseException, saved: dict[str, Any]) -> None:
        """Undo the hyper-step (and, unless it is skipped, the inner step); re-raise."""
        skip = isinstance(err, NonFiniteHypergradientError) and self.nonfinite == "skip"
        for sampler in (self._val, self._train):
            if sampler is not None:
                sampler.rollback()
        self._hp.restore(saved["hparams"])
        self.outer_optimizer.load_state_dict(saved["outer"])
        self.method.load_state_dict(saved["method"])
        self.history.restore(saved["history"])
        if skip:
            # Every rank sees the same (averaged) non-finite values, so every rank skips
            # this hyper-step together and the hyperparameters stay identical.
            self._window = None
            self.skipped += 1
            self._hp.write_settings(self.inner_optimizer)
            warnings.warn(f"Hyper-step at step {self._count} skipped: {err}", HypergradientWarning, stacklevel=3)  # fmt: skip
            return
        self.view.restore(saved["model"])
        self.inner_optimizer.load_state_dict(saved["inner"])
        self._count = saved["count"]
        self._window = saved["window"][0]
        if self._window is not None:
            del (
                self._window.batches[saved["window"][1] :],
                self._window.rng_states[saved["window"][1] :],
            )
        rng, self._rng_pending, self._rng_next = saved["rng"]
        restore_rng(rng, self.view.device)
        raise err

    def _check_ranks(self) -> None:
        if self.process_group is None:
            return
        groups = [
            {k: v for k, v in g.items() if k != "params"} for g in self.inner_optimizer.param_groups
        ]
        config = {"inner_steps": self.inner_steps, "step": self._count,
                  "inner_optimizer": type(self.inner_optimizer).__name__, "settings": groups,
                  "method": type(self.method).__name__, "method_config": self.method.config(),
                  "nonfinite": self.nonfinite}  # fmt: skip
        check_ranks(self.process_group, self._hp.leaves(), config)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (the model's weights are saved separately).

        Tensors and plain data only, so ``torch.load(weights_only=True)`` reads it. A
        checkpoint taken mid-window (trajectory methods) holds that window's batches.
        """
        return {
            "format": 2,
            "model": self.view.signature(),
            "method": {"type": type(self.method).__name__, "state": self.method.state_dict()},
            "inner_optimizer": optimizers.state(self.inner_optimizer),
            "outer_optimizer": optimizers.state(self.outer_optimizer),
            "hparams": self._hp.state_dict(),
            "counters": {"count": self._count, "skipped": self.skipped},
            "val_sampler": self._val.state_dict(),
            "train_sampler": None if self._train is None else self._train.state_dict(),
            "window": None if self._window is None else self._window.state_dict(),
            "history": self.history.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the model's weights must be restored by the caller.

        Everything is validated before anything is assigned: a checkpoint from another
        method, inner optimizer, model or set of hyperparameters, with a missing entry or
        non-finite hyperparameters raises ``ValueError`` naming the difference, and changes
        nothing. A ``DataLoader`` given as ``val_data`` restarts a fresh pass (nothing is
        re-fetched); tensor data resumes exactly.
        """
        window, history = self._validate(state)
        saved_method = copy.deepcopy(self.method.state_dict())
        try:
            self.method.load_state_dict(state["method"]["state"])
        except Exception as err:
            self.method.load_state_dict(saved_method)
            raise ValueError(f"The checkpoint's method state does not load: {err}") from err
        self._hp.load_state_dict(state["hparams"])
        self.inner_optimizer.load_state_dict(state["inner_optimizer"]["state_dict"])
        self.outer_optimizer.load_state_dict(state["outer_optimizer"]["state_dict"])
        self._val.load_state_dict(state["val_sampler"])
        if self._train is not None and state["train_sampler"] is not None:
            self._train.load_state_dict(state["train_sampler"])
        if window is not None:  # the twin with the settings just loaded (those at its start)
            window.optimizer = from_torch(self.inner_optimizer, self.view.params)[0]
        self._count = int(state["counters"]["count"])
        self.skipped = int(state["counters"]["skipped"])
        self._window = window
        self.history.restore(history)
        self._rng_pending, self._rng_next = None, self._capture()
        self._hp.write_settings(self.inner_optimizer)

    def _validate(self, state: Any) -> tuple[TrajectoryWindow | None, Any]:
        """Check every entry of a checkpoint; returns the parsed window and history."""
        if not isinstance(state, Mapping):
            raise ArgumentTypeError(
                f"`state` must be a dict from state_dict(), got {type(state).__name__}."
            )
        missing = [k for k in _KEYS if k not in state]
        if missing:
            raise ValueError(f"The checkpoint lacks {missing}; it is not from this version's HyperOptimizer.state_dict().")  # fmt: skip
        if state["method"].get("type") != type(self.method).__name__:
            raise ValueError(f"The checkpoint was saved with the method {state['method'].get('type')}, this hyper-optimizer uses {type(self.method).__name__}.")  # fmt: skip
        self.view.check_signature(state["model"])
        self._hp.check_state(state["hparams"])
        optimizers.check_state(self.inner_optimizer, state["inner_optimizer"], "inner_optimizer")
        optimizers.check_state(self.outer_optimizer, state["outer_optimizer"], "outer_optimizer")
        self._val.check_state(state["val_sampler"])
        if self._train is not None and state["train_sampler"] is not None:
            self._train.check_state(state["train_sampler"])
        counters = state["counters"]
        count = as_int(counters.get("count"), "count", min=0)
        as_int(counters.get("skipped"), "skipped", min=0)
        window = None
        if state["window"] is not None or (
            self.method.needs_trajectory and count % self.inner_steps
        ):
            window = TrajectoryWindow.from_state_dict(
                state["window"], self.view, self.inner_optimizer, count % self.inner_steps
            )
        return window, self.history.parse_state(state["history"])

    def __repr__(self) -> str:
        return (
            f"HyperOptimizer(method={self.method!r}, inner_steps={self.inner_steps}, "
            f"hparams={list(self._hp.raw)})"
        )
