"""DrMAD: reverse mode along the straight line between the run's ends.

Fu et al. (2016), "DrMAD: Distilling Reverse-Mode Automatic Differentiation for Optimizing
Hyperparameters of Deep Neural Networks", IJCAI.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor

from .._tree import Tree
from ..optim.functional import FunctionalOptimizer
from .replay import Run
from .trajectory import (
    Sweep,
    TrajectoryMethod,
    forward_sweep,
    functional_problem,
    functional_result,
    reverse_sweep,
)

__all__ = ["DrMAD", "drmad"]


class DrMAD(TrajectoryMethod):
    """DrMAD (Fu et al., 2016): the reverse recursion on ``s_t ~ (1 - t/T) s_0 + (t/T) s_T``.

    Only the initial and final states are kept; the reverse recursion of
    :class:`~hypergradient.Unrolled` is evaluated on the straight line between them
    (parameters and optimizer buffers alike). An approximation: exact when the reverse
    recursion does not depend on the states, i.e. SGD (with or without momentum, fixed
    settings) on an ``f`` quadratic in ``theta`` whose mixed derivative
    ``d_phi grad_theta f`` is constant; otherwise exact only if the trajectory is a
    straight line. It points the right way (positive cosine with the exact hypergradient)
    when the run moves steadily toward the minimum.

    Cost as :class:`~hypergradient.Unrolled` without truncation; memory: two states and
    the ``T`` batches. No state.
    """

    name = "drmad"

    def sweep(self, run: Run, outer_loss: Callable[[Any, Any], Tensor]) -> Sweep:
        T = run.steps
        p_T, s_T, _, losses = forward_sweep(run, lambda t: False, 0)
        s_0 = run.init_state()

        def state_at(t: int) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
            beta = t / T
            p = tuple((1 - beta) * a + beta * b for a, b in zip(run.p0, p_T))
            s = tuple((1 - beta) * a + beta * b for a, b in zip(s_0, s_T))
            return p, s

        hyper, value = reverse_sweep(run, outer_loss, p_T, s_T, state_at, 0)
        return Sweep(hyper, p_T, losses, value, T, 0, 2)


def drmad(
    inner_loss: Callable[..., Tensor],
    outer_loss: Callable[[Any, Any], Tensor],
    params0: Tree,
    hparams: Tree,
    steps: int,
    optimizer: FunctionalOptimizer,
    *,
    batches: Iterable[Any] | None = None,
    return_info: bool = False,
    process_group: Any = None,
) -> Any:
    """DrMAD hypergradient through ``steps`` optimizer steps (O(P) memory).

    Arguments and returns as :func:`~hypergradient.unrolled`; builds a :class:`Problem`
    and calls :class:`DrMAD` (see it for when the approximation is exact).
    """
    problem = functional_problem(
        inner_loss, outer_loss, params0, hparams, steps, optimizer, batches, process_group
    )
    return functional_result(DrMAD()(problem), return_info)
