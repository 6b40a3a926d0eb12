"""``torch.amp.GradScaler`` with a hyper-optimizer: ``scaler.step(hopt, batch)``.

The float16 AMP loop scales the loss before ``backward()`` (``scaler.scale(loss)``) so
that small gradients do not underflow, and steps through the scaler, which unscales the
gradients and skips the optimizer's step when one of them is inf/NaN (an overflow at the
current scale, which ``scaler.update()`` then lowers)::

    with torch.autocast("cuda", dtype=torch.float16):
        loss = hopt.train_loss(batch)          # or the loop's own loss
    scaler.scale(loss).backward()
    scaler.unscale_(hopt)                     # optional: to clip, or read the gradients
    scaler.step(hopt, batch)                  # hopt.step(batch), or a skipped step
    scaler.update()

``HyperOptimizer`` follows torch's contract for optimizers that handle the scaling
themselves (``_step_supports_amp_scaling``, as the fused optimizers): ``scaler.step(hopt,
batch)`` calls ``hopt.step(batch)`` at every step with ``hopt.grad_scale`` (the scale, or
None when ``scaler.unscale_(hopt)`` already unscaled) and ``hopt.found_inf`` set, and
:func:`scaled_step` then:

- on a step the scaler skips (``found_inf``): takes no inner step and no hyper-step and
  records nothing: the step counter, the trajectory window, T1T2's step and the divergence
  watch are as before the call (a skipped step is not a step of the run the hyper-step
  differentiates), and the next step takes the hyper-step that was due; under a
  ``process_group``, every rank skips when one rank's scaler does (one all-reduce per
  step; under DDP the ranks' gradients, hence their decisions, are the same anyway);
- else divides the gradients by ``grad_scale`` (the scaler's own kernel, which leaves the
  ``.grad`` version counters alone: it is not the loop's change of the gradient that
  T1T2 checks), then steps as ``hopt.step(batch)`` does.

The hyper-step's own computations are not scaled (they run outside autocast, in the
parameters' precision: :mod:`.precision`), so the loss scale never reaches a
hypergradient: measured, the hypergradients of T1T2, IFT, HOAG and Unrolled are those of
the same loop without loss scaling to 1e-6 and within 6e-4 of the float32 loop's. The
replays of float16 steps do not underflow either: a trajectory method replays them in
float32, T1T2's draws check with the scale of the last ``scaler.step(hopt, ...)``
(:func:`.precision.loss_scale`; 1 before the first, or when every step was unscaled by
``scaler.unscale_(hopt)`` first). ``hopt.param_groups`` is the inner optimizer's (the
scaler unscales and checks its gradients).

``scaler.step(inner_optimizer)`` instead bypasses the hyper-optimizer: that step is not
counted and no hyper-step is taken; followed by ``hopt.step(batch)`` it stepped the
inner optimizer twice on one gradient. ``hopt.step()`` refuses that, before anything
changes, with a ``ValueError`` naming ``scaler.step(hopt, batch)`` (:class:`StepWatch`, a
step pre-hook on the inner optimizer, notes the gradients of a step taken outside
``hopt``). ``scaler.step(inner_optimizer)`` is the right call only with
:meth:`~.driver.HyperOptimizer.begin_step` / ``end_step`` (a step taken outside, as a
Trainer's): ``end_step`` after a float16 step (under float16 autocast) whose gradients are
not finite while the parameters are, a step the scaler skipped, records nothing and takes
no hyper-step either (:func:`skipped_outside`; one host sync per such ``end_step``).
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import distributed
from .._vocab import all_finite
from . import precision, stepping
from .model import trained_tensors

if TYPE_CHECKING:  # pragma: no cover
    from .driver import HyperOptimizer

__all__ = [
    "OptimizerSurface",
    "StepWatch",
    "scaled_step",
    "skipped_by_scaler",
    "skipped_outside",
    "unscale",
    "watch",
]


class OptimizerSurface:
    """The ``torch.optim.Optimizer`` surface of a hyper-optimizer (a mixin of
    :class:`~hypergradient.HyperOptimizer`, which sets ``inner_optimizer``): ``zero_grad``,
    and what ``GradScaler.step(hopt, ...)`` reads: torch's contract for optimizers that
    handle the scaling themselves, the param groups the scaler unscales and checks (the
    inner optimizer's)."""

    inner_optimizer: torch.optim.Optimizer
    _step_supports_amp_scaling = True

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The inner optimizer's param groups (``GradScaler.unscale_(hopt)`` unscales them)."""
        return self.inner_optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients of the model's parameters (as ``inner_optimizer.zero_grad``)."""
        self.inner_optimizer.zero_grad(set_to_none=set_to_none)


class StepWatch:
    """A step pre-hook on the inner optimizer: marks the gradients of a step taken by
    someone else than ``hopt.step()`` (``scaler.step(inner_optimizer)``, a Trainer's step
    announced by ``begin_step``), so that ``hopt.step()`` refuses to step on them again.
    Cost per inner step: one Python call and a look at the first gradient."""

    def __init__(self, params: list[Tensor]):
        self.params, self.own = params, False
        self.mark: tuple[Any, int] | None = None  # (weak reference, version)

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.own:  # hopt.step()'s own inner step
            self.own = False
            return
        g = self.first()
        self.mark = None if g is None else (weakref.ref(g), g._version)

    def first(self) -> Tensor | None:
        return next((p.grad for p in self.params if p.grad is not None), None)

    def stepped(self) -> bool:
        """Whether an outside step used the current gradients: the first one is the same
        tensor, unchanged (a new backward pass or ``zero_grad`` replaces or changes it)."""
        if self.mark is None:
            return False
        g = self.first()
        return g is not None and self.mark[0]() is g and self.mark[1] == g._version


def watch(hopt: HyperOptimizer, autocast: Any) -> precision.AmpWatch:
    """The hyper-optimizer's watches: the model's forward passes' autocast state
    (:func:`.precision.watch`, which checks ``autocast``), and :class:`StepWatch` on the
    inner optimizer (the former's ``steps``; both removed when ``hopt`` is collected)."""
    amp = precision.watch(hopt, autocast)
    steps = StepWatch(hopt.view.params)
    handle = hopt.inner_optimizer.register_step_pre_hook(steps)
    weakref.finalize(hopt, handle.remove)
    amp.steps = steps
    return amp


def scaled_step(hopt: HyperOptimizer, closure: Callable[[], Tensor] | None) -> bool:
    """``hopt.step()``'s first part: refuse gradients an outside step already used
    (``scaler.step(inner_optimizer)`` then ``hopt.step()``); then, under
    ``GradScaler.step(hopt, ...)`` (see the module's notes), True when the scaler found
    inf/NaN gradients and the step is skipped (nothing taken, nothing recorded), False
    otherwise (gradients unscaled, if still scaled). Without a scaler (no
    ``hopt.found_inf``), False.

    Raises:
        ValueError: the inner optimizer already stepped on these gradients, outside
            ``hopt`` (nothing changed).
    """
    steps: StepWatch | None = getattr(hopt.loop.amp_watch, "steps", None)
    if steps is not None and closure is None and steps.stepped():  # (a closure recomputes)
        raise ValueError(
            "The inner optimizer already took a step on these gradients outside "
            "hopt.step() (scaler.step(inner_optimizer)?), and hopt.step() would step on them "
            "again. With a torch.amp.GradScaler call scaler.step(hopt, batch) instead (it "
            "unscales, skips steps with inf/NaN gradients and calls hopt.step(batch)); a step "
            "taken by someone else is announced by hopt.begin_step() before its forward pass "
            "and ended by hopt.end_step(batch). Nothing was changed."
        )
    found = hopt.__dict__.get("found_inf")
    if found is not None:
        if closure is not None:  # (GradScaler refuses closures itself)
            raise ValueError("GradScaler.step(hopt, ...) takes no closure; step with the batch.")
        # every rank skips with any rank's (a rank alone in the hyper-step's collectives hangs)
        if distributed.any_rank(bool(found.item()), hopt.process_group, hopt.view.device):
            skipped_by_scaler(hopt)
            return True
        scale = hopt.__dict__.get("grad_scale")
        if scale is not None:
            unscale(trained_tensors(hopt.inner_optimizer), scale)  # what it steps
            hopt.loop.amp_watch.scale = float(scale)  # (T1T2's draws check replays with it)
    if steps is not None:
        steps.own, steps.mark = True, None
    return False


def skipped_outside(hopt: HyperOptimizer) -> bool:
    """``end_step()``'s part: whether the announced step, taken under float16 autocast, was
    skipped by a ``GradScaler`` (a trained parameter's gradient is inf/NaN while every
    parameter is finite: an optimizer stepping on it would have made one non-finite);
    if so, it is not recorded (:func:`skipped_by_scaler`) and True."""
    peek = precision.step_state(hopt.loop, hopt.view.device, consume=False)
    if not any(dtype is torch.float16 for _, dtype in peek):
        return False
    params = hopt.view.params
    if all_finite([p.grad for p in params]) or not all_finite(params):
        return False
    skipped_by_scaler(hopt)
    return True


def skipped_by_scaler(hopt: HyperOptimizer) -> None:
    """A step the scaler skipped: none of it is recorded (the next step starts afresh from
    the current random-number state, without this step's loss or draws)."""
    if hopt._pending is not None:  # begin_step's snapshot, for a hyper-step not taken
        hopt._pending.commit()  # (the samplers drew nothing since)
    hopt._begun, hopt._pending = False, None  # (a begin_step is superseded, as by step())
    hopt.loop.loss_pending = None
    hopt.loop.scaler_skips += 1
    stepping.after_step(hopt)


def unscale(params: list[Tensor], scale: Tensor) -> None:
    """Divide the parameters' gradients by ``scale`` in place, as ``GradScaler.unscale_``
    does (its kernel, per device and dtype; sparse float16 gradients coalesced first)."""
    inv = scale.double().reciprocal().float()
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for p in params:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            if g.dtype is torch.float16:
                p.grad = g = g.coalesce()
            g = g._values()
        groups[(g.device, g.dtype)].append(g)
    for (device, _), grads in groups.items():
        sink = torch.zeros(1, device=device)  # (the scaler found them finite)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, sink, inv.to(device))
