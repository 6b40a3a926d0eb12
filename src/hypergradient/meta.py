"""Meta-learning: MAML and iMAML meta-gradients from the library's hypergradient machinery.

Gradient-based meta-learning learns an initialization ``theta`` (the *meta-parameters*)
from which a few steps of training on a new task's small *support* set give a model that
does well on the task's *query* set. Each task is a bilevel problem whose inner problem is
the adaptation and whose outer loss is the query loss; the meta-gradient is its
hypergradient with respect to ``theta``, averaged over a meta-batch of tasks.

Two meta-gradients are provided, each as a small class and a one-call function:

:class:`MAML` / :func:`maml_step` (Finn, Abbeel & Levine, 2017, "Model-Agnostic
Meta-Learning for Fast Adaptation of Deep Networks", ICML). The adapted parameters are
``K`` optimizer steps from ``theta``:

    phi_0 = theta,   phi_{k+1} = phi_k - alpha grad L_S(phi_k),   meta-loss L_Q(phi_K)

and the meta-gradient ``d L_Q(phi_K) / d theta`` is computed exactly (second order) by
reverse mode through the ``K`` steps with :func:`hypergradient.unrolled`. ``unrolled``
differentiates with respect to ``hparams`` only, never with respect to ``params0`` (its
starting point is a constant), so the initialization is made a hyperparameter by the
change of variables ``phi = theta + delta``: the run trains ``delta`` from
``delta_0 = 0`` on ``f(delta, theta) = L_S(theta + delta)``, whose gradient in ``delta``
is ``grad L_S(phi)``, so ``theta + delta_k`` is exactly the trajectory above (for SGD,
momentum SGD and Adam alike), and ``d L_Q(theta + delta_K) / d theta`` is the MAML
meta-gradient. ``first_order=True`` gives first-order MAML, ``grad L_Q(phi_K)``.

:class:`IMAML` / :func:`imaml_step` (Rajeswaran, Finn, Kakade & Levine, 2019,
"Meta-Learning with Implicit Gradients", NeurIPS). The adapted parameters minimize a
proximally regularized support loss:

    phi*(theta) = argmin_phi  f(phi, theta),   f(phi, theta) = L_S(phi) + lam/2 ||phi - theta||^2

and the meta-gradient is ``d L_Q(phi*(theta)) / d theta``. :func:`hypergradient.implicit`
with ``theta`` as the hyperparameters gives it: the Hessian of ``f`` in ``phi`` is
``H + lam I`` (``H`` the Hessian of ``L_S`` at ``phi*``) and the mixed derivative
``d^2 f / d theta d phi = -lam I``, so

    dL_Q/dtheta = -(-lam I) (H + lam I)^{-1} grad L_Q(phi*) = (I + H / lam)^{-1} grad L_Q(phi*),

which is the iMAML formula. Its cost does not depend on how ``phi*`` was found: a few
steps of any optimizer (``inner_optimizer``) followed by ``k`` Hessian-vector products of
the linear solver (``solver``, conjugate gradient by default).

Tasks and losses
----------------
A task is a pair ``(support, query)`` of batches. The loss is either a callable
``loss_fn(params, batch) -> scalar tensor`` on a tree of tensors ``params`` (a tensor, a
tuple/list or a dict of tensors), or an ``nn.Module``: then ``batch = (inputs, targets)``
and the loss is ``criterion(torch.func.functional_call(model, params, (inputs,)), targets)``
(``criterion`` defaults to the mean squared error); use :func:`parameters_of` for the
module's parameters as a dict. Meta-gradients have the structure, shapes and dtypes of
``meta_params`` and are detached; nothing passed in is modified, and the module's own
parameters are never used (only its architecture).

Cost per task, in gradient evaluations of the loss on one batch (P parameters):

==================  =====================================  ================================
method              time                                    memory
==================  =====================================  ================================
MAML (2nd order)    K forward + K reverse steps (~3-4 each)  K stored states (K x P numbers)
first-order MAML    K + 1                                   O(P)
iMAML               inner_steps + k (solver products) + 3   O(P) + one double-backward graph
==================  =====================================  ================================

iMAML's memory does not grow with the number of inner steps, which is its point: the inner
problem may be solved with many steps, or with any optimizer.

Meta-batches (``.step`` / ``*_step``) average the per-task meta-gradients. With
``vectorize=True`` the ``B`` tasks of a meta-batch (batches of equal shapes, a loss that
works under ``torch.func.vmap``) run as one block-separable problem on parameters stacked
along a new leading dimension: one inner loop and one reverse pass (MAML) or one linear
solve (iMAML) for the whole batch instead of ``B``, which is several times faster for small
models. For MAML this is exactly the mean of the per-task meta-gradients; for iMAML too
when the solver converges (with a fixed budget, a joint solve is a different approximation).

A typical meta-training loop::

    theta = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    opt = torch.optim.Adam(theta.values(), lr=1e-3)
    imaml = hg.meta.IMAML(model, lam=1.0, inner_steps=20, inner_lr=0.01,
                          solver=hg.CG(maxiter=5), vectorize=True)
    for tasks in meta_batches:                  # lists of ((x_s, y_s), (x_q, y_q))
        grad, info = imaml.step(theta, tasks)
        for k in theta:
            theta[k].grad = grad[k]
        opt.step()
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import _tree
from ._tree import Tree, TreeSpec
from .methods import implicit, unrolled
from .operators import _check_scalar
from .optim.functional import FunctionalOptimizer, sgd
from .solvers import CG, Solver

__all__ = [
    "IMAML",
    "MAML",
    "MetaInfo",
    "TaskInfo",
    "adapt",
    "imaml_step",
    "maml_step",
    "module_loss",
    "parameters_of",
]

LossFn = Callable[[Any, Any], Tensor]
Task = tuple[Any, Any]


# ----------------------------------------------------------------------------- helpers


def module_loss(
    model: nn.Module, criterion: Callable[[Tensor, Tensor], Tensor] | None = None
) -> LossFn:
    """``loss_fn(params, (inputs, targets))`` of a module, through ``functional_call``.

    ``params`` is a dict name -> tensor (see :func:`parameters_of`); the module's own
    parameters are not used. ``criterion(outputs, targets)`` defaults to
    ``torch.nn.functional.mse_loss``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    crit = torch.nn.functional.mse_loss if criterion is None else criterion
    if not callable(crit):
        raise TypeError(f"`criterion` must be callable, got {type(crit).__name__}.")

    def loss_fn(params: Any, batch: Any) -> Tensor:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                "With an nn.Module, each batch (support or query) must be a pair "
                f"(inputs, targets); got {type(batch).__name__}."
            )
        inputs, targets = batch
        return crit(torch.func.functional_call(model, params, (inputs,)), targets)

    return loss_fn


def parameters_of(model: nn.Module) -> dict[str, Tensor]:
    """The module's parameters as a dict of detached copies (a starting ``meta_params``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _as_loss(model_or_loss: Any, criterion: Any) -> LossFn:
    if isinstance(model_or_loss, nn.Module):
        return module_loss(model_or_loss, criterion)
    if criterion is not None:
        raise TypeError("`criterion` is only used with an nn.Module as `model_or_loss`.")
    if not callable(model_or_loss):
        raise TypeError(
            "`model_or_loss` must be an nn.Module or a callable loss_fn(params, batch) -> "
            f"scalar tensor, got {type(model_or_loss).__name__}."
        )
    return model_or_loss


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {type(value).__name__}.")
    if value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return int(value)


def _positive_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}.")
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")
    return v


def _inner_optimizer(lr: Any, optimizer: Any, lr_name: str, opt_name: str) -> FunctionalOptimizer:
    if (lr is None) == (optimizer is None):
        raise ValueError(
            f"Pass exactly one of `{lr_name}` (plain gradient descent) and `{opt_name}` "
            "(hg.optim.sgd(...) or hg.optim.adam(...))."
        )
    if optimizer is None:
        return sgd(lr=_positive_float(lr, lr_name))
    if not isinstance(optimizer, FunctionalOptimizer):
        raise TypeError(
            f"`{opt_name}` must be a functional optimizer from hypergradient.optim "
            f"(hg.optim.sgd(...), hg.optim.adam(...)), got {type(optimizer).__name__}."
        )
    wd = optimizer.settings.get("weight_decay", 0.0)
    if isinstance(wd, Tensor) or wd != 0:
        raise ValueError(
            f"`{opt_name}` has weight_decay={wd!r}: MAML's change of variables would apply it "
            "to phi - theta and iMAML's implicit gradient would ignore it. Put the penalty in "
            "the loss instead."
        )
    return optimizer


def _check_solver(solver: Any) -> Solver:
    if solver is None:
        return CG(maxiter=20, tol=1e-6)
    if not isinstance(solver, Solver):
        raise TypeError(
            f"`solver` must be a hypergradient solver such as hg.CG(), got {type(solver).__name__}."
        )
    return solver


def _check_task(task: Any, name: str = "task") -> tuple[Any, Any]:
    if not isinstance(task, (tuple, list)) or len(task) != 2:
        raise TypeError(f"`{name}` must be a pair (support, query) of batches, got {task!r:.80}.")
    return task[0], task[1]


def _check_tasks(tasks: Any) -> list[tuple[Any, Any]]:
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence):
        raise TypeError(
            f"`tasks` must be a sequence of (support, query) pairs, got {type(tasks).__name__}."
        )
    if len(tasks) == 0:
        raise ValueError("`tasks` is empty; pass at least one (support, query) pair.")
    return [_check_task(t, f"tasks[{i}]") for i, t in enumerate(tasks)]


def _flatten(tree: Tree, name: str) -> tuple[list[Tensor], TreeSpec]:
    leaves, spec = _tree.flatten(tree, name)
    _tree.check_leaves(leaves, spec, name)
    return [t.detach() for t in leaves], spec


def _leaves(tree: Tree) -> list[Tensor]:
    return _tree.flatten(tree, "params")[0]


def _loss_value(loss_fn: LossFn, params: Tree, batch: Any) -> float:
    with torch.no_grad():
        return float(_check_scalar(loss_fn(params, batch), "loss_fn"))


def _gradient(
    objective: Callable[[Tree], Tensor], leaves: list[Tensor], spec: TreeSpec, name: str
) -> tuple[list[Tensor], Tensor]:
    """Gradient of ``objective(tree)`` with respect to the leaves (zeros where unused)."""
    with torch.enable_grad():
        q = [t.detach().requires_grad_(True) for t in leaves]
        value = _check_scalar(objective(_tree.unflatten(spec, q)), name)
        if not value.requires_grad:
            return [torch.zeros_like(t) for t in leaves], value.detach()
        grads = torch.autograd.grad(value, q, allow_unused=True)
    out = [torch.zeros_like(t) if g is None else g.detach() for t, g in zip(leaves, grads)]
    return out, value.detach()


def _descend(
    objective: Callable[[Tree], Tensor],
    leaves: list[Tensor],
    spec: TreeSpec,
    steps: int,
    optimizer: FunctionalOptimizer,
) -> tuple[list[Tensor], list[float]]:
    """``steps`` optimizer steps on ``objective`` from ``leaves``; returns leaves and losses."""
    p = [t.detach() for t in leaves]
    state = optimizer.init(p)
    losses = []
    for t in range(steps):
        g, value = _gradient(objective, p, spec, "loss_fn")
        losses.append(float(value))
        with torch.no_grad():
            p, state = optimizer.update(p, g, state, t)
        p = [x.detach() for x in p]
        state = [x.detach() for x in state]
    return p, losses


def _proximal(loss_fn: LossFn, batch: Any, lam: float) -> Callable[[Tree, Tree], Tensor]:
    """``f(phi, theta) = loss_fn(phi, batch) + lam/2 ||phi - theta||^2``."""

    def f(phi: Tree, theta: Tree) -> Tensor:
        prox = sum(((a - b) ** 2).sum() for a, b in zip(_leaves(phi), _leaves(theta)))
        return loss_fn(phi, batch) + 0.5 * lam * prox

    return f


# ----------------------------------------------------------------------------- diagnostics


@dataclass
class TaskInfo:
    """Diagnostics of one task's adaptation and meta-gradient.

    Attributes:
        support_loss_before: support loss at ``theta`` (before adaptation).
        support_loss_after: support loss at the adapted parameters ``phi``.
        query_loss: query loss at ``phi``: the task's meta-objective.
        inner_grad_norm: iMAML: ``||grad_phi f(phi, theta)||`` of the proximal objective at
            ``phi``; the implicit formula is exact only where it is zero. None for MAML.
        num_hvps: iMAML: Hessian-vector products spent by the solver (0 for MAML, and in a
            vectorized meta-batch, where :class:`MetaInfo` reports the joint solve).
        relative_residual: iMAML: ``||b - (H + lam I) x|| / ||b||`` of the linear solve.
        converged: iMAML: whether the solver met its tolerance.
        status: the solver's status (iMAML), "unrolled" or "first_order" (MAML).
        seconds: wall time (0 in a vectorized meta-batch).
    """

    support_loss_before: float
    support_loss_after: float
    query_loss: float
    inner_grad_norm: float | None = None
    num_hvps: int = 0
    relative_residual: float | None = None
    converged: bool | None = None
    status: str = ""
    seconds: float = 0.0


@dataclass
class MetaInfo:
    """Diagnostics of a meta-batch.

    Attributes:
        method: "imaml", "maml" or "fomaml".
        tasks: one :class:`TaskInfo` per task.
        seconds: wall time of the meta-batch.
        vectorized: whether the tasks were processed as one stacked problem.
        num_hvps: iMAML: solver products, all tasks together.
        relative_residual: iMAML: the largest relative residual of the solves (the joint
            solve's when vectorized). None for MAML.
        converged: iMAML: whether every solve met its tolerance. None for MAML.
    """

    method: str
    tasks: list[TaskInfo] = field(repr=False)
    seconds: float = 0.0
    vectorized: bool = False
    num_hvps: int = 0
    relative_residual: float | None = None
    converged: bool | None = None

    @property
    def query_loss(self) -> float:
        """Mean query loss after adaptation: the meta-objective of the batch."""
        return sum(t.query_loss for t in self.tasks) / len(self.tasks)

    @property
    def support_loss_before(self) -> float:
        """Mean support loss at ``theta``."""
        return sum(t.support_loss_before for t in self.tasks) / len(self.tasks)

    @property
    def support_loss_after(self) -> float:
        """Mean support loss after adaptation."""
        return sum(t.support_loss_after for t in self.tasks) / len(self.tasks)

    @property
    def max_inner_grad_norm(self) -> float | None:
        """iMAML: the largest ``||grad_phi f||`` over the tasks (stationarity of ``phi``)."""
        values = [t.inner_grad_norm for t in self.tasks if t.inner_grad_norm is not None]
        return max(values) if values else None


def _summarize(
    name: str, infos: list[TaskInfo], started: float, vectorized: bool = False, joint: Any = None
) -> MetaInfo:
    if joint is not None:  # one solve for the whole stacked meta-batch
        hvps, residual, converged = joint.num_hvps, joint.relative_residual, joint.converged
    elif name == "imaml":
        hvps = sum(t.num_hvps for t in infos)
        residuals = [t.relative_residual for t in infos if t.relative_residual is not None]
        residual = max(residuals) if residuals else None
        flags = [t.converged for t in infos]
        converged = None if any(c is None for c in flags) else all(flags)  # type: ignore[arg-type]
    else:
        hvps, residual, converged = 0, None, None
    return MetaInfo(
        method=name,
        tasks=infos,
        seconds=time.perf_counter() - started,
        vectorized=vectorized,
        num_hvps=hvps,
        relative_residual=residual,
        converged=converged,
    )


# ----------------------------------------------------------------------------- stacked tasks


def _stack_batches(batches: list[Any], name: str) -> Any:
    """Stack the tasks' batches leaf by leaf along a new leading dimension."""
    first, spec0 = _tree.flatten(batches[0], f"{name}[0]")
    columns = [[t] for t in first]
    for i, b in enumerate(batches[1:], 1):
        leaves, spec = _tree.flatten(b, f"{name}[{i}]")
        if spec.structure() != spec0.structure() or spec.shapes != spec0.shapes:
            raise ValueError(
                "vectorize=True needs batches of one structure and shape in every task: "
                f"{name}[0] has shapes {[tuple(s) for s in spec0.shapes]}, {name}[{i}] has "
                f"{[tuple(s) for s in spec.shapes]}. Use vectorize=False for ragged tasks."
            )
        for c, t in zip(columns, leaves):
            c.append(t)
    return _tree.unflatten(spec0, [torch.stack(c) for c in columns])


class _Stacked:
    """A meta-batch of ``B`` tasks as one block-separable problem on stacked parameters.

    Parameters ``Phi`` have a leading dimension ``B`` (``Phi[b]`` is task ``b``'s); the
    summed loss ``sum_b L(Phi[b], batch_b)`` has ``grad_{Phi[b]} = grad L(Phi[b], batch_b)``,
    so elementwise optimizers (SGD, momentum, Adam) run the ``B`` adaptations exactly as
    separate runs would, and its Hessian is block diagonal. Losses are evaluated with
    ``torch.func.vmap`` over tasks.
    """

    def __init__(self, loss_fn: LossFn, pairs: list[tuple[Any, Any]], spec: TreeSpec):
        self.B = len(pairs)
        self.spec = spec
        self.support = _stack_batches([s for s, _ in pairs], "support")
        self.query = _stack_batches([q for _, q in pairs], "query")
        self.per_task = torch.func.vmap(loss_fn)

    def losses(self, phi: Tree, batch: Any) -> Tensor:
        """Per-task losses, shape ``(B,)``."""
        return self.per_task(phi, batch).reshape(self.B)

    def expand(self, leaves: list[Tensor]) -> list[Tensor]:
        return [t.unsqueeze(0).expand(self.B, *t.shape).clone() for t in leaves]

    def values(self, phi: Tree, batch: Any) -> list[float]:
        with torch.no_grad():
            return self.losses(phi, batch).tolist()

    def task_infos(self, theta_leaves: list[Tensor], phi: Tree) -> list[TaskInfo]:
        theta = _tree.unflatten(self.spec, self.expand(theta_leaves))
        before = self.values(theta, self.support)
        after = self.values(phi, self.support)
        query = self.values(phi, self.query)
        return [TaskInfo(b, a, q) for b, a, q in zip(before, after, query)]


# ----------------------------------------------------------------------------- adaptation


def adapt(
    model_or_loss: nn.Module | LossFn,
    params: Tree,
    support: Any,
    *,
    steps: int,
    lr: float | None = None,
    optimizer: FunctionalOptimizer | None = None,
    lam: float = 0.0,
    criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tree:
    """Adapt ``params`` to a task: ``steps`` optimizer steps on the support loss.

    Minimizes ``L_S(phi) + lam/2 ||phi - params||^2`` from ``phi = params`` (``lam = 0``:
    plain fine-tuning, MAML's inner loop; ``lam > 0``: iMAML's proximal inner problem),
    with gradient descent of step ``lr`` or the functional ``optimizer``
    (``hg.optim.sgd(...)``, ``hg.optim.adam(...)``). Returns the adapted parameters,
    detached, with the structure of ``params``. Cost: ``steps`` gradients; memory O(P).
    """
    loss_fn = _as_loss(model_or_loss, criterion)
    steps = _positive_int(steps, "steps")
    opt = _inner_optimizer(lr, optimizer, "lr", "optimizer")
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not lam >= 0:
        raise ValueError(f"`lam` must be a number >= 0, got {lam!r}.")
    leaves, spec = _flatten(params, "params")
    theta = _tree.unflatten(spec, leaves)
    if lam > 0:
        f = _proximal(loss_fn, support, float(lam))

        def objective(phi: Tree) -> Tensor:
            return f(phi, theta)
    else:

        def objective(phi: Tree) -> Tensor:
            return loss_fn(phi, support)

    out, _ = _descend(objective, leaves, spec, steps, opt)
    return _tree.unflatten(spec, out)


# ----------------------------------------------------------------------------- iMAML


class IMAML:
    """Implicit MAML (Rajeswaran et al., 2019): meta-gradients by implicit differentiation.

    For a task ``(support, query)`` the adapted parameters are (approximately)

        phi* = argmin_phi  L_S(phi) + lam/2 ||phi - theta||^2,

    found by ``inner_steps`` steps of gradient descent (``inner_lr``) or of
    ``inner_optimizer`` from ``phi = theta``, and the meta-gradient is

        (I + H / lam)^{-1} grad L_Q(phi*),     H = Hessian of L_S at phi*,

    computed by :func:`hypergradient.implicit` on ``f(phi, theta)`` with ``theta`` as the
    hyperparameters (the mixed derivative of the proximal term is ``-lam I``, which turns the
    implicit-function-theorem formula into the one above); the linear system
    ``(H + lam I) x = grad L_Q`` is solved by ``solver`` (default ``hg.CG(maxiter=20,
    tol=1e-6)``; Rajeswaran et al. use 5 to 20 CG steps).

    Args:
        model_or_loss: ``loss_fn(params, batch) -> scalar`` or an ``nn.Module`` (see the
            module docstring).
        lam: proximal strength ``lambda > 0``: large values keep ``phi`` near ``theta``
            (and make the system well conditioned), small values let it adapt more.
        inner_steps: optimizer steps of the inner problem.
        inner_lr: step of plain gradient descent; or
        inner_optimizer: ``hg.optim.sgd(...)`` / ``hg.optim.adam(...)``.
        solver: any solver of :mod:`hypergradient.solvers` (CG, Neumann, Nystrom, Exact...).
        damping: ``d >= 0`` added to the system's diagonal: solves
            ``(H + (lam + d) I) x = grad L_Q`` and returns ``lam x``. Zero (the default) is
            iMAML; ``d > 0`` regularizes a non-convex support loss whose ``H + lam I`` is
            indefinite at ``phi`` (CG then stops with a warning).
        vectorize: in :meth:`step`, process the meta-batch as one stacked problem (see
            below).
        criterion: loss on the module's outputs (``nn.Module`` only; default MSE).

    The formula is exact at an exact minimizer; :attr:`TaskInfo.inner_grad_norm` says how
    far ``phi`` is from one. Cost per task: ``inner_steps`` gradients, then about
    ``k + 3`` gradients for ``k`` solver products; memory O(P) plus one double-backward
    graph of the support loss, independent of ``inner_steps``.

    ``vectorize=True`` stacks the ``B`` tasks (their batches must have equal shapes, and
    the loss must work under ``torch.func.vmap``) into one block-separable inner problem
    ``sum_b f(phi_b, theta)`` with outer loss ``mean_b L_Q(phi_b)``: one inner loop and
    one linear solve (block diagonal) for the whole batch, much faster for small models.
    Its exact solution is the mean of the per-task meta-gradients; with a fixed solver
    budget the joint solve is a different (usually better) approximation than ``B``
    separate ones, since its Krylov space is that of the whole block-diagonal system.
    """

    def __init__(
        self,
        model_or_loss: nn.Module | LossFn,
        *,
        lam: float,
        inner_steps: int,
        inner_lr: float | None = None,
        inner_optimizer: FunctionalOptimizer | None = None,
        solver: Solver | None = None,
        damping: float = 0.0,
        vectorize: bool = False,
        criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
    ):
        self.loss_fn = _as_loss(model_or_loss, criterion)
        self.lam = _positive_float(lam, "lam")
        self.inner_steps = _positive_int(inner_steps, "inner_steps")
        self.inner_optimizer = _inner_optimizer(
            inner_lr, inner_optimizer, "inner_lr", "inner_optimizer"
        )
        self.solver = _check_solver(solver)
        if isinstance(damping, bool) or not isinstance(damping, numbers.Real) or not damping >= 0:
            raise ValueError(f"`damping` must be a number >= 0, got {damping!r}.")
        self.damping = float(damping)
        self.vectorize = _check_bool(vectorize, "vectorize")

    def __repr__(self) -> str:
        return (
            f"IMAML(lam={self.lam!r}, inner_steps={self.inner_steps}, "
            f"inner_optimizer={self.inner_optimizer!r}, solver={self.solver!r}, "
            f"damping={self.damping!r}, vectorize={self.vectorize})"
        )

    def adapt(self, meta_params: Tree, support: Any) -> Tree:
        """The inner solution ``phi ~ argmin L_S(phi) + lam/2 ||phi - theta||^2`` (detached)."""
        return adapt(
            self.loss_fn,
            meta_params,
            support,
            steps=self.inner_steps,
            optimizer=self.inner_optimizer,
            lam=self.lam,
        )

    def _implicit(self, f: Any, g: Any, phi: Tree, theta: Tree) -> tuple[Tree, Any]:
        hyper, info = implicit(
            f, g, phi, theta, self.solver, damping=self.damping, return_info=True
        )
        return hyper, info

    def meta_gradient(self, meta_params: Tree, task: Task) -> tuple[Tree, TaskInfo]:
        """iMAML meta-gradient of one task ``(support, query)`` and its diagnostics."""
        started = time.perf_counter()
        support, query = _check_task(task)
        leaves, spec = _flatten(meta_params, "meta_params")
        theta = _tree.unflatten(spec, leaves)
        before = _loss_value(self.loss_fn, theta, support)
        phi = self.adapt(theta, support)
        loss_fn = self.loss_fn

        def outer(p: Tree, h: Tree) -> Tensor:
            return loss_fn(p, query)

        grad, info = self._implicit(_proximal(loss_fn, support, self.lam), outer, phi, theta)
        task_info = TaskInfo(
            support_loss_before=before,
            support_loss_after=_loss_value(loss_fn, phi, support),
            query_loss=info.outer_loss,
            inner_grad_norm=info.inner_grad_norm,
            num_hvps=info.num_hvps,
            relative_residual=info.relative_residual,
            converged=info.converged,
            status=info.status,
            seconds=time.perf_counter() - started,
        )
        return grad, task_info

    def step(self, meta_params: Tree, tasks: Sequence[Task]) -> tuple[Tree, MetaInfo]:
        """Mean iMAML meta-gradient over a meta-batch of tasks, and diagnostics."""
        if not self.vectorize:
            return _loop(self, "imaml", meta_params, tasks)
        started = time.perf_counter()
        pairs = _check_tasks(tasks)
        leaves, spec = _flatten(meta_params, "meta_params")
        theta = _tree.unflatten(spec, leaves)
        st = _Stacked(self.loss_fn, pairs, spec)
        lam = self.lam

        def f(phi: Tree, h: Tree) -> Tensor:
            prox = sum(((a - b.unsqueeze(0)) ** 2).sum() for a, b in zip(_leaves(phi), _leaves(h)))
            return st.losses(phi, st.support).sum() + 0.5 * lam * prox

        def g(phi: Tree, h: Tree) -> Tensor:
            return st.losses(phi, st.query).mean()

        phi_leaves, _ = _descend(
            lambda p: f(p, theta), st.expand(leaves), spec, self.inner_steps, self.inner_optimizer
        )
        phi = _tree.unflatten(spec, phi_leaves)
        grad, info = self._implicit(f, g, phi, theta)
        infos = st.task_infos(leaves, phi)
        blocks, _ = _gradient(lambda p: f(p, theta), phi_leaves, spec, "loss_fn")
        norms = torch.stack([x.reshape(st.B, -1).pow(2).sum(1) for x in blocks]).sum(0).sqrt()
        for t, n in zip(infos, norms.tolist()):
            t.inner_grad_norm, t.status = n, info.status
        return grad, _summarize("imaml", infos, started, vectorized=True, joint=info)


# ----------------------------------------------------------------------------- MAML


class MAML:
    """MAML (Finn et al., 2017): meta-gradient through ``inner_steps`` adaptation steps.

    For a task ``(support, query)``: ``phi_0 = theta``, ``inner_steps`` steps of gradient
    descent (``inner_lr``) or of ``inner_optimizer`` on the support loss give ``phi_K``, and
    the meta-gradient is ``d L_Q(phi_K) / d theta``:

    - ``first_order=False`` (default): exact, second order, by reverse mode through the
      ``K`` steps with :func:`hypergradient.unrolled` and the change of variables
      ``phi = theta + delta`` (see the module docstring). For plain gradient descent it
      equals ``prod_{k=K-1..0} (I - alpha H_k) grad L_Q(phi_K)``, ``H_k`` the support
      Hessian at ``phi_k``. Cost: ``K`` forward steps and ``K`` reverse steps (a
      ``torch.func.vjp`` of one step each, about 3-4 gradients); memory ``K`` states
      (``checkpoint_every=c``: about ``K/c + c``).
    - ``first_order=True``: first-order MAML, ``grad L_Q(phi_K)`` (the Hessians are
      dropped). Cost ``K + 1`` gradients; memory O(P).

    Args:
        model_or_loss: ``loss_fn(params, batch) -> scalar`` or an ``nn.Module``. For the
            second-order meta-gradient it must work under ``torch.func`` transforms (no
            in-place updates of its inputs; ``functional_call`` is fine).
        inner_steps: ``K``.
        inner_lr / inner_optimizer: as :class:`IMAML` (exactly one).
        first_order: first-order MAML.
        checkpoint_every: passed to :func:`hypergradient.unrolled`.
        vectorize: in :meth:`step`, run the meta-batch as one stacked, block-separable
            problem (equal batch shapes, a ``vmap``-compatible loss): ``phi_b = theta +
            delta_b``, inner loss ``sum_b L_S(phi_b)``, outer loss ``mean_b L_Q(phi_b)``,
            one :func:`hypergradient.unrolled` call. Since each ``delta_b`` sees only its
            own task's gradient and the optimizers are elementwise, this is exactly the
            mean of the per-task meta-gradients, ``B`` times fewer Python-level calls.
        criterion: loss on the module's outputs (``nn.Module`` only; default MSE).
    """

    def __init__(
        self,
        model_or_loss: nn.Module | LossFn,
        *,
        inner_steps: int,
        inner_lr: float | None = None,
        inner_optimizer: FunctionalOptimizer | None = None,
        first_order: bool = False,
        checkpoint_every: int | None = None,
        vectorize: bool = False,
        criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
    ):
        self.loss_fn = _as_loss(model_or_loss, criterion)
        self.inner_steps = _positive_int(inner_steps, "inner_steps")
        self.inner_optimizer = _inner_optimizer(
            inner_lr, inner_optimizer, "inner_lr", "inner_optimizer"
        )
        self.first_order = _check_bool(first_order, "first_order")
        self.checkpoint_every = (
            None
            if checkpoint_every is None
            else _positive_int(checkpoint_every, "checkpoint_every")
        )
        self.vectorize = _check_bool(vectorize, "vectorize")

    def __repr__(self) -> str:
        return (
            f"MAML(inner_steps={self.inner_steps}, inner_optimizer={self.inner_optimizer!r}, "
            f"first_order={self.first_order}, vectorize={self.vectorize})"
        )

    @property
    def _name(self) -> str:
        return "fomaml" if self.first_order else "maml"

    def adapt(self, meta_params: Tree, support: Any) -> Tree:
        """``phi_K``: ``inner_steps`` optimizer steps on the support loss from ``theta``."""
        return adapt(
            self.loss_fn,
            meta_params,
            support,
            steps=self.inner_steps,
            optimizer=self.inner_optimizer,
        )

    def _unrolled(
        self,
        support_loss: Callable[[Tree], Tensor],
        query_loss: Callable[[Tree], Tensor],
        leaves: list[Tensor],
        delta_leaves: list[Tensor],
        spec: TreeSpec,
    ) -> tuple[Tree, Tree, list[float]]:
        """``d query_loss(theta + delta_K) / d theta`` by ``hg.unrolled``; also ``phi_K``."""

        def shifted(delta: Tree, h: Tree) -> Tree:
            return _tree.unflatten(spec, [a + b for a, b in zip(_leaves(h), _leaves(delta))])

        def inner(delta: Tree, h: Tree) -> Tensor:
            return support_loss(shifted(delta, h))

        def outer(delta: Tree, h: Tree) -> Tensor:
            return query_loss(shifted(delta, h))

        theta = _tree.unflatten(spec, leaves)
        grad, info = unrolled(
            inner,
            outer,
            _tree.unflatten(spec, delta_leaves),
            theta,
            self.inner_steps,
            self.inner_optimizer,
            checkpoint_every=self.checkpoint_every,
            return_info=True,
        )
        return grad, shifted(info.params, theta), info.inner_losses

    def meta_gradient(self, meta_params: Tree, task: Task) -> tuple[Tree, TaskInfo]:
        """MAML meta-gradient of one task ``(support, query)`` and its diagnostics."""
        started = time.perf_counter()
        support, query = _check_task(task)
        leaves, spec = _flatten(meta_params, "meta_params")
        theta = _tree.unflatten(spec, leaves)
        loss_fn = self.loss_fn
        before = _loss_value(loss_fn, theta, support)
        if self.first_order:
            phi = self.adapt(theta, support)
            g, _ = _gradient(lambda p: loss_fn(p, query), _leaves(phi), spec, "loss_fn")
            grad = _tree.unflatten(spec, g)
        else:
            grad, phi, _ = self._unrolled(
                lambda p: loss_fn(p, support),
                lambda p: loss_fn(p, query),
                leaves,
                [torch.zeros_like(t) for t in leaves],
                spec,
            )
        task_info = TaskInfo(
            support_loss_before=before,
            support_loss_after=_loss_value(loss_fn, phi, support),
            query_loss=_loss_value(loss_fn, phi, query),
            status="first_order" if self.first_order else "unrolled",
            seconds=time.perf_counter() - started,
        )
        return grad, task_info

    def step(self, meta_params: Tree, tasks: Sequence[Task]) -> tuple[Tree, MetaInfo]:
        """Mean MAML meta-gradient over a meta-batch of tasks, and diagnostics."""
        if not self.vectorize:
            return _loop(self, self._name, meta_params, tasks)
        started = time.perf_counter()
        pairs = _check_tasks(tasks)
        leaves, spec = _flatten(meta_params, "meta_params")
        st = _Stacked(self.loss_fn, pairs, spec)

        def support_loss(phi: Tree) -> Tensor:
            return st.losses(phi, st.support).sum()  # sum: each task keeps its own gradient

        def query_loss(phi: Tree) -> Tensor:
            return st.losses(phi, st.query).mean()

        if self.first_order:
            phi_leaves, _ = _descend(
                support_loss, st.expand(leaves), spec, self.inner_steps, self.inner_optimizer
            )
            phi = _tree.unflatten(spec, phi_leaves)
            g, _ = _gradient(query_loss, phi_leaves, spec, "loss_fn")
            grad = _tree.unflatten(spec, [x.sum(0) for x in g])
        else:
            zeros = [torch.zeros((st.B, *t.shape), dtype=t.dtype, device=t.device) for t in leaves]
            grad, phi, _ = self._unrolled(support_loss, query_loss, leaves, zeros, spec)
        infos = st.task_infos(leaves, phi)
        for t in infos:
            t.status = "first_order" if self.first_order else "unrolled"
        return grad, _summarize(self._name, infos, started, vectorized=True)


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {type(value).__name__}.")
    return value


def _loop(
    method: IMAML | MAML, name: str, meta_params: Tree, tasks: Sequence[Task]
) -> tuple[Tree, MetaInfo]:
    """Mean of the per-task meta-gradients, one task at a time."""
    started = time.perf_counter()
    _, spec = _flatten(meta_params, "meta_params")
    pairs = _check_tasks(tasks)
    grads, infos = [], []
    for task in pairs:
        g, info = method.meta_gradient(meta_params, task)
        grads.append(_leaves(g))
        infos.append(info)
    mean = [torch.stack(column).mean(0) for column in zip(*grads)]
    return _tree.unflatten(spec, mean), _summarize(name, infos, started)


# ----------------------------------------------------------------------------- one-call API


def imaml_step(
    model_or_loss: nn.Module | LossFn,
    meta_params: Tree,
    tasks: Sequence[Task],
    *,
    lam: float,
    inner_steps: int,
    inner_lr: float | None = None,
    inner_optimizer: FunctionalOptimizer | None = None,
    solver: Solver | None = None,
    damping: float = 0.0,
    vectorize: bool = False,
    criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> tuple[Tree, MetaInfo]:
    """Mean iMAML meta-gradient over ``tasks`` (pairs ``(support, query)``).

    ``IMAML(model_or_loss, lam=..., inner_steps=..., ...).step(meta_params, tasks)``; see
    :class:`IMAML` for the mathematics, the arguments and the cost. Returns
    ``(meta_gradient, info)``: the gradient has the structure of ``meta_params``.
    """
    return IMAML(
        model_or_loss,
        lam=lam,
        inner_steps=inner_steps,
        inner_lr=inner_lr,
        inner_optimizer=inner_optimizer,
        solver=solver,
        damping=damping,
        vectorize=vectorize,
        criterion=criterion,
    ).step(meta_params, tasks)


def maml_step(
    model_or_loss: nn.Module | LossFn,
    meta_params: Tree,
    tasks: Sequence[Task],
    *,
    inner_steps: int,
    inner_lr: float | None = None,
    inner_optimizer: FunctionalOptimizer | None = None,
    first_order: bool = False,
    checkpoint_every: int | None = None,
    vectorize: bool = False,
    criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> tuple[Tree, MetaInfo]:
    """Mean MAML meta-gradient over ``tasks`` (pairs ``(support, query)``).

    ``MAML(model_or_loss, inner_steps=..., ...).step(meta_params, tasks)``; see
    :class:`MAML` for the mathematics, the arguments and the cost. Returns
    ``(meta_gradient, info)``: the gradient has the structure of ``meta_params``.
    """
    return MAML(
        model_or_loss,
        inner_steps=inner_steps,
        inner_lr=inner_lr,
        inner_optimizer=inner_optimizer,
        first_order=first_order,
        checkpoint_every=checkpoint_every,
        vectorize=vectorize,
        criterion=criterion,
    ).step(meta_params, tasks)
