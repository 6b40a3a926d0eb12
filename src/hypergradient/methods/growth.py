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
stability, Adam with lr up to 1 and ``beta1 = 0.9``). Forward mode has no adjoint. For
:class:`~hypergradient.optim.SGD` (an update linear in the parameters, buffers and
gradient, with constant coefficients) it reads its own tangents
(:class:`~hypergradient.methods.source_watch.SourceWatch`):
``Z_{t+1} = J_t Z_t + B_t`` with ``Z_0 = 0`` (``J_t = dPhi_t/ds_t``, ``B_t = dPhi_t/dphi``,
one row per hyperparameter) is ``sum_s J_t ... J_{s+1} B_s``, so the largest ratio
``||Z_{t+1}|| / sum_{s <= t} ||B_s||`` (``info.stats["tangent_growth"]``, parameters' rows)
proves that the products of step Jacobians grew about that much along the sources, the
directions the hypergradient is made of, under the same threshold (SGD runs measured:
chaotic, Nesterov at lr 0.2 on a tanh MLP, 1.3e7; diverging, 6.6e6 to 1.2e15; starting to
diverge, 2.8e3 and 4.6e3 at 0.85 and 0.8 of the momentum limit; healthy, at most 17, 6.5 at
0.7 of the limit; the SGD runs the probe below was measured on get the same decisions,
tests/test_forward_source_watch.py). The ratio is a lower bound: it is smaller than the
probe's growth on most runs (2.8e3 against 2.1e4 at 0.85 of the limit; 3 against 4.9 at
the edge of stability).
It does not see a growth along directions that no source reaches (a block of parameters
that no hyperparameter steers and that feeds nothing they steer: the hypergradient does
not depend on it, and Unrolled's adjoint does not see it either when the outer loss does
not read it), nor a growth hidden by sources that cancel along it. Other updates (Adam,
whose gain in the gradient blows up at a start near the optimum: a huge source at step 0
that no ratio of tangents to sources sees), and ``hvp="first_order"``, carry one more
tangent, a probe ``u_{t+1} = dPhi_t/ds_t u_t`` from a fixed random unit ``u_0`` (no
hyperparameter's source, :class:`TangentWatch`), whose largest norm is
``info.stats["tangent_growth"]``, the growth of the same products of step Jacobians, read
forwards, under the same threshold (the chaotic runs above: 2.1e10 and 9.2e10; healthy
runs measured: at most 3.2e4, momentum SGD at 0.75 times its stability limit; it reads
every direction where the adjoint reads those the outer loss sees: Adam with lr 1, 1.7e3
where the adjoint grew 22). ``info.stats["watch"]`` says which (``"sources"``,
``"probe"``).

A run starting to diverge within the window is a third case: its loss oscillates as it
grows (momentum SGD at 0.85 times its stability limit: losses ``[..., 1.52, 0.99, 1.35,
6.98]`` and 1e31 twenty steps later), which the first rule misses, and the hypergradient,
exact for that run (-5.6e3 where the healthy run's is 2.2), is of no use. The run is
reported when its loss ends at its highest, at least :data:`RISE` times the window's lowest,
while the sensitivity (adjoint or tangent growth) grew at least :data:`RISE_SENSITIVITY`-fold
(that run: 1.2e3, 2.1e4 for the probe and 2.8e3 for the sources; at 0.7 times the limit,
31, 24 and 6.5 with a falling loss). Both are
needed: a minibatch loss may end its window ten times its lowest by chance, and a run in a
transient unstable phase (a catapult that recovers) has a large sensitivity; minibatch
training of MLPs (dropout, batch norm, SGD with momentum, Adam) measured at most 55. A
window that ends inside a catapult's rise is reported too: its hypergradient is as large.
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
    "TangentWatch",
    "BLOWUP",
    "KEEP",
    "LOSS_GROWTH",
    "RISE",
    "RISE_SENSITIVITY",
    "adaptation_failed",
    "grows",
    "loss_diverging",
    "loss_rising",
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
#: Growth of the reverse pass's adjoint (largest norm over the first), or of forward mode's
#: probe tangent, that proves the run unstable.
ADJOINT_GROWTH = 1e6
#: A window's last loss, its highest, at least this many times its lowest ...
RISE = 10.0
#: ... with the adjoint's or the probe tangent's growth at least this: a run starting to
#: diverge.
RISE_SENSITIVITY = 100.0


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
    """The parameters' adjoint norm at each reverse step, or forward mode's probe tangent's
    at each step (0-dim tensors, read once)."""

    def __init__(self, first: Sequence[Tensor]):
        self.norms = [self._norm(first)]
        self.parts: list[Tensor] = []  # per pushed step: its leaves' norms (growth())
        self.width = len(first)

    @staticmethod
    def _norm(xs: Sequence[Tensor]) -> Tensor:
        if not xs:
            return torch.zeros(())
        device = xs[0].device  # as the divergence watch's norm: no float64 on MPS
        dtype = torch.float32 if device.type == "mps" else torch.float64
        parts = [torch.linalg.vector_norm(x.detach(), dtype=dtype).to(device) for x in xs]
        return torch.linalg.vector_norm(torch.stack(parts))

    def push(self, adjoint: Sequence[Tensor]) -> Any:
        """Record the norm of ``adjoint`` (as many leaves as ``first``) and return it
        unchanged: the leaves' norms in one op, stacked (one tensor kept per step);
        :meth:`growth` takes the norm of each step's at once."""
        if len(adjoint) != self.width or not adjoint:
            self.norms.append(self._norm(adjoint))
            return adjoint
        device = adjoint[0].device  # as _norm
        dtype = torch.float32 if device.type == "mps" else torch.float64
        xs = [x.detach() if x.requires_grad else x for x in adjoint]
        try:  # one op (the same norms: torch loops over linalg.vector_norm on the CPU)
            parts = list(torch._foreach_norm(xs, 2, dtype=dtype))
        except (TypeError, RuntimeError):  # torch without its dtype argument
            parts = [torch.linalg.vector_norm(x, dtype=dtype) for x in xs]
        self.parts.append(parts[0] if len(parts) == 1 else torch.stack(parts))
        return adjoint

    def growth(self) -> float | None:
        """Largest norm after the first over the first (None: a zero or non-finite start,
        or no reverse step)."""
        norms = torch.stack(self.norms)
        if self.parts:  # per step, the norm of its leaves' norms, as _norm takes it
            rows = torch.stack(self.parts).reshape(-1, self.width).to(norms.device)
            norms = torch.cat([norms, torch.linalg.vector_norm(rows, dim=1)])
        if len(norms) < 2:
            return None
        values = norms.tolist()
        if not (values[0] > 0 and all(map(math.isfinite, values))):
            return None
        return max(values[1:]) / values[0]


class TangentWatch:
    """Forward mode's probe: the norm of its parameters' row at each step (0-dim tensors,
    read once), after which the probe's rows (parameters and state) are scaled back to
    norm 1 (no overflow in a long unstable run; the growth is the running product)."""

    def __init__(self) -> None:
        self.norms: list[Tensor] = []

    def push(self, params: Sequence[Tensor], state: Sequence[Tensor]) -> None:
        """Record the norm of ``params`` (the probe's rows) and scale them and ``state``."""
        n = AdjointWatch._norm(params)
        self.norms.append(n)
        scale = torch.where(n > 0, n, torch.ones_like(n))
        with torch.no_grad():
            for x in (*params, *state):
                if x.is_floating_point():
                    x.div_(scale.to(x.dtype))

    def growth(self) -> float | None:
        """The largest norm the unscaled probe reached (it starts at 1); None without a
        step or with a non-finite norm."""
        if not self.norms:
            return None
        values = torch.stack(self.norms).tolist()
        if not all(map(math.isfinite, values)):
            return None
        total, best = 1.0, 0.0
        for v in values:
            total *= v
            best = max(best, total)
        return best


def loss_rising(losses: Sequence[float]) -> str | None:
    """A sentence on how ``losses`` end at their highest, at least :data:`RISE` times their
    lowest, or None (for a lowest value at or below 0: a rise of ``RISE - 1`` times its
    magnitude; a lowest value of exactly 0 has no scale: never)."""
    values = [float(v) for v in losses]
    if len(values) < 2 or not all(map(math.isfinite, values)):
        return None
    low, last = min(values), values[-1]
    if low == 0 or last <= max(values[:-1]) or last - low < (RISE - 1) * abs(low):
        return None
    return f"the loss ended at its highest, {last:.3g}, from {low:.3g} ({_fmt(values[-KEEP:])})"


def report_unstable(info: Any, stats: dict[str, Any], steps: int) -> None:
    """Mark ``info`` as diverged (``stats["unstable"]``) and warn when the adjoint (or forward
    mode's probe tangent) grew :data:`ADJOINT_GROWTH`-fold (``stats["adjoint_growth"]``,
    ``stats["tangent_growth"]``), or :data:`RISE_SENSITIVITY`-fold while the inner losses
    (``info.inner_losses``) ended at their highest, :data:`RISE` times their lowest
    (:func:`loss_rising`), unless the loss's divergence was reported already."""
    forward = "adjoint_growth" not in stats
    growth = stats.get("tangent_growth" if forward else "adjoint_growth")
    if growth is None or not growth >= RISE_SENSITIVITY or info.status == Status.DIVERGED:
        return
    what = "reverse pass's adjoint" if not forward else "forward pass's probe tangent"
    if forward and stats.get("watch") == "sources":
        what = "forward pass's tangents (over the sum of their sources)"
    grew = f"the {what} grew {growth:.3g}-fold over the last {steps} steps"
    if growth >= ADJOINT_GROWTH:
        why = (
            f"{grew} (at least {ADJOINT_GROWTH:g}x): the recursion is unstable (a chaotic "
            "run, or DrMAD's straight line far from the run), so the hypergradient holds at "
            "best for changes of the hyperparameters far too small to use"
        )
    else:
        rising = loss_rising(getattr(info, "inner_losses", ()))
        if rising is None:
            return
        why = (
            f"{rising} (at least {RISE:g}x) while {grew} (at least {RISE_SENSITIVITY:g}x): "
            "the run is starting to diverge (or is in an unstable phase), so the "
            "hypergradient holds at best for changes of the hyperparameters far too small "
            "to use"
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
