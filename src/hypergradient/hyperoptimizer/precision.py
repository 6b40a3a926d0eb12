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

T1T2's hypergradient itself (the mixed product at the step's start, the outer gradient)
is computed in float32: it approximates the same quantity as the bfloat16 product, more
precisely. The implicit methods' products are at the current weights, not replays:
float32 as well.

The step's state is that of its ``hopt.train_loss`` call (recorded there), else the one
around ``step()``/``end_step()`` (a loop that computes its own loss under autocast and
steps inside the same region, the usual AMP loop). A trajectory window replays every step
in its last step's state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["AmpState", "autocast_as", "in_state", "state", "step_state"]

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


def step_state(loop: Any, device: torch.device) -> AmpState:
    """The autocast state of the step just taken: its ``hopt.train_loss`` call's
    (``loop.amp_pending``), else the one around ``step()``/``end_step()``."""
    pending = loop.amp_pending
    return pending if pending is not None else state(device)
