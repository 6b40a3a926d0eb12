"""Forward mode (RTHO): tangents of the trajectory, one per hyperparameter.

Franceschi et al. (2017), "Forward and Reverse Gradient-Based Hyperparameter
Optimization", ICML.

Forward mode is where ``torch.func`` is the right tool (``jvp`` of the gradient, ``vmap``
over the directions); its first transform imports ``torch._dynamo`` (~2 s, once per
process), which the reverse-mode methods never do.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .. import _tree
from .._tree import Tree
from .._vocab import as_optional_int
from ..optim.functional import FunctionalOptimizer
from .base import Problem
from .replay import Run
from .trajectory import (
    Sweep,
    TrajectoryInfo,
    TrajectoryMethod,
    check_forward,
    forward_sweep,
    functional_problem,
    functional_result,
    outer_gradients,
)

__all__ = ["ForwardMode", "forward_mode"]


def _propagate(run: Run, chunk_size: int | None) -> tuple[Any, ...]:
    """Run the steps with tangents ``Z_t = ds_t/dphi``; returns ``(theta_T, Z_T, losses)``."""
    m = run.hspec.size
    dtype = _tree.common_dtype(list(run.h))
    eye = torch.eye(m, dtype=dtype, device=run.device)
    th = tuple(x.to(h.dtype) for x, h in zip(_tree.split(eye, run.hspec), run.h))
    p, s = run.p0, run.init_state()
    tp = tuple(torch.zeros((m, *x.shape), dtype=x.dtype, device=x.device) for x in p)
    ts = tuple(torch.zeros((m, *x.shape), dtype=x.dtype, device=x.device) for x in s)
    losses = []
    vmap = functools.partial(torch.func.vmap, randomness="same", chunk_size=chunk_size)
    for t in range(run.steps):
        with torch.no_grad(), run.first_pass(t):  # the primal draws from the global RNG
            g, loss = run.mean_grad(p, t)

        def push_grad(dp, dh, p=p, t=t):
            return torch.func.jvp(lambda pp, hh: run.grad(pp, hh, t)[0], (p, run.h), (dp, dh))[1]

        def push_update(dp, ds, dg, dh, p=p, s=s, g=g, t=t):
            return torch.func.jvp(
                lambda pp, ss, gg, hh: run.update_h(pp, ss, gg, hh, t),
                (p, s, g, run.h),
                (dp, ds, dg, dh),
            )[1]

        def tangents(tp: tuple[Tensor, ...] = tp) -> list[Tensor]:
            return list(vmap(push_grad)(tp, th))

        with run.again(t):  # tangents of the averaged gradient, under the same draws
            tg = run.reduce(tangents, tp)
        tp, ts = vmap(push_update)(tp, ts, tg, th)
        with torch.no_grad():
            p, s = run.update(p, s, g, run.settings, t)
        losses.append(loss.detach().reshape(()))
    check_forward(run, losses, p)
    return p, tp, losses


class ForwardMode(TrajectoryMethod):
    """Forward mode through the recorded inner steps (Franceschi et al., 2017).

    Propagates ``Z_t = d s_t / d phi`` alongside the run with ``torch.func.jvp`` (vmapped
    over the ``m`` hyperparameter directions, ``chunk_size`` at a time) and returns
    ``d_phi g + (d theta_T / d phi)^T grad_theta g``. Equal to
    :class:`~hypergradient.Unrolled` up to rounding.

    Args:
        chunk_size: directions pushed together (bounds memory); None: all ``m``.

    Memory: ``m`` tangents of the state, independent of ``T``. Cost per step: one jvp of
    an optimizer step per hyperparameter (about 3 gradients each), so it suits few
    hyperparameters (learning rates, momentum, a handful of loss weights). No state.
    """

    name = "forward_mode"

    def __init__(self, chunk_size: int | None = None):
        self.chunk_size = as_optional_int(chunk_size, "chunk_size", min=1)

    def __call__(self, problem: Problem) -> tuple[Tree, TrajectoryInfo]:
        if isinstance(problem, Problem) and problem.hparams_by_reference:
            raise ValueError(
                "ForwardMode pushes tangents through the steps with torch.func: the losses "
                "must read the hyperparameters through their `hparams` argument "
                "(hparams_by_reference is for the implicit methods, Unrolled and DrMAD)."
            )
        return super().__call__(problem)

    def sweep(self, run: Run, outer_loss: Callable[[Any, Any], Tensor]) -> Sweep:
        m = run.hspec.size
        if m == 0:  # nothing to propagate: only the (empty) direct term
            p, _, _, losses = forward_sweep(run, lambda t: False, run.steps)
            _, gh, value = outer_gradients(run, outer_loss, p)
            return Sweep(list(gh), p, losses, value, run.steps, 0, 1, {"products": 0})
        p, tp, losses = _propagate(run, self.chunk_size)
        gp, gh, value = outer_gradients(run, outer_loss, p)
        dtype = _tree.common_dtype(list(run.h))
        total = torch.zeros(m, dtype=dtype, device=run.device)
        for z, g in zip(tp, gp):
            total = total + z.reshape(m, -1).to(dtype) @ g.reshape(-1).to(dtype)
        flat = _tree.cat(list(gh), run.hspec, dtype, run.device) + total
        hyper = _tree.split(flat, run.hspec, [h.dtype for h in run.h])
        return Sweep(list(hyper), p, losses, value, run.steps, 0, 1, {"products": m * run.steps})


def forward_mode(
    inner_loss: Callable[..., Tensor],
    outer_loss: Callable[[Any, Any], Tensor],
    params0: Tree,
    hparams: Tree,
    steps: int,
    optimizer: FunctionalOptimizer,
    *,
    batches: Iterable[Any] | None = None,
    chunk_size: int | None = None,
    return_info: bool = False,
    process_group: Any = None,
) -> Any:
    """Forward-mode (RTHO) hypergradient through ``steps`` optimizer steps.

    Arguments and returns as :func:`~hypergradient.unrolled`, with ``chunk_size`` as
    :class:`ForwardMode`; builds a :class:`Problem` and calls :class:`ForwardMode`. No
    trajectory is stored: memory is independent of ``steps``.
    """
    problem = functional_problem(
        inner_loss, outer_loss, params0, hparams, steps, optimizer, batches, process_group
    )
    return functional_result(ForwardMode(chunk_size)(problem), return_info)
