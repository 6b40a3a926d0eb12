"""The hyper-optimizer's loop state, and the snapshot that undoes a failed step.

A step with a hyper-step is a transaction: :class:`Transaction` snapshots everything the
step may change before it starts; if anything raises (``KeyboardInterrupt`` included),
:meth:`Transaction.undo_hyper_step` restores the hyper-step's part (hyperparameters, outer
optimizer, method state, samplers, history, holdout guard) and
:meth:`Transaction.undo_inner_step` the inner step's part (weights and buffers, inner
optimizer, counters, window, torch's random-number state), so the run continues as if the
call had not happened.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .model import trained_tensors
from .precision import AmpState
from .window import TrajectoryWindow, capture_rng, restore_rng

if TYPE_CHECKING:  # pragma: no cover
    from .driver import HyperOptimizer

__all__ = ["LoopState", "Transaction", "clone_state", "restore_optimizer"]

_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes)
_PLAIN = frozenset(_IMMUTABLE)  # exactly these types (subclasses take isinstance)


def clone_state(state: Any) -> Any:
    """A copy of a state dict sharing no tensor with it: ``copy.deepcopy``'s result for
    containers (dict, list, tuple), tensors and plain values, without its memo bookkeeping
    (a tenth of its time on an optimizer's state); any other object is deep-copied."""
    kind = type(state)
    if kind in _PLAIN:  # most settings: one set lookup
        return state
    if isinstance(state, Tensor):
        return state.detach().clone()
    if isinstance(state, _IMMUTABLE):
        return state
    if kind is dict:
        return {k: v if type(v) in _PLAIN else clone_state(v) for k, v in state.items()}
    if kind is list:
        return [clone_state(v) for v in state]
    if kind is tuple:
        return tuple(clone_state(v) for v in state)
    return copy.deepcopy(state)


def restore_optimizer(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> None:
    """Put back ``saved`` (a :func:`clone_state` of ``optimizer.state_dict()`` taken by this
    transaction) in place: the param-group dicts, their tensor settings and the state mapping
    stay the objects the caller may hold (``group = opt.param_groups[0]`` for a hand-written
    schedule, a tensor ``lr`` it fills), which ``load_state_dict`` would replace."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for group, settings in zip(optimizer.param_groups, saved["param_groups"]):
        old = dict(group)
        group.clear()
        for key, value in settings.items():
            now = old.get(key)
            if isinstance(now, Tensor) and isinstance(value, Tensor) and now.shape == value.shape:
                with torch.no_grad():  # a tensor setting (lr=torch.tensor(...)) stays itself
                    value = now.copy_(value)
            group[key] = value
        group["params"] = old["params"]
    optimizer.state.clear()
    for key, state in saved["state"].items():
        # a parameter's index, or a key of the optimizer's own (kept as torch does)
        held = isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(params)
        optimizer.state[params[key] if held else key] = state


@dataclass
class LoopState:
    """Counters and recordings of the training loop.

    Attributes:
        count: inner steps taken.
        skipped: hyper-steps skipped (``nonfinite="skip"``).
        window: the steps since the last hyper-step (trajectory methods), or None.
        rng_pending: torch's random-number state captured by ``hopt.train_loss``, for the
            next step.
        rng_next: the state at the end of the last step (used when ``train_loss`` was not).
        step_rng: the state the last step drew from (T1T2 differentiates that step with its
            dropout masks).
        step_rng_guessed: ``step_rng`` is ``rng_next``, the guess for a loop that computes
            its own loss (:mod:`.draws` checks T1T2's replay against the step's ``.grad``).
        replayable: ``train_loss`` gave one value twice from one random-number state (T1T2
            can replay it: :func:`.draws.foreign_draws`, checked once).
        norms, losses: parameter norms and training losses of the last steps before a
            hyper-step (:mod:`.divergence`).
        loss_pending: the training loss computed by ``hopt.train_loss`` for the next step.
        drawn: the step's gradient was accumulated over several ``hopt.train_loss`` calls
            whose forward passes drew random numbers (dropout: T1T2 cannot replay the step).
        forward_drew: whether a ``hopt.train_loss`` forward pass of this step drew (None:
            no call yet).
        provenance: who wrote the step's ``.grad`` (:func:`.step_grads.provenance`, read
            by ``step()`` just before the optimizer's step; None: not read, as for a closure
            or a step taken outside).
        grad_scale: the factor ``c`` of a step on ``c`` times ``train_loss``'s gradient
            (:mod:`.draws`), by which T1T2's rates are multiplied at this hyper-step.
        lrs: the param groups' learning rates when ``begin_step`` announced the step (the
            ones that step uses: a scheduler stepped before ``end_step``, as Lightning's
            are, has moved them on); None for a step taken by ``step()``.
        amp_pending: the autocast state of ``hopt.train_loss``'s forward pass, for the
            next step; step_amp: the last step's (its replays run in it: :mod:`.precision`);
            amp_watch: the :class:`~.precision.AmpWatch` of the model's forward passes.
        scaler_skips: steps a ``GradScaler`` skipped (inf/NaN gradients; not counted in
            ``count``: :mod:`.scaling`).
    """

    count: int = 0
    skipped: int = 0
    window: TrajectoryWindow | None = None
    rng_pending: Any = None
    rng_next: Any = None
    step_rng: Any = None
    step_rng_guessed: bool = False
    replayable: bool = False
    norms: tuple[Tensor, ...] = ()
    losses: tuple[Tensor, ...] = ()
    loss_pending: Tensor | None = None
    lrs: tuple[float, ...] | None = None
    drawn: bool = False
    forward_drew: bool | None = None
    amp_pending: AmpState | None = None
    step_amp: AmpState | None = None
    amp_watch: Any = None
    scaler_skips: int = 0
    provenance: str | None = None
    grad_scale: float = 1.0


class Transaction:
    """A snapshot of a hyper-optimizer before a step that takes a hyper-step.

    Costs one copy of the trained parameters (and of any other tensor the inner optimizer
    steps), the buffers, both optimizers' states, the raw hyperparameters and the method's
    state; the window, the history and the guard's
    best values are kept by reference (a step only appends to them or replaces them).
    """

    def __init__(self, hopt: HyperOptimizer):
        hopt.view.check_trained(hopt.inner_optimizer)  # the snapshot covers those
        self.hopt = hopt
        guard = hopt.guard
        holdout = None if guard is None else guard.sampler
        samplers = (hopt.val_sampler, hopt.train_sampler, holdout)
        self.samplers = [s for s in samplers if s is not None]
        for sampler in self.samplers:
            sampler.mark()
        loop = hopt.loop
        self.loop = copy.copy(loop)  # shallow, as dataclasses.replace
        self.window_len = 0 if loop.window is None else len(loop.window)
        self.model = hopt.view.snapshot()
        # tensors the inner optimizer steps outside the model (a criterion's learnable
        # temperature): the inner step moves them too
        mine = {id(p) for p in hopt.view.params}
        extra = [p for p in trained_tensors(hopt.inner_optimizer) if id(p) not in mine]
        self.extra = [(p, p.detach().clone()) for p in extra if p.requires_grad]
        self.inner = clone_state(hopt.inner_optimizer.state_dict())
        self.rng = capture_rng(hopt.view.device)
        self.hparams = hopt.hyperparameters.snapshot()
        self.outer = clone_state(hopt.outer_optimizer.state_dict())
        self.method = clone_state(hopt.method.state_dict())
        self.history = hopt.history.snapshot()
        self.guard = None if guard is None else guard.snapshot()
        self.lr: Any = None  # the step's Problem.lr, once computed (stepping.step_lr)

    @property
    def params_before(self) -> list[Any]:
        """The trained parameters before the step (copies)."""
        return self.model[0]

    def commit(self) -> None:
        """The step succeeded: the samplers' draws stand."""
        for sampler in self.samplers:
            sampler.commit()

    def undo_hyper_step(self, keep_draws: bool = False) -> None:
        """Restore hyperparameters, outer optimizer, method state, samplers, history, guard;
        ``keep_draws``: the samplers' draws stand (a skipped hyper-step: drawn again, a
        validation batch holding a NaN made every later hyper-step skip)."""
        hopt = self.hopt
        for sampler in self.samplers:
            sampler.commit() if keep_draws else sampler.rollback()
        hopt.hyperparameters.restore(self.hparams)
        restore_optimizer(hopt.outer_optimizer, self.outer)
        hopt.method.load_state_dict(self.method)
        hopt.history.restore(self.history)
        if hopt.guard is not None and self.guard is not None:
            hopt.guard.restore(self.guard)
        hopt.hyperparameters.write_settings(hopt.inner_optimizer)

    def undo_inner_step(self) -> None:
        """Restore weights, buffers, inner optimizer, counters, window and torch's RNG."""
        hopt = self.hopt
        hopt.view.restore(self.model)
        with torch.no_grad():
            for tensor, value in self.extra:
                tensor.copy_(value)
        restore_optimizer(hopt.inner_optimizer, self.inner)
        hopt.loop = self.loop
        window = self.loop.window
        if window is not None:
            del window.batches[self.window_len :], window.rng_states[self.window_len :]
        restore_rng(self.rng, hopt.view.device)
