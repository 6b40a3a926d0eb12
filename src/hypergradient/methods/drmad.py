"""DrMAD: reverse mode along a piecewise-straight path through the run's stored states.

Fu et al. (2016), "DrMAD: Distilling Reverse-Mode Automatic Differentiation for Optimizing
Hyperparameters of Deep Neural Networks", IJCAI.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .. import _tree
from .._tree import Tree
from .._vocab import HypergradientWarning, as_bool, as_float, as_int
from ..optim.functional import FunctionalOptimizer
from ._checks import check_trees
from .forward_mode import linear_update
from .replay import Run
from .traj_modes import as_mode
from .trajectory import (
    Sweep,
    TrajectoryMethod,
    check_forward,
    forward_sweep,
    functional_problem,
    functional_result,
    reverse_sweep,
)

__all__ = ["DrMAD", "drmad"]

#: Default ``max_deviation``: the path deviation (see :class:`DrMAD`) above which DrMAD
#: warns. Measured on 54 runs of 30 steps (8-feature logistic regression, features scaled
#: by 1, 3 and 10, SGD with lr 0.01-1 and momentum 0-0.9, two seeds) and the README's
#: example (breast cancer, lr 0.1, momentum 0.9, 100 steps: deviation 0.85, cosine 0.98):
#: every run whose DrMAD hypergradient had a cosine below 0.75 with the exact one had a
#: deviation of 1.5 or more (issue 10's case, lr 0.3 and momentum 0.9: 2.05, cosine -0.96);
#: every run below 1.0 had a cosine of 0.80 or more (0.98 or more below 0.7). Four runs
#: above 1.5 were still fine (cosines 0.95-0.98): the warning errs on the side of caution.
#: The deviation at the midpoint alone missed two failures (0.19 and 0.20 with cosines 0.18
#: and -0.03), hence the path length.
MAX_DEVIATION = 1.0

#: Default ``max_state_deviation``: the same measure on the optimizer's state (momentum
#: buffers, Adam's moments), checked when the reverse recursion reads the state (Adam, or
#: tuned optimizer settings: ``forward_mode.linear_update`` is False). Measured on the
#: 8-feature logistic regression, 30 steps, SGD / Nesterov / Adam, lr 0.01-0.3, momentum
#: (beta1) 0.5-0.9, weight decay alone or with lr and momentum tuned
#: (``tests/test_adv_numerics_drmad.py``): every run with a state deviation of 3.0 or less
#: had a cosine of 0.99 or more with the exact hypergradient; runs at 8.3 to 763 had
#: cosines 0.99 down to -0.04 and relative errors 0.3 to 2800 (Adam, lr 0.1, beta1 0.5: a
#: parameter-path deviation of 0.41, no warning before this check).
MAX_STATE_DEVIATION = 5.0

State = tuple[tuple[Tensor, ...], tuple[Tensor, ...]]


def anchor_steps(steps: int, anchors: int) -> list[int]:
    """The ``anchors`` steps (at most ``steps - 1``) evenly spaced inside ``(0, steps)``."""
    k = min(anchors, steps - 1)
    return sorted({round(i * steps / (k + 1)) for i in range(1, k + 1)})


def _norm(x: tuple[Tensor, ...]) -> Tensor:
    wide = _tree.wide_dtype(x[0].device)
    return torch.stack([t.to(wide).pow(2).sum() for t in x]).sum().sqrt()


def _step(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> Tensor:
    return _norm(tuple(x - y for x, y in zip(a, b))) if a else torch.zeros(())


def _add(a: list[Tensor], b: list[Tensor]) -> list[Tensor]:
    return [x + y for x, y in zip(a, b)]


def _worst(ratios: list[Tensor]) -> float:
    if not ratios:
        return 0.0
    return max(float(torch.stack(ratios).nan_to_num(nan=0.0).max()), 0.0)


class _Path:
    """The knots (``s_0``, the anchors, ``s_T``) and how far each segment is from straight.

    Fed every state of the forward sweep (:meth:`visit`); keeps the knots and, for the
    segment being swept, the previous parameters and the path length so far (O(P) beyond
    the knots). A segment's deviation is its path length over its chord, minus one: 0 for a
    straight run, large for one that oscillates or turns back.
    """

    def __init__(self, steps: int, anchors: list[int]):
        self.knots = [0, *anchors, steps]
        self._knot_set = set(self.knots)
        self.states: dict[int, State] = {}
        self._prev: State | None = None
        self._length: list[Tensor] | None = None  # of the parameters' and the state's paths
        self._ratios: tuple[list[Tensor], list[Tensor]] = ([], [])

    def visit(self, t: int, p: tuple[Tensor, ...], s: tuple[Tensor, ...]) -> None:
        if self._prev is not None:
            steps = [_step(a, b) for a, b in zip((p, s), self._prev)]
            self._length = steps if self._length is None else _add(self._length, steps)
        self._prev = (p, s)
        if t in self._knot_set:
            self.states[t] = (p, s)
            if t > 0 and self._length is not None:
                start = self.states[max(k for k in self.knots if k < t)]
                for i, (now, then) in enumerate(zip((p, s), start)):
                    if now:
                        self._ratios[i].append(self._length[i] / _step(now, then) - 1)
            self._length = None

    @property
    def deviation(self) -> float:
        """The largest segment's path length over its chord, minus one (0.0: straight)."""
        return _worst(self._ratios[0])

    @property
    def state_deviation(self) -> float:
        """The same for the optimizer's state (momentum buffers, Adam's moments)."""
        return _worst(self._ratios[1])

    def state_at(self, t: int) -> State:
        """``s_t`` if ``t`` is a knot, else the straight line between the enclosing knots."""
        if t in self.states:
            return self.states[t]
        i = next(j for j, k in enumerate(self.knots) if k > t)
        a, b = self.knots[i - 1], self.knots[i]
        beta = (t - a) / (b - a)
        (pa, sa), (pb, sb) = self.states[a], self.states[b]
        p = tuple((1 - beta) * u + beta * v for u, v in zip(pa, pb))
        s = tuple((1 - beta) * u + beta * v for u, v in zip(sa, sb))
        return p, s


class DrMAD(TrajectoryMethod):
    """DrMAD (Fu et al., 2016): the reverse recursion on straight lines between stored states.

    The reverse recursion of :class:`~hypergradient.Unrolled` is evaluated on the path
    ``s_t ~ (1 - beta) s_a + beta s_b``, ``beta = (t - a) / (b - a)``, between consecutive
    knots ``a < t < b``: the initial state, ``anchors`` states stored at evenly spaced
    steps, and the final state (parameters and optimizer buffers alike). With
    ``anchors=0`` this is the original DrMAD; with ``anchors >= T - 1`` every state is
    stored and the result is exactly :class:`~hypergradient.Unrolled`'s; in between the
    error falls as the anchors get closer.

    Exact without anchors when the reverse recursion does not depend on the states (SGD,
    with or without momentum, fixed settings, on an ``f`` quadratic in ``theta`` whose
    ``d_phi grad_theta f`` is constant) or when the run is a straight line traversed at
    constant speed. A curved or oscillating run (momentum near the edge of stability) can
    make it point the wrong way; the forward sweep measures this for free (one norm per
    step, O(P) memory): the path deviation, the largest over the segments of
    ``sum_t ||theta_{t+1} - theta_t|| / ||theta_b - theta_a|| - 1`` (0 for a straight run),
    is ``info.stats["path_deviation"]``, and above ``max_deviation`` a
    :class:`~hypergradient.HypergradientWarning` names the knob (``anchors=``). The
    deviation sees the path's shape, not its speed: a straight run at varying speed
    (momentum accelerating from rest) keeps the direction but not the size, 1.3-1.5 times
    the exact norm on a 5-20-step momentum-0.9 logistic regression at a deviation near 0,
    with no warning (1.02 with ``anchors=3``). Both deviation bounds were calibrated on
    logistic regressions; on a non-linear network the line's mixed derivatives can differ
    from the run's below them: a 3-step momentum-0.9 CNN with BatchNorm and GroupNorm
    (decays, a noise strength and a label smoothing tuned) had path and state deviations of
    0.30 and 1.4, no warning, and a hypergradient with cosine 0.40 with the exact one
    (``anchors=1``: 0.90). Check against :class:`~hypergradient.Unrolled` at a small size.

    Args:
        anchors: intermediate states to store (``K``; 0 = the original DrMAD).
        hvp: the reverse steps' product mode, as :class:`~hypergradient.Unrolled`'s.
        max_deviation: warn when the path deviation exceeds it (default
            :data:`MAX_DEVIATION`, measured: see its comment); None never warns.
        replay: False takes ``theta_T`` from ``trajectory.final_params`` (the real run's
            end) instead of replaying the run forward: ``T`` gradients cheaper, but no
            anchors, no path deviation, and the optimizer must be stateless (plain SGD).

    Cost as :class:`~hypergradient.Unrolled` without truncation (without the forward
    sweep when ``replay=False``); memory: ``K + 2`` states and the ``T`` batches. No state.
    """

    name = "drmad"

    def __init__(
        self,
        anchors: int = 0,
        hvp: str = "auto",
        max_deviation: float | None = MAX_DEVIATION,
        replay: bool = True,
    ):
        self.anchors = as_int(anchors, "anchors", min=0)
        self.hvp = as_mode(hvp)
        self.max_deviation = (
            None if max_deviation is None else as_float(max_deviation, "max_deviation", min=0.0)
        )
        self.replay = as_bool(replay, "replay")
        if not self.replay and self.anchors:
            raise ValueError(
                "`anchors` are states of the replayed run; with replay=False there are none. "
                "Use replay=True (the default) to store anchors."
            )

    def sweep(self, run: Run, outer_loss: Callable[[Any, Any], Tensor]) -> Sweep:
        T = run.steps
        if not self.replay:
            return self._recorded(run, outer_loss)
        path = _Path(T, anchor_steps(T, self.anchors))
        p_T, s_T, _, losses = forward_sweep(run, lambda t: False, 0, path.visit)
        hyper, value, stats = reverse_sweep(run, outer_loss, p_T, s_T, path.state_at, 0, self.hvp)
        stats.update(products=T, anchors=len(path.knots) - 2, path_deviation=path.deviation)
        stats["state_deviation"] = path.state_deviation
        reads_state = bool(s_T) and not linear_update(run)
        stats["state_deviation"] = path.state_deviation if s_T else None
        self._warn(path, reads_state)
        return Sweep(hyper, p_T, losses, value, T, 0, len(path.knots), stats)

    def _warn(self, path: _Path, reads_state: bool) -> None:
        if self.max_deviation is None:
            return
        limit = MAX_STATE_DEVIATION * max(self.max_deviation, 1e-300) / MAX_DEVIATION
        if reads_state and path.state_deviation > limit and path.deviation <= self.max_deviation:
            warnings.warn(
                "DrMAD's straight line between the optimizer's stored states (momentum "
                "buffers, Adam's moments) is far from the real run: their path deviation is "
                f"{path.state_deviation:.2f} > {limit:g} (that of the parameters "
                f"{path.deviation:.2f}), and this run's reverse recursion reads them (Adam, or "
                "tuned optimizer settings), so the hypergradient may be far off or point the "
                f"wrong way. Store intermediate states with anchors=K (now "
                f"{len(path.knots) - 2}; exact at K = steps - 1), or use hg.Unrolled.",
                HypergradientWarning,
                stacklevel=4,
            )
        if path.deviation <= self.max_deviation:
            return
        warnings.warn(
            f"DrMAD's straight-line path is far from the real run: its path deviation (path "
            f"length over chord, minus one, of the worst segment) is {path.deviation:.2f} > "
            f"max_deviation={self.max_deviation:g}, so the run curves or oscillates "
            "(momentum, large steps) and the hypergradient may point the wrong way. Store "
            f"intermediate states with anchors=K (now {len(path.knots) - 2}; O(K P) memory, "
            "exact at K = steps - 1), or use hg.Unrolled.",
            HypergradientWarning,
            stacklevel=4,
        )

    def _recorded(self, run: Run, outer_loss: Callable[[Any, Any], Tensor]) -> Sweep:
        """The reverse recursion between ``params0`` and the recorded ``final_params``."""
        final = run.final_leaves
        if final is None or run.init_state():
            raise ValueError(
                "DrMAD(replay=False) takes the run's end from `trajectory.final_params` and "
                "needs a stateless optimizer (plain SGD, no momentum); "
                + ("final_params is None." if final is None else "this optimizer has buffers.")
                + " Use replay=True."
            )
        p_T = tuple(x.detach().to(dtype=a.dtype) for x, a in zip(final, run.p0))
        check_forward(run, [], p_T)
        path = _Path(run.steps, [])
        path.visit(0, run.p0, ())
        path.visit(run.steps, p_T, ())
        hyper, value, stats = reverse_sweep(run, outer_loss, p_T, (), path.state_at, 0, self.hvp)
        stats.update(products=run.steps, anchors=0, path_deviation=None)
        return Sweep(hyper, p_T, [], value, run.steps, 0, 2, stats)


def drmad(
    inner_loss: Callable[..., Tensor],
    outer_loss: Callable[[Any, Any], Tensor],
    params0: Tree,
    hparams: Tree,
    steps: int,
    optimizer: FunctionalOptimizer,
    *,
    batches: Iterable[Any] | None = None,
    anchors: int = 0,
    hvp: str = "auto",
    max_deviation: float | None = MAX_DEVIATION,
    return_info: bool = False,
    process_group: Any = None,
) -> Any:
    """DrMAD hypergradient through ``steps`` optimizer steps (O(P) memory; O(K P) with anchors).

    Arguments and returns as :func:`~hypergradient.unrolled`; ``anchors``, ``hvp`` and
    ``max_deviation`` as :class:`DrMAD` (see it for when the approximation is exact and for
    the path-deviation warning). Builds a :class:`Problem` and calls :class:`DrMAD`.
    """
    method = DrMAD(anchors=anchors, hvp=hvp, max_deviation=max_deviation)  # before any batch
    as_bool(return_info, "return_info")
    check_trees(params0, hparams, "params0")
    problem = functional_problem(
        inner_loss, outer_loss, params0, hparams, steps, optimizer, batches, process_group
    )
    return functional_result(method(problem), return_info)
