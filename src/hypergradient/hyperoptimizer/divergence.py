"""Is the inner run diverging? A cheap watch on the last steps before each hyper-step.

A hypergradient describes how the *trained* weights respond to the hyperparameters; when
the inner optimizer diverges (gradient descent with a step above ``2 / lambda_max`` of the
training loss's Hessian grows the weights by a factor ``|1 - lr * lambda_max|`` per step)
there is nothing trained to differentiate: the hypergradient of that run is not that of the
bilevel problem (it may still point away from hyperparameters that caused the divergence,
e.g. a decay so large that ``lr * decay > 2``, which is why applying it with a warning is
the default and skipping it an option).

:func:`observe` records, at the last :data:`KEEP` inner steps of every window, the norm of
the trained parameters after the step and the training loss of the step (when
``hopt.train_loss`` computed it, or the caller passed it): 0-dim tensors, no device
synchronisation. :func:`diagnose` reads them at the hyper-step (a few synchronisations) and
reports a divergence when

* a recorded norm or loss is not finite; or
* the parameter norm at least doubled at each of the last three steps (sustained
  geometric growth: a healthy run from a zero start grows linearly, momentum at most
  quadratically, ratios 2.9, 1.9, 1.6 at its steps 2-4); or
* the training loss at least tripled at each of the last three steps while the parameter
  norm grew at each of them; or
* the training loss grew at least 1.4x and the parameter norm at least 1.15x at each of
  the last three steps (momentum just past its limit ``2 (1 + beta) / lambda_max``: at
  ``lr lambda_max = 3.9`` with ``beta = 0.9`` the top component grows 1.32x per step and
  the loss 1.73x, below the two rules above; a healthy run's loss does not grow
  geometrically).

The trajectory methods' fourth rule (:mod:`hypergradient.methods.growth`: a window's loss
ending at its highest, ten times its lowest, while the adjoint or probe tangent grew
100-fold: a run starting to diverge, its loss oscillating as it grows) has no equivalent
here, measured: the watch has the losses, parameter norms (and could read gradient norms)
but no sensitivity, and none of those separates that onset from minibatch noise.

* The onset (momentum 0.9 at 0.85 times its limit ``2 (1 + beta) / lambda_max``, a tanh
  MLP 4-8-1, full batch; the window of steps 21-30): the loss ended at its highest, 22x
  its lowest (last four ``[1.52, 0.99, 1.35, 6.98]``), the parameter norm 1.58x its
  lowest (the healthy run at 0.7 times the limit: up to 1.65x, the norm grows while
  training), the gradient norm 12.6x.
* Healthy minibatch training (MLPs 20-64-64-5, batches of 8 and 32, with and without
  BatchNorm and dropout, SGD, momentum, Adam; 300 steps, two seeds: 1920 windows of ten
  steps): the loss ended its window at its highest and at least 10x its lowest in 16
  windows (up to 1.2e6x: a batch fitted to a loss near 0, then a hard one), the gradient
  norm up to 2e7x its lowest; adding "the parameter norm grew 1.05x" still fired on 3,
  "the gradient norm grew 10x" on 8: a warning every few hundred hyper-steps of runs that
  train, where the rule must never fire.

Nor is it needed as much: T1T2 differentiates one step, not the window, so its
hypergradient at the onset is not amplified (in the decay, -0.59 at step 30, within the
healthy run's -0.16 to -0.98); IFT's (CG, 20 iterations) was -12 there, against -0.19
and -2.1 at the run's earlier hyper-steps and -0.23 to -0.44 in the healthy run, with
CG's non-positive-curvature warning (which the healthy run gets too). At the next
hyper-step (step 40) the second rule above reports the run while it is finite (losses
3.6e5 to 3.7e8, at least 3x per step): its hypergradients (T1T2 2.8e9, IFT -2e10) are
applied with the warning, or skipped with ``on_divergence="skip"``.

Cost: one norm over the parameters (``O(P)`` reads, no memory) at :data:`KEEP` steps of
each window.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._norms import host_floats
from ..methods.growth import KEEP, LOSS_GROWTH, grows

__all__ = ["KEEP", "diagnose", "due", "norm", "push", "unstable"]

#: The parameter norm's growth at each of the last steps that proves divergence (``KEEP``,
#: the steps recorded before a hyper-step, and ``LOSS_GROWTH`` are those of
#: :mod:`hypergradient.methods.growth`).
PARAM_GROWTH = 2.0
#: Both growing steadily (the third rule): loss and parameter-norm factors per step.
BOTH_GROWTH = (1.4, 1.15)

KNOB = (
    "Lower the inner optimizer's learning rate (gradient descent needs lr < 2 / "
    "lambda_max of the training loss's Hessian; momentum beta allows up to "
    "2 (1 + beta) / lambda_max), or stabilize the inner run: gradient clipping "
    "(torch.nn.utils.clip_grad_norm_), a larger weight decay (damping), or a warm-up."
)


def due(count: int, inner_steps: int) -> bool:
    """True when the step after ``count`` steps is one of the last :data:`KEEP` of a window."""
    return inner_steps - 1 - count % inner_steps < KEEP


def norm(params: Sequence[Tensor]) -> Tensor:
    """The Euclidean norm of all trained parameters together (a 0-dim tensor on the first
    parameter's device; accumulated in float64, float32 where the device has no float64)."""
    device = params[0].device
    dtype = torch.float32 if device.type == "mps" else torch.float64
    if _catenable(params, device):  # small: one copy, one norm (2x cheaper per step)
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        return torch.linalg.vector_norm(flat, dtype=dtype)
    norms = [torch.linalg.vector_norm(p.detach(), dtype=dtype).to(device) for p in params]
    return torch.linalg.vector_norm(torch.stack(norms))  # detached leaves: no graph


#: :func:`norm` concatenates parameters of at most this many elements in all (a copy of
#: 256 KiB in float32) into one vector; larger ones are reduced leaf by leaf, without a copy.
CAT_MAX = 1 << 16


def _catenable(params: Sequence[Tensor], device: torch.device) -> bool:
    """Whether ``params`` are few enough elements, of one dtype on ``device``, to concatenate."""
    dtype, total = params[0].dtype, 0
    for p in params:
        if p.dtype != dtype or p.device != device:
            return False
        total += p.numel()
    return total <= CAT_MAX


def push(values: tuple[Tensor, ...], value: Tensor) -> tuple[Tensor, ...]:
    """``values`` with ``value`` appended, keeping the last :data:`KEEP`."""
    return (*values, value.detach().reshape(()))[-KEEP:]


def diagnose(norms: Sequence[Tensor], losses: Sequence[Tensor]) -> tuple[bool, str] | None:
    """``(finite, message)`` if the recorded steps show a divergence, else None.

    Args:
        norms: parameter norms after the last steps (oldest first).
        losses: training losses of the last steps (oldest first; may be empty).

    Returns:
        None for a healthy run; else whether every recorded value is finite, and a message
        with the numbers and :data:`KNOB`.
    """
    if not norms and not losses:
        return None
    values = _read([*norms, *losses])  # one synchronisation
    ns, ls = values[: len(norms)], values[len(norms) :]
    finite = all(map(math.isfinite, values))
    norm_up = finite and grows(ns, PARAM_GROWTH)
    loss_up = finite and grows(ls, LOSS_GROWTH) and grows(ns, 1.0)
    both_up = finite and grows(ls, BOTH_GROWTH[0]) and grows(ns, BOTH_GROWTH[1])
    if finite and not (norm_up or loss_up or both_up):
        return None  # the usual case: no message to format
    seen = f"parameter norms {_fmt(ns)}" + (f", training losses {_fmt(ls)}" if ls else "")
    if not finite:
        first = "parameter norm" if not all(map(math.isfinite, ns)) else "training loss"
        return False, (
            f"The inner run diverged: the {first} is not finite over its last steps ({seen}). "
            + KNOB
        )
    return True, (
        f"The inner run is diverging: {_grew(norm_up, loss_up)} at each of its last "
        f"{KEEP - 1} steps ({seen}). {KNOB}"
    )


def unstable(info: Any, hopt: Any, saved: Any, skip: Callable[..., bool]) -> bool:
    """With ``hopt.on_divergence == "skip"``, skip (``skip(hopt, saved, why)``) the hyper-step
    of a trajectory method that found the run unstable (its adjoint grew a millionfold:
    :func:`~hypergradient.methods.growth.report_unstable`, which warned); else False."""
    stats = getattr(info, "stats", {})
    if hopt.on_divergence != "skip" or not stats.get("unstable"):
        return False
    return skip(hopt, saved, f"{stats['diverging']} (on_divergence='skip').")


def _grew(norm_up: bool, loss_up: bool) -> str:
    """Which rule fired, in words."""
    if norm_up:
        return f"the parameter norm grew by at least {PARAM_GROWTH:g}x"
    if loss_up:
        return f"the training loss grew by at least {LOSS_GROWTH:g}x"
    loss, param = BOTH_GROWTH
    return f"the training loss grew by at least {loss:g}x and the parameter norm by {param:g}x"


def _read(recorded: list[Tensor]) -> list[float]:
    """The recorded 0-dim values as float64 numbers, read in one synchronisation: each run
    of consecutive values of one dtype and device is stacked, then converted once (the
    usual case, parameter norms then training losses, costs two stacks and two
    conversions, not a conversion per value); 0-dim values on one device are stacked at
    once (torch promotes them to the widest dtype); on the CPU each is read as it is (the
    same numbers, no stack: :func:`~hypergradient._norms.host_floats`). Exact (a widening
    conversion)."""
    read = host_floats(recorded)
    if read is not None:
        return read
    device = recorded[0].device
    if all(v.dim() == 0 and v.is_floating_point() for v in recorded):
        if all(not v.requires_grad and v.device == device for v in recorded):
            return torch.stack(recorded).tolist()  # stack promotes to the widest dtype
    return _read_runs(recorded, device)


def _read_runs(recorded: list[Tensor], device: torch.device) -> list[float]:
    """:func:`_read` of values of several dtypes or devices: by runs of one of each."""
    runs = list[list[Tensor]]()
    for v in recorded:
        if v.dim() or v.requires_grad:  # push() stores detached 0-dim values already
            v = v.detach().reshape(())
        if runs and runs[-1][0].dtype == v.dtype and runs[-1][0].device == v.device:
            runs[-1].append(v)
        else:
            runs.append([v])
    parts = [torch.stack(r).to(device, torch.float64) for r in runs]
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).tolist()


def _fmt(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.3g}" for x in xs) + "]"
