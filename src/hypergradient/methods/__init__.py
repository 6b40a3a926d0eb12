"""Hypergradient methods for :class:`~hypergradient.HyperOptimizer`.

A method turns the hyper-optimizer's current situation (parameters, the last inner steps,
a training and a validation batch) into a hypergradient. Implicit methods use the current
parameters only; trajectory methods replay the last ``inner_steps`` steps differentiably.

=================  =========================================================  ==========
method             hypergradient                                              paper
=================  =========================================================  ==========
``T1T2()``         one-step look-ahead: ``d_phi g - lr (d_phi grad f)^T grad g`` Luketina 2016
``IFT(solver)``    implicit, ``H^{-1}`` by any solver (default Neumann, alpha=lr)  Lorraine 2020
``HOAG(...)``      implicit, CG to a decreasing tolerance, warm-started        Pedregosa 2016
``Unrolled(K)``    reverse mode through the last K inner steps                 Shaban 2019
``ForwardMode()``  forward mode through the inner steps                        Franceschi 2017
``DrMAD()``        reverse mode along the straight line of the inner steps     Fu 2016
=================  =========================================================  ==========
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from .. import _tree
from ..distributed import all_reduce_mean
from ..implicit import HypergradientWarning, _outer_grads, implicit
from ..operators import HessianOperator
from ..solvers import CG, Neumann, Solver, _positive_float, _positive_int
from ..trajectory import _Resume, drmad, forward_mode, unrolled
from .base import Info, Method, Problem, Trajectory

__all__ = [
    "DrMAD",
    "ForwardMode",
    "HOAG",
    "HyperMethod",
    "IFT",
    "Info",
    "Method",
    "Problem",
    "T1T2",
    "Trajectory",
    "Unrolled",
]


HyperMethod = Method  # deprecated alias, kept for one release


def _implicit_info(info: Any, method: str) -> Info:
    stats = dict(info.stats)
    for k in ("relative_residual", "converged", "iterations", "inner_grad_norm", "residual_norm"):
        stats[k] = getattr(info, k)
    return Info(
        method=method,
        seconds=info.seconds,
        outer_loss=info.outer_loss,
        num_hvps=info.num_hvps,
        status=info.status,
        stats=stats,
    )


def _lr(problem: Problem, who: str) -> float:
    if problem.lr is None:
        raise ValueError(f"{who} needs the inner learning rate: pass Problem(lr=...).")
    return float(problem.lr)


class T1T2(Method):
    """One-step look-ahead (T1-T2; Luketina et al., 2016, ICML).

    With ``theta' = theta - lr * grad_theta f(theta, phi)`` the last inner step,

        dg(theta', phi)/dphi = d_phi g(theta')
                               - lr * (d_phi grad_theta f(theta))^T grad_theta g(theta')

    exactly, for plain SGD: this is one unrolled step. With momentum or Adam it is the
    usual approximation that keeps only the learning-rate factor. Cost: one gradient of
    ``g`` and one mixed product (no Hessian-vector product).
    """

    name = "t1t2"

    def __call__(self, problem: Problem) -> tuple[Any, Info]:
        started = time.perf_counter()
        lr = _lr(problem, "T1T2")
        at = problem.prev_params if problem.prev_params is not None else problem.params
        op = HessianOperator(problem.inner_loss, at, problem.hparams)
        now = SimpleNamespace(  # theta' (after the step) with the same hyperparameter leaves
            param_leaves=[
                t.detach().requires_grad_(True) for t in _tree.flatten(problem.params, "params")[0]
            ],
            hparam_leaves=op.hparam_leaves,
        )
        g_theta, g_phi, value = _outer_grads(problem.outer_loss, op, leaves_from=now)
        hdtype = _tree.common_dtype(op.hparam_leaves)
        b = _tree.cat(g_theta, op.param_spec, op.dtype, op.device)
        direct = _tree.cat(g_phi, op.hparam_spec, hdtype, op.device)
        group = problem.process_group
        if group is not None:  # data-parallel: average over the ranks' shards
            n = b.numel()
            scalar = torch.tensor([value], dtype=torch.float64, device=b.device)
            buf = torch.cat([b.double(), direct.double(), scalar])
            all_reduce_mean(buf, group)
            b, direct, value = buf[:n].to(b.dtype), buf[n:-1].to(hdtype), float(buf[-1])
        mixed = _tree.cat(op.mixed(lr * b), op.hparam_spec, hdtype, op.device)
        if group is not None:
            all_reduce_mean(mixed, group)
        out = _tree.split(direct - mixed, op.hparam_spec, [t.dtype for t in op.hparam_leaves])
        op.release()
        info = Info(method=self.name, seconds=time.perf_counter() - started, outer_loss=value)
        return _tree.unflatten(op.hparam_spec, [t.detach() for t in out]), info


class IFT(Method):
    """Implicit differentiation at the current parameters (Lorraine et al., 2020, AISTATS).

    Args:
        solver: any :mod:`hypergradient.solvers` solver; default
            ``Neumann(iters=10, alpha=lr)`` with ``lr`` the inner optimizer's learning rate,
            as in the paper.
        damping: added to the Hessian's diagonal.
    """

    name = "implicit"

    def __init__(self, solver: Solver | None = None, damping: float = 0.0):
        if solver is not None and not isinstance(solver, Solver):
            raise TypeError(f"`solver` must be a hypergradient solver, got {type(solver)}.")
        self.solver = solver
        self.damping = _positive_float(damping, "damping", allow_zero=True)

    def __call__(self, problem: Problem) -> tuple[Any, Info]:
        solver = self.solver
        if solver is None:
            solver = Neumann(iters=10, alpha=_lr(problem, "IFT's default Neumann solver"))
        hyper, info = implicit(
            problem.inner_loss,
            problem.outer_loss,
            problem.params,
            problem.hparams,
            solver,
            damping=self.damping,
            return_info=True,
            process_group=problem.process_group,
        )
        return hyper, _implicit_info(info, self.name)


class HOAG(Method):
    """HOAG (Pedregosa, 2016, ICML): conjugate gradient to a decreasing tolerance.

    The ``k``-th hyper-step solves ``H x = grad_theta g`` by CG to relative tolerance
    ``max(tol * decay**k, min_tol)``, warm-started from the previous solution, so early
    (inaccurate) hyper-steps are cheap and late ones accurate.

    Args:
        maxiter: CG iterations per hyper-step.
        tol, decay, min_tol: the tolerance schedule.
        damping: added to the Hessian's diagonal.
    """

    name = "hoag"

    def __init__(
        self,
        maxiter: int = 50,
        tol: float = 1e-1,
        decay: float = 0.9,
        min_tol: float = 1e-10,
        damping: float = 0.0,
    ):
        self.maxiter = _positive_int(maxiter, "maxiter")
        self.tol = _positive_float(tol, "tol")
        self.decay = _positive_float(decay, "decay")
        if self.decay > 1:
            raise ValueError(f"`decay` must be in (0, 1], got {decay}.")
        self.min_tol = _positive_float(min_tol, "min_tol", allow_zero=True)
        self.damping = _positive_float(damping, "damping", allow_zero=True)
        self._k = 0
        self._x: Tensor | None = None

    def __call__(self, problem: Problem) -> tuple[Any, Info]:
        tol = max(self.tol * self.decay**self._k, self.min_tol)
        x0 = self._x
        if x0 is not None and x0.numel() != _tree.flatten(problem.params, "params")[1].size:
            x0 = None
        hyper, info = implicit(
            problem.inner_loss,
            problem.outer_loss,
            problem.params,
            problem.hparams,
            CG(self.maxiter, tol),
            damping=self.damping,
            x0=x0,
            return_info=True,
            process_group=problem.process_group,
        )
        self._x = info.solution
        self._k += 1
        out = _implicit_info(info, self.name)
        out.stats["tol"] = tol
        return hyper, out

    def state_dict(self) -> dict[str, Any]:
        return {"k": self._k, "x": None if self._x is None else self._x.clone()}

    def load_state_dict(self, state: Any) -> None:
        self._k = int(state["k"])
        self._x = None if state["x"] is None else state["x"].clone()


class _TrajectoryMethod(Method):
    needs_trajectory = True
    tunes_optimizer = True

    def _run(self, fn: Callable[..., Any], problem: Problem, **kwargs: Any) -> tuple[Any, Info]:
        traj = problem.trajectory
        if not isinstance(traj, Trajectory):
            raise ValueError(
                f"{type(self).__name__} differentiates through the inner steps: the problem "
                "needs a `trajectory` (hg.methods.Trajectory)."
            )
        resume = _Resume(
            None if traj.state0 is None else tuple(traj.state0), traj.step0, dict(traj.settings)
        )
        hyper, info = fn(
            traj.step_loss,
            problem.outer_loss,
            traj.params0,
            problem.hparams,
            traj.steps,
            traj.optimizer,
            batches=list(traj.batches),
            return_info=True,
            process_group=problem.process_group,
            _resume=resume,
            **kwargs,
        )
        stats: dict[str, Any] = {"stored_states": info.stored_states}
        if traj.final_params is not None:
            stats["replay_error"] = _replay_error(info.params, traj.final_params, traj.steps)
        out = Info(
            method=self.name,
            seconds=info.seconds,
            outer_loss=info.outer_loss,
            stats=stats,
        )
        return hyper, out


def _replay_error(replayed: Any, real: Any, steps: int) -> float:
    """Relative distance of the replay's final parameters to the real ones (warns if large)."""
    a_leaves = _tree.flatten(replayed, "replayed")[0]
    b_leaves = _tree.flatten(real, "params")[0]
    num = sum(float((a - b.detach()).pow(2).sum()) for a, b in zip(a_leaves, b_leaves))
    den = sum(float(b.detach().pow(2).sum()) for b in b_leaves)
    error = (num / max(den, 1e-300)) ** 0.5
    # Rounding alone separates the eager and the functional step by a few units in the last
    # place of the parameters' dtype (half precision: ~1e-3).
    tol = max([1e-4] + [4 * torch.finfo(b.dtype).eps for b in b_leaves])
    if error > tol:
        warnings.warn(
            f"The differentiable replay of the last {steps} steps ended {error:.2e} (relative) "
            "away from the model's parameters: train_loss must be the loss the model was "
            "trained on, on the same batches, with a deterministic inner optimizer. (Under "
            "torch.autocast, rounding differences of about 1e-3 are expected and harmless.)",
            HypergradientWarning,
            stacklevel=4,
        )
    return error


class Unrolled(_TrajectoryMethod):
    """Reverse mode through the last ``inner_steps`` steps, replayed differentiably.

    Args:
        truncate: differentiate only the last ``K`` of them (Shaban et al., 2019).
        checkpoint_every: trade recomputation for memory (see :func:`hg.unrolled`).
    """

    name = "unrolled"

    def __init__(self, truncate: int | None = None, checkpoint_every: int | None = None):
        self.truncate = None if truncate is None else _positive_int(truncate, "truncate")
        self.checkpoint_every = (
            None
            if checkpoint_every is None
            else _positive_int(checkpoint_every, "checkpoint_every")
        )

    def __call__(self, problem: Problem) -> tuple[Any, Info]:
        steps = 0 if problem.trajectory is None else problem.trajectory.steps
        K = None if self.truncate is None else min(self.truncate, steps)
        return self._run(unrolled, problem, truncate=K, checkpoint_every=self.checkpoint_every)


class ForwardMode(_TrajectoryMethod):
    """Forward mode through the last ``inner_steps`` steps (Franceschi et al., 2017).

    Best with few hyperparameters (learning rate, momentum, a few loss weights).
    """

    name = "forward_mode"

    def __init__(self, chunk_size: int | None = None):
        self.chunk_size = None if chunk_size is None else _positive_int(chunk_size, "chunk_size")

    def __call__(self, problem: Problem) -> tuple[Any, Info]:
        return self._run(forward_mode, problem, chunk_size=self.chunk_size)


class DrMAD(_TrajectoryMethod):
    """DrMAD (Fu et al., 2016): reverse mode on the straight line between the window's ends."""

    name = "drmad"

    def __call__(self, problem: Problem) -> tuple[Any, Info]:
        return self._run(drmad, problem)
