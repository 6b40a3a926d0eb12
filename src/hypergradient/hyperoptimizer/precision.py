"""Mixed precision in a hyper-step: which of its computations run under ``torch.autocast``.

A training loop with automatic mixed precision runs its forward pass, and often its
``backward()`` and ``hopt.step(batch)`` too, inside ``torch.autocast``. A hyper-step that
inherited that region computed everything in bfloat16/float16: its outer gradients, its
Hessian-vector products and mixed derivatives, its holdout score (T1T2 3.9%, HOAG 1.1%
from the same hyper-step outside the region, with no warning). Autocast is for the
training step's forward pass, which the user chose; the hypergradient's own arithmetic is
not. So a hyper-step runs outside autocast (float32 for a float32 model), except the
replays of training steps, which run in the autocast state the step's forward pass had:

- a trajectory method's replay of the window, which must reproduce the run it
  differentiates (replayed in float32, a bfloat16-trained window ends ~1e-4 relative away
  from the trained weights: a false "not the run" warning, growing with the window);
- the draws check of T1T2 (:mod:`.draws`), which compares the replayed gradient's direction
  with the step's ``.grad`` to 1e-4 (a float32 replay of a bfloat16 step is ~1e-2 away).

float16 steps differ (:func:`replayed`, :func:`loss_scale`): they are trained with a
``GradScaler`` (:mod:`.scaling`), whose loss scale keeps their backward passes from
underflowing, and a replay without it underflows (a probe of Unrolled with a training loss
of 1e-4: replay 3e-4 away, warned, hypergradient 1e-3 to 2e-3 off the float32 loop's;
1e-5: 1.9%). A trajectory method replays them in float32 (float16's 11-bit significand
keeps the float32 replay within a few float16 roundings of the run, 4.3e-4 after 4 steps of
lr 0.5, which the replay check allows, :func:`unreplayed_rounding`; and the hypergradient of
the float32 loop's window); T1T2's draws check replays the step's
backward pass in float16, scaled by the scaler's last scale (its direction is the step's
to rounding; unscaled, every hyper-step of that probe was skipped).

T1T2's hypergradient itself (the mixed product at the step's start, the outer gradient)
is computed in float32: it approximates the same quantity as the bfloat16 product, more
precisely. The implicit methods' products are at the current weights, not replays:
float32 as well.

The step's state is, first, the one given as ``HyperOptimizer(autocast=...)`` (a dtype:
the steps' forward passes ran under ``torch.autocast`` in it; False: they did not); else
that of its ``hopt.train_loss`` call (recorded there); else that of the last forward pass
of the model with gradients enabled since the previous step (:class:`AmpWatch`, a forward
pre-hook on the module: a loop that computes its own loss under autocast and calls
``hopt.step()`` outside the region was guessed "off", and its replays ran in float32: T1T2's
draws check skipped every hyper-step of a model with dropout, a trajectory method warned
that its replay, 2e-4 away, was not the run); else (a tree of tensors, no forward pass
seen) the one around ``step()``/``end_step()``. A trajectory window replays every step in
its last step's state.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .._vocab import ArgumentTypeError

__all__ = [
    "AmpState",
    "AmpWatch",
    "autocast_as",
    "fixed_state",
    "forget",
    "in_state",
    "loss_scale",
    "replayed",
    "state",
    "step_state",
    "unreplayed_rounding",
    "watch",
]

#: The enabled autocast regions: ``((device_type, dtype), ...)``; ``()`` when none.
AmpState = tuple[tuple[str, torch.dtype], ...]


def _kinds(device: torch.device) -> tuple[str, ...]:
    """The device types whose autocast state matters for a model on ``device``."""
    return ("cpu",) if device.type == "cpu" else ("cpu", device.type)


def _enabled(kind: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(kind))
    except (RuntimeError, TypeError):  # a device type without autocast
        return False


def state(device: torch.device) -> AmpState:
    """The autocast regions in effect now, for a model on ``device``."""
    return tuple((k, torch.get_autocast_dtype(k)) for k in _kinds(device) if _enabled(k))


@contextlib.contextmanager
def autocast_as(amp: AmpState | None, device: torch.device) -> Iterator[None]:
    """A region whose autocast state is ``amp`` (None or ``()``: autocast off) for a model
    on ``device``, whatever the state around it."""
    wanted = dict(amp or ())
    with contextlib.ExitStack() as stack:
        for kind in _kinds(device):
            if kind in wanted:
                stack.enter_context(torch.autocast(kind, dtype=wanted[kind]))
            elif _enabled(kind):
                stack.enter_context(torch.autocast(kind, enabled=False))
        yield


def in_state(
    fn: Callable[..., Any], amp: AmpState | None, device: torch.device
) -> Callable[..., Any]:
    """``fn`` evaluated in the autocast state ``amp`` (``fn`` itself when it is off: the
    hyper-step runs outside autocast)."""
    if not amp:
        return fn

    def replay(*args: Any, **kwargs: Any) -> Any:
        with autocast_as(amp, device):
            return fn(*args, **kwargs)

    return replay


def fixed_state(autocast: Any, device: torch.device) -> AmpState | None:
    """``HyperOptimizer(autocast=...)`` checked, as a state: None (detect), False (the steps
    ran without autocast: ``()``), True (``torch.autocast``'s default dtype for the model's
    device) or ``torch.bfloat16`` / ``torch.float16`` (the steps ran under
    ``torch.autocast(device_type, dtype)``, on the model's device type).

    Raises:
        ArgumentTypeError: not one of those types. ValueError: another dtype.
    """
    if autocast is None:
        return None
    if autocast is False:
        return ()
    if autocast is True:
        autocast = torch.get_autocast_dtype(device.type)
    if not isinstance(autocast, torch.dtype):
        raise ArgumentTypeError(
            "`autocast` must be None (detect the training steps' autocast state), False "
            "(they ran without torch.autocast), True or a dtype (torch.bfloat16, "
            f"torch.float16: they ran under torch.autocast in it), got {autocast!r:.80}."
        )
    if autocast not in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"`autocast={autocast}`: torch.autocast runs in torch.bfloat16 or torch.float16; "
            "pass the dtype of the training loop's autocast region (or False: none)."
        )
    return ((device.type, autocast),)


class AmpWatch:
    """The autocast state of the user's forward passes, for a model that is a module: a
    forward pre-hook on it (registered by :meth:`attach`, removed when the hyper-optimizer
    is garbage-collected) notes, at every call with gradients enabled, the autocast state
    in effect (:attr:`seen`, the last one; read and cleared by :func:`step_state` at each
    step). Cost: about 2 us per forward pass of the model (the hook and torch calling it).

    Attributes:
        fixed: the state given as ``HyperOptimizer(autocast=...)`` (:func:`fixed_state`),
            which wins over every guess; None: detect.
        steps: the inner optimizer's :class:`~.scaling.StepWatch` (set by
            :func:`.scaling.watch`), or None.
        scale: the loss scale of the last step taken by ``GradScaler.step(hopt, ...)``
            with the scale (None: no such step yet).
    """

    def __init__(self, device: torch.device, fixed: AmpState | None = None):
        self.kinds, self.fixed = _kinds(device), fixed  # (device.type costs 0.6 us a read)
        self.seen: AmpState | None = None
        self.steps: Any = None
        self.scale: float | None = None

    def __call__(self, module: Any, args: Any) -> None:
        if torch.is_grad_enabled():  # not a logging or evaluation pass
            self.seen = tuple((k, torch.get_autocast_dtype(k)) for k in self.kinds if _enabled(k))

    def attach(self, owner: Any, module: Any) -> None:
        """Watch ``module`` (if it is one) for as long as ``owner`` lives."""
        if isinstance(module, torch.nn.Module) and self.fixed is None:
            handle = module.register_forward_pre_hook(self)
            weakref.finalize(owner, handle.remove)


def watch(hopt: Any, autocast: Any) -> AmpWatch:
    """``HyperOptimizer(autocast=...)`` checked (:func:`fixed_state`), and the
    :class:`AmpWatch` of the hyper-optimizer's model (attached to it when it is a module
    and ``autocast`` is None)."""
    view = hopt.view
    amp = AmpWatch(view.device, fixed_state(autocast, view.device))
    amp.attach(hopt, view.module)
    return amp


def forget(loop: Any) -> None:
    """A step's end: forget the forward passes seen (the hyper-step's among them)."""
    watch = getattr(loop, "amp_watch", None)
    if watch is not None:
        watch.seen = None


def replayed(amp: AmpState | None) -> AmpState:
    """The autocast state a trajectory method replays a step taken in ``amp`` in: float16
    regions in float32 (see the module's notes), bfloat16 ones as they are."""
    return tuple((k, d) for k, d in amp or () if d is not torch.float16)


def unreplayed_rounding(amp: AmpState | None) -> float:
    """The unit roundoff of the regions of ``amp`` a trajectory method replays in another
    precision (float16's, :func:`replayed`), 0 when none: a float32 replay of float16
    steps ends up to a few of its units from the run (2.5e-4 to 4.3e-4 over 4 steps of lr
    0.5), which the replay check took for another run at every hyper-step."""
    kept = replayed(amp)
    return max((torch.finfo(d).eps for k, d in amp or () if (k, d) not in kept), default=0.0)


def loss_scale(loop: Any) -> float:
    """The loss scale of a replay of the last step's backward pass (T1T2's draws check):
    for a float16 step of a loop stepping by ``GradScaler.step(hopt, ...)``, the scaler's
    last scale seen (an unscaled float16 backward pass underflows where the step's did
    not: a probe with a training loss of 1e-4 skipped every hyper-step); else 1."""
    watch = getattr(loop, "amp_watch", None)
    scale = getattr(watch, "scale", None)
    if scale is None or not any(d is torch.float16 for _, d in loop.step_amp or ()):
        return 1.0
    return float(scale)


def step_state(loop: Any, device: torch.device, consume: bool = True) -> AmpState:
    """The autocast state of the step just taken (see the module's notes): the fixed one
    (``HyperOptimizer(autocast=...)``), else its ``hopt.train_loss`` call's
    (``loop.amp_pending``), else the last forward pass's of the model since the previous
    step (``loop.amp_watch``, forgotten unless ``consume`` is False), else the one around
    ``step()``/``end_step()``."""
    watch: AmpWatch | None = getattr(loop, "amp_watch", None)
    seen = getattr(watch, "seen", None)
    if consume and watch is not None:
        watch.seen = None
    for found in (getattr(watch, "fixed", None), loop.amp_pending, seen):
        if found is not None:
            return found
    return state(device)
