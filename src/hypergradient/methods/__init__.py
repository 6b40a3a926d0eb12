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

from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from .. import _tree
from ..distributed import all_reduce_mean
from ..implicit import _outer_grads, implicit
from ..operators import HessianOperator
from ..optim.functional import FunctionalOptimizer
from ..solvers import CG, Neumann, Solver, _positive_float, _positive_int
from ..trajectory import _Resume, drmad, forward_mode, unrolled

__all__ = ["HyperMethod", "T1T2", "IFT", "HOAG", "Unrolled", "ForwardMode", "DrMAD"]


@dataclass
class HyperContext:
    """Everything a method may use at a hyper-step (built by the hyper-optimizer).

    ``train_loss(params, raw)`` and ``val_loss(params, raw)`` are functional in the
    parameters and the *raw* (unconstrained) hyperparameters; the hypergradient is taken
    with respect to ``raw``.
    """

    train_loss: Callable[[Any, Any], Tensor]
    val_loss: Callable[[Any, Any], Tensor]
    params: Any
    raw: Any
    lr: float
    prev_params: Any = None
    # trajectory replay of the last inner steps
    batch_loss: Callable[[Any, Any, Any], Tensor] | None = None
    start_params: Any = None
    optimizer: FunctionalOptimizer | None = None
    resume: _Resume | None = None
    batches: list[Any] = field(default_factory=list)
    process_group: Any = None


class HyperMethod:
    """Base class of the hyper-optimizer's methods."""

    needs_trajectory = False
    tunes_optimizer = False  # can optimizer settings (lr, momentum) be hyperparameters?

    def compute(self, ctx: HyperContext) -> tuple[Any, dict[str, Any]]:
        """Return ``(hypergradient with the structure of ctx.raw, diagnostics)``."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _info_dict(info: Any) -> dict[str, Any]:
    keep = (
        "num_hvps",
        "relative_residual",
        "converged",
        "status",
        "iterations",
        "inner_grad_norm",
        "outer_loss",
        "seconds",
    )
    return {k: getattr(info, k) for k in keep if hasattr(info, k)}


class T1T2(HyperMethod):
    """One-step look-ahead (T1-T2; Luketina et al., 2016, ICML).

    With ``theta' = theta - lr * grad_theta f(theta, phi)`` the last inner step,

        dg(theta', phi)/dphi = d_phi g(theta')
                               - lr * (d_phi grad_theta f(theta))^T grad_theta g(theta')

    exactly, for plain SGD: this is one unrolled step. With momentum or Adam it is the
    usual approximation that keeps only the learning-rate factor. Cost: one gradient of
    ``g`` and one mixed product (no Hessian-vector product).
    """

    def compute(self, ctx: HyperContext) -> tuple[Any, dict[str, Any]]:
        at = ctx.prev_params if ctx.prev_params is not None else ctx.params
        op = HessianOperator(ctx.train_loss, at, ctx.raw)
        now = SimpleNamespace(  # theta' (after the step) with the same hyperparameter leaves
            param_leaves=[
                t.detach().requires_grad_(True) for t in _tree.flatten(ctx.params, "params")[0]
            ],
            hparam_leaves=op.hparam_leaves,
        )
        g_theta, g_phi, value = _outer_grads(ctx.val_loss, op, leaves_from=now)
        hdtype = _tree.common_dtype(op.hparam_leaves)
        b = _tree.cat(g_theta, op.param_spec, op.dtype, op.device)
        direct = _tree.cat(g_phi, op.hparam_spec, hdtype, op.device)
        group = ctx.process_group
        if group is not None:  # data-parallel: average over the ranks' shards
            n = b.numel()
            scalar = torch.tensor([value], dtype=torch.float64, device=b.device)
            buf = torch.cat([b.double(), direct.double(), scalar])
            all_reduce_mean(buf, group)
            b, direct, value = buf[:n].to(b.dtype), buf[n:-1].to(hdtype), float(buf[-1])
        mixed = _tree.cat(op.mixed(ctx.lr * b), op.hparam_spec, hdtype, op.device)
        if group is not None:
            all_reduce_mean(mixed, group)
        out = _tree.split(direct - mixed, op.hparam_spec, [t.dtype for t in op.hparam_leaves])
        op.release()
        return _tree.unflatten(op.hparam_spec, [t.detach() for t in out]), {
            "outer_loss": value,
            "num_hvps": 0,
        }


class IFT(HyperMethod):
    """Implicit differentiation at the current parameters (Lorraine et al., 2020, AISTATS).

    Args:
        solver: any :mod:`hypergradient.solvers` solver; default
            ``Neumann(iters=10, alpha=lr)`` with ``lr`` the inner optimizer's learning rate,
            as in the paper.
        damping: added to the Hessian's diagonal.
    """

    def __init__(self, solver: Solver | None = None, damping: float = 0.0):
        if solver is not None and not isinstance(solver, Solver):
            raise TypeError(f"`solver` must be a hypergradient solver, got {type(solver)}.")
        self.solver = solver
        self.damping = _positive_float(damping, "damping", allow_zero=True)

    def compute(self, ctx: HyperContext) -> tuple[Any, dict[str, Any]]:
        solver = self.solver if self.solver is not None else Neumann(iters=10, alpha=ctx.lr)
        hyper, info = implicit(
            ctx.train_loss,
            ctx.val_loss,
            ctx.params,
            ctx.raw,
            solver,
            damping=self.damping,
            return_info=True,
            process_group=ctx.process_group,
        )
        return hyper, _info_dict(info)


class HOAG(HyperMethod):
    """HOAG (Pedregosa, 2016, ICML): conjugate gradient to a decreasing tolerance.

    The ``k``-th hyper-step solves ``H x = grad_theta g`` by CG to relative tolerance
    ``max(tol * decay**k, min_tol)``, warm-started from the previous solution, so early
    (inaccurate) hyper-steps are cheap and late ones accurate.

    Args:
        maxiter: CG iterations per hyper-step.
        tol, decay, min_tol: the tolerance schedule.
        damping: added to the Hessian's diagonal.
    """

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

    def compute(self, ctx: HyperContext) -> tuple[Any, dict[str, Any]]:
        tol = max(self.tol * self.decay**self._k, self.min_tol)
        x0 = self._x
        if x0 is not None and x0.numel() != _tree.flatten(ctx.params, "params")[1].size:
            x0 = None
        hyper, info = implicit(
            ctx.train_loss,
            ctx.val_loss,
            ctx.params,
            ctx.raw,
            CG(self.maxiter, tol),
            damping=self.damping,
            x0=x0,
            return_info=True,
            process_group=ctx.process_group,
        )
        self._x = info.solution
        self._k += 1
        return hyper, {**_info_dict(info), "tol": tol}

    def state_dict(self) -> dict[str, Any]:
        return {"k": self._k, "x": None if self._x is None else self._x.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._k = int(state["k"])
        self._x = None if state["x"] is None else state["x"].clone()


class _Trajectory(HyperMethod):
    needs_trajectory = True
    tunes_optimizer = True

    def _run(self, fn: Callable[..., Any], ctx: HyperContext, **kwargs: Any):
        assert ctx.batch_loss is not None and ctx.optimizer is not None
        hyper, info = fn(
            ctx.batch_loss,
            ctx.val_loss,
            ctx.start_params,
            ctx.raw,
            len(ctx.batches),
            ctx.optimizer,
            batches=ctx.batches,
            return_info=True,
            process_group=ctx.process_group,
            _resume=ctx.resume,
            **kwargs,
        )
        stats = {
            "outer_loss": info.outer_loss,
            "seconds": info.seconds,
            "stored_states": info.stored_states,
            "replayed_params": info.params,
        }
        return hyper, stats


class Unrolled(_Trajectory):
    """Reverse mode through the last ``inner_steps`` steps, replayed differentiably.

    Args:
        truncate: differentiate only the last ``K`` of them (Shaban et al., 2019).
        checkpoint_every: trade recomputation for memory (see :func:`hg.unrolled`).
    """

    def __init__(self, truncate: int | None = None, checkpoint_every: int | None = None):
        self.truncate = None if truncate is None else _positive_int(truncate, "truncate")
        self.checkpoint_every = (
            None
            if checkpoint_every is None
            else _positive_int(checkpoint_every, "checkpoint_every")
        )

    def compute(self, ctx: HyperContext) -> tuple[Any, dict[str, Any]]:
        K = None if self.truncate is None else min(self.truncate, len(ctx.batches))
        return self._run(unrolled, ctx, truncate=K, checkpoint_every=self.checkpoint_every)


class ForwardMode(_Trajectory):
    """Forward mode through the last ``inner_steps`` steps (Franceschi et al., 2017).

    Best with few hyperparameters (learning rate, momentum, a few loss weights).
    """

    def __init__(self, chunk_size: int | None = None):
        self.chunk_size = None if chunk_size is None else _positive_int(chunk_size, "chunk_size")

    def compute(self, ctx: HyperContext) -> tuple[Any, dict[str, Any]]:
        return self._run(forward_mode, ctx, chunk_size=self.chunk_size)


class DrMAD(_Trajectory):
    """DrMAD (Fu et al., 2016): reverse mode on the straight line between the window's ends."""

    def compute(self, ctx: HyperContext) -> tuple[Any, dict[str, Any]]:
        return self._run(drmad, ctx)
