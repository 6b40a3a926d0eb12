"""Is a run's loss diverging? The test shared by the trajectory methods, the
hyper-optimizer's watch on the inner run and meta-learning's adaptations.

Overflow is caught by the finiteness checks; this module catches the divergence that stays
finite (float64 reaches 1e300 before it overflows: gradient descent through 20 steps at
``lr = 2.5 / lambda_max`` returned a hypergradient of 1e65, silently). A descent's loss
does not grow for long: a run is reported as diverging when

* its loss grew by at least :data:`LOSS_GROWTH` at each of its last ``KEEP - 1`` steps
  (sustained geometric growth; the hyper-optimizer also asks the parameter norm to grow,
  :mod:`hypergradient.hyperoptimizer.divergence`), or
* its loss ended at least :data:`BLOWUP` times its first value and still grew at each of its
  last ``KEEP - 1`` steps (slower geometric growth, sustained over the run); a loss that
  starts at or below zero (a constant offset, a log-likelihood), when it rose by
  ``BLOWUP - 1`` times its start's magnitude (the first non-zero loss's if it starts at 0),
  or
* (an adaptation, whose loss before and after is known) its loss after the adaptation is at
  least :data:`ADAPT_GROWTH` times its loss before: a descent that ended ten times above its
  start failed, whatever its length (MAML's one-step adaptations included); a loss that
  starts below zero, when it rose by nine times its start's magnitude.

The hypergradient of such a run is exact for the run that was taken, but that run trained
nothing; the methods still return it, with ``info.status == Status.DIVERGED`` and a
:class:`~hypergradient.HypergradientWarning`.

A run whose loss stays bounded can still be unstable (chaotic): the reverse pass's adjoint
``a_t = a_{t+1} dPhi_t/ds_t`` then grows geometrically, and the hypergradient with it, while
it describes only changes far too small to use (Adam with ``beta1 = 0``, lr 0.3, 200 steps
of a tanh MLP: the loss ended below its start, the adjoint grew 3.8e9-fold, the
hypergradient in lr was -2.2e9 while central differences of step 1e-3 and 1e-6 gave 92 and
8.7e4; DrMAD without anchors on SGD at 1.4 times the edge of stability, whose straight
line is far from the run: an adjoint grown 3e28-fold, a hypergradient of 2e27 where
Unrolled's is 4.8). :class:`AdjointWatch` measures the growth (``info.stats["adjoint_growth"]``: the
largest norm of the parameters' adjoint over its norm at ``theta_T``) and
:func:`report_unstable` reports a growth of at least :data:`ADJOINT_GROWTH` as a divergence
(healthy runs measured: at most 51, SGD with and without momentum up to the edge of
stability, Adam with lr up to 1 and ``beta1 = 0.9``).
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._vocab import HypergradientWarning, Status

__all__ = [
    "ADAPT_GROWTH",
    "ADJOINT_GROWTH",
    "AdjointWatch",
    "BLOWUP",
    "KEEP",
    "LOSS_GROWTH",
    "adaptation_failed",
    "grows",
    "loss_diverging",
    "quiet",
    "report_unstable",
    "report_diverging",
]

_LOCAL = threading.local()

#: Steps looked at (three growth ratios).
KEEP = 4
#: Growth of the loss at each of the last steps that proves divergence.
LOSS_GROWTH = 3.0
#: Growth of the loss over the whole run that, still growing at its end, proves divergence.
BLOWUP = 1e6
#: Growth of an adaptation's loss (after over before) that proves it failed.
ADAPT_GROWTH = 10.0
#: Growth of the reverse pass's adjoint (largest norm over the first) that proves the run
#: unstable.
ADJOINT_GROWTH = 1e6


def grows(xs: Sequence[float], factor: float) -> bool:
    """Whether the last :data:`KEEP` values each reach ``factor`` times the one before
    (False with fewer values, or a non-positive first one)."""
    last = list(xs[-KEEP:])
    if len(last) < KEEP or not last[0] > 0:
        return False
    return all(b >= factor * a for a, b in zip(last, last[1:]))


def _fmt(xs: Sequence[float]) -> str:
    return "[" + ", ".join(f"{x:.3g}" for x in xs) + "]"


def loss_diverging(losses: Sequence[float]) -> str | None:
    """A sentence on how ``losses`` (one per step, oldest first) diverge, or None."""
    values = [float(v) for v in losses]
    if len(values) < KEEP or not all(map(math.isfinite, values)):
        return None  # too short to tell; non-finite values are the finiteness checks' job
    last = _fmt(values[-KEEP:])
    if grows(values, LOSS_GROWTH):
        growth = f"at least {LOSS_GROWTH:g}x"
        return f"the loss grew by {growth} at each of the last {KEEP - 1} steps ({last})"
    # the scale of the start: the first loss's magnitude, or the first non-zero one's (a
    # loss may start at or below zero: a negative log-likelihood, a constant offset)
    scale = next((abs(v) for v in values if v != 0), 0.0)
    rise = values[-1] - values[0]
    if scale > 0 and rise >= (BLOWUP - 1) * scale and grows(values, 1.0):
        return (
            f"the loss grew from {values[0]:.3g} to {values[-1]:.3g} (at least {BLOWUP:g}x) and "
            f"still grows ({last})"
        )
    return None


def adaptation_failed(before: float, after: float) -> bool:
    """Whether a descent's loss ended at least :data:`ADAPT_GROWTH` times its start.

    For a loss that may be negative (a Gaussian negative log-likelihood), the same rise in
    its start's magnitude: ``after - before >= (ADAPT_GROWTH - 1) |before|``, which for a
    positive start is ``after >= ADAPT_GROWTH before``. A start at exactly 0 has no scale
    (a margin loss already met, whose dropout draws may differ after): never flagged.
    """
    if not (math.isfinite(before) and math.isfinite(after)) or before == 0:
        return False
    return after - before >= (ADAPT_GROWTH - 1) * abs(before)


def report_diverging(info: Any, losses: Sequence[float], what: str, warn: bool = True) -> None:
    """Mark ``info`` (``status``, ``stats["diverging"]``) when ``losses`` diverge, and warn
    (unless ``warn`` is False: a caller with its own watch, the hyper-optimizer)."""
    why = loss_diverging(losses)
    if why is None:
        return
    info.status = Status.DIVERGED
    info.stats["diverging"] = why
    if warn and not getattr(_LOCAL, "quiet", False):
        warnings.warn(
            f"The {what} diverged: {why}. The hypergradient returned is that of this run, "
            "which trained nothing (info.status is 'diverged'). Lower the learning rate or "
            "the number of steps, or add damping (weight decay).",
            HypergradientWarning,
            stacklevel=5,
        )


class AdjointWatch:
    """The parameters' adjoint norm at each reverse step (0-dim tensors, read once)."""

    def __init__(self, first: Sequence[Tensor]):
        self.norms = [self._norm(first)]

    @staticmethod
    def _norm(xs: Sequence[Tensor]) -> Tensor:
        if not xs:
            return torch.zeros(())
        device = xs[0].device  # as the divergence watch's norm: no float64 on MPS
        dtype = torch.float32 if device.type == "mps" else torch.float64
        parts = [torch.linalg.vector_norm(x.detach(), dtype=dtype).to(device) for x in xs]
        return torch.linalg.vector_norm(torch.stack(parts))

    def push(self, adjoint: Sequence[Tensor]) -> Any:
        """Record the norm of ``adjoint`` and return it unchanged."""
        self.norms.append(self._norm(adjoint))
        return adjoint

    def growth(self) -> float | None:
        """Largest norm after the first over the first (None: a zero or non-finite start,
        or no reverse step)."""
        if len(self.norms) < 2:
            return None
        values = torch.stack(self.norms).tolist()
        if not (values[0] > 0 and all(map(math.isfinite, values))):
            return None
        return max(values[1:]) / values[0]


def report_unstable(info: Any, stats: dict[str, Any], steps: int) -> None:
    """Mark ``info`` as diverged (``stats["unstable"]``) and warn when the adjoint grew
    :data:`ADJOINT_GROWTH`-fold (``stats["adjoint_growth"]``), unless the loss's divergence
    was reported already."""
    adjoint = stats.get("adjoint_growth")
    if adjoint is None or not adjoint >= ADJOINT_GROWTH or info.status == Status.DIVERGED:
        return
    why = (
        f"the reverse pass's adjoint grew {adjoint:.3g}-fold over the last {steps} steps (at "
        f"least {ADJOINT_GROWTH:g}x): the reverse recursion is unstable (a chaotic run, or "
        "DrMAD's straight line far from the run), so the hypergradient holds at best for "
        "changes of the hyperparameters far too small to use"
    )
    info.status = Status.DIVERGED
    info.stats.update(diverging=why, unstable=True)
    if not getattr(_LOCAL, "quiet", False):
        warnings.warn(
            f"The hypergradient is of no use: {why}. Lower the learning rate, differentiate "
            "fewer steps (hg.Unrolled(truncate=K)), or add momentum or damping (weight "
            "decay); with DrMAD, store anchors (anchors=K) or use hg.Unrolled.",
            HypergradientWarning,
            stacklevel=4,
        )


class quiet:  # noqa: N801 (used as a function: ``with quiet():``)
    """A block in which :func:`report_diverging` marks the info but does not warn (this
    thread): a caller that reports the divergence in its own words (meta-learning)."""

    __slots__ = ("outer",)

    def __enter__(self) -> None:
        self.outer = getattr(_LOCAL, "quiet", False)
        _LOCAL.quiet = True

    def __exit__(self, *exc: object) -> None:
        _LOCAL.quiet = self.outer
