"""The trajectory engine shared by Unrolled, ForwardMode and DrMAD.

The inner run is ``T`` steps of a differentiable optimizer (:mod:`hypergradient.optim`)

    s_{t+1} = Phi_t(s_t, phi),    s_t = (theta_t, optimizer state_t),
    Phi_t: theta <- update(theta, grad_theta f(theta, phi; batch_t), state, settings(phi))

and the hypergradient is that of ``g(theta_T, phi)``. This module holds what the three
methods share: :class:`Run` (the validated run and its replayable, pure step function
``Phi_t``), the random-number capture and replay (:func:`rng_state`, :func:`replay_rng`),
the forward sweep (:func:`forward_sweep`, no graphs) and the reverse sweep
(:func:`reverse_sweep`, the adjoint recursion ``a_t = a_{t+1} dPhi_t/ds_t``,
``dg/dphi = d_phi g + sum_t a_{t+1} dPhi_t/dphi``), and :class:`TrajectoryMethod`, the base
class whose call validates, sweeps and reports.

Each reverse step recomputes ``Phi_t`` from a stored state with plain ``torch.autograd``
(:class:`~hypergradient.methods.traj_step.ReverseStep`: the gradient with
``create_graph=True``, then one backward pass of the update against the adjoint): states
are stored, never graphs, and ``torch.func`` (which imports ``torch._dynamo``) stays out.
Step ``t`` always draws its random numbers from the same state: ``trajectory.rng_states[t]``
when the caller recorded the real run's (the hyper-optimizer does: the replay's dropout
draws the real masks), else the one the forward sweep found before step ``t`` (the
functional API: the sweep draws exactly what a plain loop would)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import _tree
from .._tree import Tree
from .._vocab import (
    ArgumentTypeError,
    NonFiniteHypergradientError,
    as_bool,
    as_callable,
    as_int,
    require_finite,
)
from ..operators.buffers import keep_buffers
from ._checks import all_finite, check_arity, connected, unused_leaves, warn_unused
from .base import Info, Method, Problem, Trajectory
from .growth import AdjointWatch, report_diverging, report_unstable
from .replay import Run, replay_rng, rng_state
from .replay_check import replay_error
from .traj_step import ReverseStep, accumulate, check_recomputed

__all__ = [
    "Run",
    "Sweep",
    "TrajectoryInfo",
    "TrajectoryMethod",
    "check_forward",
    "forward_sweep",
    "functional_problem",
    "functional_result",
    "hypergradient_tree",
    "outer_gradients",
    "replay_rng",
    "reverse_sweep",
    "rng_state",
]


@dataclass(kw_only=True)
class TrajectoryInfo(Info):
    """Diagnostics of a trajectory hypergradient (Unrolled, ForwardMode, DrMAD).

    Attributes (besides :class:`~hypergradient.Info`'s):
        steps: inner steps run.
        reverse_steps: steps the hypergradient differentiates through (``truncate``).
        recomputed_steps: forward steps recomputed by checkpointing.
        stored_states: peak number of inner states kept in memory at once.
        params: the final parameters ``theta_T`` (detached), with the structure of
            ``params0``: the trained model.
        inner_losses: inner loss at each step (before the update).
        replay_error: relative distance of the replay's final parameters to
            ``trajectory.final_params`` (None when those are not given).

    ``status`` is ``"diverged"`` (``stats["diverging"]`` says how) when the inner losses grow
    geometrically, or the adjoint (``stats["adjoint_growth"]``) or ForwardMode's tangents
    (``stats["tangent_growth"]``) a millionfold, or a hundredfold while the losses end at
    their highest, 10x their lowest (:mod:`~hypergradient.methods.growth`): of no use.
    """

    steps: int = 0
    reverse_steps: int = 0
    recomputed_steps: int = 0
    stored_states: int = 0
    params: Any = field(default=None, repr=False)
    inner_losses: list[float] = field(default_factory=list, repr=False)
    replay_error: float | None = None


@dataclass
class Sweep:
    """What a method's sweeps produce: the flat hypergradient and the run's record."""

    hyper: list[Tensor]
    params: tuple[Tensor, ...]
    losses: list[Tensor]
    outer_loss: float
    reverse_steps: int
    recomputed_steps: int = 0
    stored_states: int = 0
    stats: dict[str, Any] = field(default_factory=dict)


def outer_gradients(
    run: Run,
    outer_loss: Callable[[Any, Any], Tensor],
    p: tuple[Tensor, ...],
    direct: list[bool] | None = None,
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], float]:
    """``grad_theta g`` and ``d_phi g`` at ``theta_T`` (averaged), and ``g``.

    ``direct``, if given, is filled with whether ``g`` depends on each hyperparameter leaf.
    """

    def local() -> list[Tensor]:
        with keep_buffers():  # an extra pass: a train-mode outer loss leaves the statistics
            value, (gp, gh) = _tree.grad_at(
                outer_loss,
                [_tree.unflatten(run.pspec, p), _tree.unflatten(run.hspec, run.h)],
                ["params", "hparams"],
                "outer_loss",
                by_reference=[False, run.by_reference],
            )
        connected(gp, gh, direct)  # (warns when g has no graph to either)
        zp = [torch.zeros_like(a) if d is None else d for a, d in zip(p, gp)]
        zh = [torch.zeros_like(a) if d is None else d for a, d in zip(run.h, gh)]
        return [*zp, *zh, value.reshape(1).to(run.loss_like.dtype)]

    *both, value = run.reduce(local, [*p, *run.h, run.loss_like])
    n = len(p)
    if not all_finite(both):
        paths = [q.replace("params0", "params", 1) for q in run.pspec.paths]
        require_finite(
            both,
            paths + list(run.hspec.paths),
            "the gradient of outer_loss with respect to",
            "Check the validation batch and outer_loss at the end of the run.",
        )
    if not all_finite([value]):
        require_finite(
            [value], ["outer_loss at the end of the run"], "the value of", "Check outer_loss."
        )
    return tuple(both[:n]), tuple(both[n:]), float(value)


def check_forward(run: Run, losses: list[Tensor], p: tuple[Tensor, ...]) -> None:
    """Raise if a step's loss or the final parameters are not finite (first one named)."""
    values = torch.stack(losses).reshape(-1) if losses else run.loss_like[:0]
    if not all_finite([values]):
        t = int(torch.nonzero(~torch.isfinite(values))[0, 0])
        before = f" (step 0: {float(values[0]):.3g}, step {t - 1}: {float(values[t - 1]):.3g})"
        raise NonFiniteHypergradientError(
            f"inner_loss at step {t} is not finite (NaN or Inf). Check batch {t} (NaN or "
            "Inf inputs or targets); if the losses before it grew"
            f"{before if t > 0 else ''}, the inner run diverged: lower the learning rate "
            "or the number of steps.",
            f"inner_loss at step {t}",
        )
    if not all_finite(p):
        require_finite(
            p,
            [q.replace("params0", "params", 1) for q in run.pspec.paths],
            f"after {run.steps} steps,",
            "The inner run diverged: lower the learning rate or the number of steps.",
        )


def hypergradient_tree(run: Run, flat: Sequence[Tensor]) -> Any:
    """The hypergradient as a tree like ``hparams`` (checked, detached)."""
    if not all_finite(flat):
        require_finite(
            flat,
            run.hspec.paths,
            "the hypergradient of",
            "Either a derivative of the losses is infinite or undefined at these values "
            "(sqrt, log or a division at 0 of a hyperparameter: keep it inside its domain, "
            "e.g. with hg.Positive or hg.Interval), or the derivatives through the steps "
            "overflowed (lower the learning rate or the number of steps).",
        )
    return _tree.unflatten(run.hspec, [t.detach() for t in flat])


def forward_sweep(
    run: Run,
    keep_state: Callable[[int], bool],
    first: int,
    visit: Callable[[int, tuple[Tensor, ...], tuple[Tensor, ...]], None] | None = None,
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], dict[int, Any], list[Tensor]]:
    """Run the ``T`` steps without graphs.

    Keeps the states ``keep_state(t)`` asks for, and the random-number state of every step
    from ``first`` on, so that any of them can be replayed exactly; ``visit(t, theta_t,
    state_t)``, if given, sees every state ``t = 0..T``. Returns ``(theta_T, state_T,
    kept, losses)``; the losses and ``theta_T`` are checked for finiteness.
    """
    p, s = run.p0, run.init_state()
    kept: dict[int, Any] = {}
    losses = []
    for t in range(run.steps):
        if keep_state(t):
            kept[t] = (p, s)
        if visit is not None:
            visit(t, p, s)
        (p, s), loss = run.first_step(p, s, t, t >= first)
        losses.append(loss)
    if visit is not None:
        visit(run.steps, p, s)
    check_forward(run, losses, p)
    return p, s, kept, losses


def reverse_sweep(
    run: Run,
    outer_loss: Callable[[Any, Any], Tensor],
    p_T: tuple[Tensor, ...],
    s_T: tuple[Tensor, ...],
    state_at: Callable[[int], tuple[tuple[Tensor, ...], tuple[Tensor, ...]]],
    first: int,
    hvp: str = "auto",
    forward_losses: list[Tensor] | None = None,
) -> tuple[list[Tensor], float, dict[str, Any]]:
    """Adjoint recursion from step ``T-1`` down to ``first``; ``state_at(t)`` gives ``s_t``
    (``forward_losses``: checked against the re-evaluated ones, ``check_recomputed``).

    Returns the flat hypergradient, ``g`` and the product mode's report (``hvp``,
    ``hvp_fallback``; ``unused_hparams``: the leaves no step or ``g`` depended on).
    """
    touched = [False] * len(run.h)
    # every evaluation from here is extra to the run: one block keeps the modules' buffers
    # (the steps' again() blocks nest in it for free)
    with keep_buffers():
        gp, gh, value = outer_gradients(run, outer_loss, p_T, touched)
        adj = (gp, tuple(torch.zeros_like(x) for x in s_T))
        hyper, watch = [x.clone() for x in gh], AdjointWatch(gp)
        step = ReverseStep(run, hvp)
        for t in range(run.steps - 1, first - 1, -1):
            p, s = state_at(t)
            dp, ds, dh = step(p, s, t, adj)
            adj = (watch.push(dp), ds)
            accumulate(hyper, dh, touched)
    unused = unused_leaves(run.hspec.paths, run.h, touched)
    if forward_losses is not None and run.group is None:
        check_recomputed(step.losses, forward_losses, other_kernels=step.mode == "double_math")
    stats = {**step.finish(), "adjoint_growth": watch.growth()}
    return hyper, value, {**stats, **({"unused_hparams": unused} if unused else {})}


class TrajectoryMethod(Method):
    """Base class of the methods that differentiate through (or along) the inner run.

    A subclass implements :meth:`sweep`; the call validates the problem (through
    :class:`Run`: inputs, the distributed consistency check), sweeps, checks the result
    and reports a :class:`TrajectoryInfo`. No state: a call that raises changes nothing.
    """

    needs_trajectory = True
    tunes_optimizer = True

    def sweep(self, run: Run, outer_loss: Callable[[Any, Any], Tensor]) -> Sweep:
        """The hypergradient of ``outer_loss`` at the end of ``run`` (flat leaves)."""
        raise NotImplementedError

    def __call__(self, problem: Problem) -> tuple[Tree, TrajectoryInfo]:
        started = time.perf_counter()
        run = Run(problem, self)
        out = self.sweep(run, problem.outer_loss)
        result = hypergradient_tree(run, out.hyper)
        traj = problem.trajectory
        final, rounding = (None, 0.0) if traj is None else (traj.final_params, traj.rounding)
        info = TrajectoryInfo(
            method=self.name,
            seconds=time.perf_counter() - started,
            outer_loss=out.outer_loss,
            steps=run.steps,
            reverse_steps=out.reverse_steps,
            recomputed_steps=out.recomputed_steps,
            stored_states=out.stored_states,
            params=_tree.unflatten(run.pspec, [t.detach() for t in out.params]),
            inner_losses=torch.stack(out.losses).tolist() if out.losses else [],
        )
        if final is not None:
            info.replay_error, checked = replay_error(run, out.params, final, run.steps, rounding)
            info.stats.update(checked, replay_error=info.replay_error)
        warn_unused(out.stats.get("unused_hparams", []))
        report_diverging(info, info.inner_losses, "inner run", warn=final is None)
        report_unstable(info, out.stats, out.reverse_steps)
        info.stats["stored_states"] = out.stored_states
        info.stats.update(out.stats)
        info.num_hvps = int(out.stats.get("products", 0))
        return result, info


# ----------------------------------------------------------------------------- functional API


def functional_problem(
    inner_loss: Callable[..., Tensor],
    outer_loss: Callable[[Any, Any], Tensor],
    params0: Tree,
    hparams: Tree,
    steps: int,
    optimizer: Any,
    batches: Iterable[Any] | None,
    process_group: Any,
) -> Problem:
    """The :class:`Problem` of ``hg.unrolled``/``hg.forward_mode``/``hg.drmad``'s arguments.

    Without ``batches`` the loss takes ``(params, hparams)``; with them
    ``(params, hparams, batch)``, and the first ``steps`` batches are taken (an iterable
    may be longer, e.g. ``itertools.cycle(loader)``).
    """
    as_callable(outer_loss, "outer_loss", "(params, hparams) -> scalar tensor")
    steps = as_int(steps, "steps", min=1)
    if batches is None:
        as_callable(inner_loss, "inner_loss", "(params, hparams) -> scalar tensor")
        check_arity(
            inner_loss,
            2,
            "inner_loss",
            "(params, hparams)",
            "To give it one batch per step as a third argument, pass batches=...",
        )
        taken: list[Any] = [None] * steps

        def step_loss(p: Any, h: Any, batch: Any) -> Tensor:
            return inner_loss(p, h)

    else:
        as_callable(inner_loss, "inner_loss", "(params, hparams, batch) -> scalar tensor")
        check_arity(
            inner_loss,
            3,
            "inner_loss",
            "(params, hparams, batch)",
            "With batches=..., the loss must take (params, hparams, batch).",
        )
        taken = _take(batches, steps)
        step_loss = inner_loss
    trajectory = Trajectory(step_loss, params0, optimizer, taken)
    return Problem(
        lambda p, h: step_loss(p, h, taken[-1]),
        outer_loss,
        params0,
        hparams,
        trajectory=trajectory,
        process_group=process_group,
    )


def _take(batches: Any, steps: int) -> list[Any]:
    if not isinstance(batches, Iterable):
        raise ArgumentTypeError(
            f"`batches` must be a sequence or an iterable of batches, got {type(batches).__name__}."
        )
    taken = list(itertools.islice(iter(batches), steps))
    if len(taken) < steps:
        raise ValueError(
            f"`batches` ran out after {len(taken)} of steps={steps} batches; pass at least "
            "`steps` batches (e.g. itertools.cycle(loader))."
        )
    return taken


def functional_result(out: tuple[Tree, TrajectoryInfo], return_info: Any) -> Any:
    """What the functional API returns: the hypergradient, with its info if asked."""
    return out if as_bool(return_info, "return_info") else out[0]
