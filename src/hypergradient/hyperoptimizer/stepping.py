"""The hyper-optimizer's step machinery: the recorded inner step, the hyper-step, and the
undo of a failed one (the driver's public methods are thin wrappers of these)."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from .. import distributed
from .._vocab import HypergradientWarning, NonFiniteHypergradientError
from ..methods import IFT, T1T2
from ..methods.rng import forked_rng, rng_state, same_state
from ..operators import recompute
from . import buffers, divergence, draws, precision, step_grads
from .batches import copy_batch
from .build import inner_lr, make_problem, step_lr, tuned
from .config import check_ranks
from .history import make_record
from .hparams import link_conflict
from .step_checks import due, warn_backward_hooks
from .transaction import Transaction
from .window import TrajectoryWindow

if TYPE_CHECKING:  # pragma: no cover
    from .driver import HyperOptimizer

__all__ = [
    "announce",
    "capture",
    "diverged",
    "hyper_step",
    "inner_step",
    "record_step",
    "settings_changed",
    "skipped",
    "start_window",
    "undo",
    "watch",
    "zero_rate",
]


def capture(hopt: HyperOptimizer) -> Any:
    """torch's random-number state, when trajectory methods will replay the next step."""
    needed = records_window(hopt) or isinstance(hopt.method, T1T2)  # T1T2: the step's draws
    return rng_state(hopt.view.device) if needed else None  # capture_rng's, one call less


def before_forward(hopt: HyperOptimizer) -> Any:
    """``hopt.train_loss``'s record: the random-number state its forward pass draws from
    (None when no replay needs it); :func:`after_forward` keeps it."""
    return capture(hopt)


def after_forward(hopt: HyperOptimizer, state: Any, loss: Any) -> None:
    """After ``hopt.train_loss``'s forward pass from ``state``: keep ``state`` for the
    step's replay, note whether the pass drew random numbers (dropout), and whether the
    step's gradient is accumulated over several calls of which one drew (``loop.drawn``:
    T1T2 replays one forward pass). Only calls whose loss can carry a gradient count (not
    a logging call under ``torch.no_grad()``, which took the replay's state and made every
    hyper-step of a model with dropout skip), and only their forward passes' own draws
    (a random augmentation of the next micro-batch made a model without dropout skip)."""
    if not (isinstance(loss, Tensor) and loss.requires_grad):
        return
    loop = hopt.loop
    loop.amp_pending = precision.state(hopt.view.device)
    if state is None:
        return
    drew = not same_state(state, capture(hopt))
    if loop.forward_drew is not None:  # an earlier call for this step
        loop.drawn |= loop.forward_drew or drew
    loop.forward_drew = bool(loop.forward_drew) or drew
    loop.rng_pending = state
    step_grads.watch(hopt)  # T1T2: who writes the step's .grad (:mod:`.step_grads`)


def after_step(hopt: HyperOptimizer) -> None:
    """A step's end: the next one starts from the current random-number state."""
    hopt.loop.rng_pending, hopt.loop.rng_next = None, capture(hopt)
    hopt.loop.drawn, hopt.loop.forward_drew = False, None
    hopt.loop.amp_pending = None
    precision.forget(hopt.loop)  # not the hyper-step's own forward passes
    step_grads.rewatch(hopt)


def records_window(hopt: HyperOptimizer) -> bool:
    """Trajectory methods record the inner steps (until the holdout guard stops hyper-steps)."""
    return hopt.method.needs_trajectory and not hopt.stopped


def announce(hopt: HyperOptimizer) -> Transaction | None:
    """``begin_step``'s work: check (inference mode, trained parameters changed: raised
    before any change), record torch's RNG state and the learning rates the announced step
    uses, open the window; returns the rollback snapshot when a hyper-step is due."""
    pending = Transaction(hopt) if due(hopt) else None
    hopt.loop.rng_pending = capture(hopt)
    hopt.loop.lrs = tuple(float(g["lr"]) for g in hopt.inner_optimizer.param_groups)
    start_window(hopt)
    return pending


def start_window(hopt: HyperOptimizer) -> None:
    """Open a window at the current weights and optimizer state, if one is needed; before
    each later step of the window, note a change of the optimizer's settings."""
    if not records_window(hopt):
        return
    if hopt.loop.window is None:
        window = TrajectoryWindow.start(hopt.view, hopt.inner_optimizer, tuned(hopt))
        window.changed = link_conflict(hopt.hyperparameters, hopt.inner_optimizer)
        window.modes0 = hopt.view.modes()
        hopt.loop.window = window
    else:
        hopt.loop.window.check_settings(hopt.inner_optimizer, hopt.view.params, hopt.view.modes())


def record_step(hopt: HyperOptimizer, batch: Any, rng: Any) -> None:
    """Account for one inner step taken on ``batch`` from the RNG state ``rng``."""
    loop = hopt.loop
    loop.step_rng, loop.step_rng_guessed = rng, False
    loop.step_amp = precision.step_state(hopt.loop, hopt.view.device)
    if loop.window is not None:
        loop.window.record(copy_batch(batch), rng, hopt.view.params)
    watch(hopt)
    loop.count += 1


def watch(hopt: HyperOptimizer) -> None:
    """Record the parameter norm and training loss of a step near the next hyper-step."""
    loop = hopt.loop
    if divergence.due(loop.count, hopt.inner_steps):
        loop.norms = divergence.push(loop.norms, divergence.norm(hopt.view.params))
        if loop.loss_pending is not None:
            loop.losses = divergence.push(loop.losses, loop.loss_pending)
    loop.loss_pending = None
    hopt.view.buffer_watch.note()


def diverged(hopt: HyperOptimizer, saved: Transaction) -> bool:
    """Check the inner run before a hyper-step (:mod:`.divergence`): non-finite values raise
    :class:`NonFiniteHypergradientError` (undone as any hyper-step error); finite growth
    warns with a :class:`HypergradientWarning`, and with ``on_divergence="skip"`` skips the
    hyper-step (returns True)."""
    # Under a process group only the parameters (equal on every rank) are read: the ranks'
    # shard losses differ, and every rank must take the same decision.
    losses = hopt.loop.losses if hopt.process_group is None else ()
    found = divergence.diagnose(hopt.loop.norms, losses)
    if found is None:
        return False
    finite, message = found
    if not finite:
        raise NonFiniteHypergradientError(message)
    skip = hopt.on_divergence == "skip"
    then = (
        "This hyper-step is skipped (on_divergence='skip')."
        if skip
        else "Its hypergradient is applied (on_divergence='warn'; 'skip' skips it)."
    )
    warnings.warn(f"Step {hopt.loop.count}: {message} {then}", HypergradientWarning, stacklevel=4)
    if skip:
        skipped(hopt)
        saved.commit()
    return skip


def skipped(hopt: HyperOptimizer) -> None:
    """Count a skipped hyper-step; its window is dropped (the next one starts afresh)."""
    hopt.loop.window = None
    hopt.loop.skipped += 1


def skip(hopt: HyperOptimizer, saved: Transaction, why: str) -> bool:
    """Skip the due hyper-step with a warning (``why``, after "hyper-step skipped: ");
    True, for the checks of :func:`_hyper_step` to return."""
    warnings.warn(
        f"Step {hopt.loop.count}: hyper-step skipped: {why}", HypergradientWarning, stacklevel=5
    )
    skipped(hopt)
    saved.commit()
    return True


def inner_step(hopt: HyperOptimizer, batch: Any, closure: Callable[[], Tensor] | None) -> Any:
    """The torch optimizer's step, recorded in the window (trajectory methods)."""
    loop = hopt.loop
    rng = loop.rng_pending if loop.rng_pending is not None else loop.rng_next
    start_window(hopt)
    copied = None if loop.window is None else copy_batch(batch)
    if closure is not None:
        rng = capture(hopt)  # the closure's forward pass draws from here
    step, loop.provenance = hopt.inner_optimizer.step, None
    if closure is None and step_grads.closing(hopt):
        loop.provenance = step_grads.provenance(hopt)
    result = step(closure) if closure else step()  # type: ignore[arg-type]
    loop.step_rng, loop.step_amp = rng, precision.step_state(hopt.loop, hopt.view.device)
    loop.step_rng_guessed = closure is None and loop.rng_pending is None
    if loop.window is not None:
        loop.window.record(copied, rng, hopt.view.params)
    watch(hopt)
    loop.count += 1
    return result


def hyper_step(hopt: HyperOptimizer, batch: Any, saved: Transaction) -> None:
    """Check the inner run, score the holdout, ask the method, step the outer optimizer,
    record; commit.

    Under a fork of torch's random-number state (CPU and the model's device): forward
    passes of the hyper-step that draw random numbers (dropout in an implicit method's
    inner loss, an outer loss evaluated in train mode) leave the training stream as it
    was, so training after a hyper-step draws the masks plain training draws. Outside
    ``torch.autocast``, but for the replays of training steps (:mod:`.precision`).
    """
    device = hopt.view.device
    with forked_rng(device), torch.inference_mode(False), precision.autocast_as(None, device):
        _hyper_step(hopt, batch, saved)


def _hyper_step(hopt: HyperOptimizer, batch: Any, saved: Transaction) -> None:
    started = time.perf_counter()
    if hopt.process_group is not None:  # first: every rank takes the skip decisions below
        check_ranks(hopt, local_decisions(hopt, saved))
    if diverged(hopt, saved) or settings_changed(hopt, saved) or zero_rate(hopt, saved):
        return
    if accumulated_draws(hopt, saved) or draws.off_step(hopt, batch, saved, skip):
        return
    sampler = hopt.train_sampler
    train_batch = batch if batch is not None or sampler is None else sampler.next()
    val_batch = hopt.val_sampler.next()
    hp, guard = hopt.hyperparameters, hopt.guard
    holdout = math.nan if guard is None else guard.score(hopt.view, hp, hopt.process_group)
    hopt.view.checkpointed = False
    warn_backward_hooks(hopt)
    with recompute.explained(), buffers.Advice(hopt):  # CheckpointError after train/eval
        problem = make_problem(hopt, train_batch, val_batch, saved.params_before, saved)
        result, info = hopt.method(problem)
    recompute.check(hopt.view.checkpointed, hopt.method, info)
    hopt.view.buffer_watch.warn(hopt.method, hopt.hyperparameters.leaves())
    if replay_off(hopt, info, saved) or divergence.unstable(info, hopt, saved, skip):
        return
    draws.note_scale(hopt, info)  # T1T2 on a step that used c * grad
    hyper = cast(Mapping[str, Tensor], result)  # the structure of problem.hparams
    values = hp.apply(hyper, hopt.outer_optimizer)  # (the values it checked)
    hp.write_settings(hopt.inner_optimizer)
    hopt.loop.window = None
    if guard is not None:
        stop = guard.update(holdout, hopt.history.total + 1, saved.hparams)
        if stop and guard.state.best_raw is not None:
            guard.restore_best(guard, hp, hopt.inner_optimizer)
            values = hp.values()
    record = make_record(
        step=hopt.loop.count,
        hyper_step=hopt.history.total + 1,
        seconds=time.perf_counter() - started,
        method=repr(hopt.method),
        info=info,
        values=values,
        hypergrad=hyper,
        holdout_loss=holdout,
        holdout_scored=guard is not None,
    )
    hopt.history.append(record)
    saved.commit()


def local_decisions(hopt: HyperOptimizer, before: Any = None) -> dict[str, Any]:
    """What the skip checks before the method decide from this rank's own state (checked
    equal on every rank before any of them acts: a rank skipping alone would leave the
    others waiting in the method's collectives, or feed them DDP's next all-reduce).
    :func:`accumulated_draws` instead skips on every rank when any rank's step drew."""
    found = divergence.diagnose(hopt.loop.norms, ())
    window = hopt.loop.window
    return {
        "diverged": None if found is None else found[0],
        "settings_changed": None if window is None else window.changed,
        "zero_rate": at_zero_rate(hopt, before),
    }


def at_zero_rate(hopt: HyperOptimizer, before: Any = None) -> bool:
    """The step was taken at learning rate 0 and the method needs that rate (``before``:
    the step's transaction, for T1T2's exact rates)."""
    method, optimizer = hopt.method, hopt.inner_optimizer
    ift = isinstance(method, IFT) and method.default and method.alpha is None
    if not (isinstance(method, T1T2) or ift):
        return False
    if type(optimizer) is torch.optim.SGD:  # the Problem's rate (computed once)
        return not step_lr(hopt, before)
    return not inner_lr(optimizer, hopt.view.params, method, hopt.loop.lrs)  # Adam: lr 0 only


def zero_rate(hopt: HyperOptimizer, saved: Transaction) -> bool:
    """Skip (with a warning) the hyper-step of a step taken at learning rate 0 (a linear
    warm-up's first step, a decay's last) when the method needs that rate: T1T2
    differentiates that step, IFT's default Neumann series steps with it."""
    if not at_zero_rate(hopt, saved):
        return False
    method = hopt.method
    return skip(
        hopt,
        saved,
        "the inner step was taken at learning rate 0 (a warm-up's first step, a schedule's "
        "end; for T1T2 also SGD's dampening=1 after the first step, which steps with the "
        f"momentum buffer alone), which {type(method).__name__} needs positive (T1T2 "
        "differentiates that step; IFT's default Neumann series steps with it). Take "
        "hyper-steps at other steps, or use "
        "hg.IFT(hg.CG()).",
    )


#: A trajectory method's hyper-step is skipped when its replay of the window ends farther
#: than this (relative) from the model's parameters: the replay is not the run that was
#: trained (gradient clipping or another loss in the loop, a changed random stream), so its
#: hypergradient is another run's. Rounding stays far below (float32 ~1e-6; bfloat16
#: autocast ~1e-2 over 64 steps); the method warns from 1e-4 on.
REPLAY_SKIP = 0.1


def replay_off(hopt: HyperOptimizer, info: Any, saved: Transaction) -> bool:
    """Skip (with a warning) the hyper-step of a replay farther than :data:`REPLAY_SKIP`
    from the run (on every rank when one rank's is: the hyperparameters stay identical)."""
    error = getattr(info, "replay_error", None)  # a trajectory method's
    if error is None:
        return False
    off = not error <= REPLAY_SKIP  # NaN included
    if not distributed.any_rank(off, hopt.process_group, hopt.view.device):
        return False
    return skip(
        hopt,
        saved,
        f"the replay of the window ended {error:.3g} (relative) away from the model's "
        f"parameters (on this rank; the bound is {REPLAY_SKIP:g}), so its hypergradient would "
        "be another run's. The loop must train with train_loss alone on the batches passed "
        "to step(), without changing gradients between backward() and step() (gradient "
        "clipping, accumulation into other batches); or use a method that does not replay "
        "(hg.IFT(), hg.T1T2()).",
    )


def accumulated_draws(hopt: HyperOptimizer, saved: Transaction) -> bool:
    """Skip (with a warning) T1T2's hyper-step after a step whose gradient was accumulated
    over several ``train_loss`` calls that drew random numbers (dropout): T1T2 replays one
    forward pass of the step's batch, with one set of masks (the hypergradient of a step
    not taken: 1.39 relative error on a probe)."""
    if not isinstance(hopt.method, T1T2):
        return False
    # any rank's (uneven accumulation): all skip together
    if not distributed.any_rank(hopt.loop.drawn, hopt.process_group, hopt.view.device):
        return False
    return skip(
        hopt,
        saved,
        "the step's gradient was accumulated over several train_loss calls that drew random "
        "numbers (dropout), which T1T2's one replayed forward pass of the step's batch cannot "
        "reproduce. Accumulate without dropout, take one train_loss over the whole batch, or "
        "use hg.IFT().",
    )


def settings_changed(hopt: HyperOptimizer, saved: Transaction) -> bool:
    """Skip (with a warning) the hyper-step of a window inside which the inner optimizer's
    settings changed: its replay, stepped with the settings at the window's start, would
    differentiate steps the optimizer did not take."""
    window = hopt.loop.window
    if window is None or window.changed is None:
        return False
    advice = (
        "."
        if "optimizer_hparams" in window.changed
        else ": take every step of a window in one mode (model.train() again after evaluating)."
        if "model.eval()" in window.changed
        else f", and {type(hopt.method).__name__} replays the window with the settings at its "
        "start. Change them only right after a hyper-step (step a learning-rate scheduler "
        "once every inner_steps steps, after the step that took the hyper-step), or use a "
        "method that does not replay (hg.IFT(), hg.T1T2())."
    )
    return skip(hopt, saved, f"{window.changed}{advice}")


def undo(hopt: HyperOptimizer, err: BaseException, saved: Transaction, inner: bool) -> None:
    """Undo the hyper-step and, unless it is skipped, the inner step (``inner``: it was
    taken by :meth:`HyperOptimizer.step`, not outside); re-raise unless skipped."""
    skip = isinstance(err, NonFiniteHypergradientError) and hopt.nonfinite == "skip"
    saved.undo_hyper_step(keep_draws=skip)  # (skipped: the next one draws the next batches)
    if not skip:
        if inner:
            saved.undo_inner_step()
        else:  # the step stands; its window is dropped with the hyper-step it was for
            hopt.loop.window = None
        raise err
    # Every rank sees the same (averaged) non-finite values, so every rank skips this
    # hyper-step together and the hyperparameters stay identical.
    skipped(hopt)
    message = f"Hyper-step at step {hopt.loop.count} skipped: {err}"
    warnings.warn(message, HypergradientWarning, stacklevel=3)
