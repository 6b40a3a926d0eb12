"""iMAML (Rajeswaran, Finn, Kakade & Levine, 2019): meta-gradients by implicit differentiation."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from .. import _tree
from .._tree import Tree, TreeSpec
from .._vocab import HypergradientWarning, Status, as_float
from ..methods.implicit import STATIONARITY, implicit, warn_not_stationary
from ..optim.functional import FunctionalOptimizer
from ..solvers import Exact, Solver
from ._common import (
    LossFn,
    Task,
    adapt,
    as_solver,
    caller_level,
    descend,
    gradient,
    proximal_term,
    refuse_learned_setting,
    require_finite_phi,
)
from .base import MetaLearner
from .info import BatchResult, MetaInfo, SolveSummary
from .modules import relay_warnings
from .tasks import TaskBatch

__all__ = ["IMAML", "imaml_step", "refuse_stacked_exact", "report_solve"]

NOT_SOLVED = "The gradient of iMAML's inner objective L_S(phi) + lam/2 ||phi - theta||^2"
NOT_SOLVED_FIX = (
    "the adapted parameters are not its minimum, and the implicit meta-gradient can be far "
    "off (measured on logistic regression: 20-100 % relative error). Raise inner_steps (or "
    "inner_lr, the inner optimizer's lr); info.tasks[i].inner_grad_norm is each task's norm."
)


class IMAML(MetaLearner):
    """Implicit MAML (Rajeswaran et al., 2019): meta-gradients by implicit differentiation.

    For a task ``(support, query)`` the adapted parameters are (approximately)

        phi* = argmin_phi  f(phi, theta),   f(phi, theta) = L_S(phi) + lam/2 ||phi - theta||^2,

    found by ``inner_steps`` steps of gradient descent (``inner_lr``) or of
    ``inner_optimizer`` from ``phi = theta``, and the meta-gradient is

        d L_Q(phi*) / d theta = (I + H / lam)^{-1} grad L_Q(phi*),     H = Hessian of L_S at phi*,

    computed by :func:`hypergradient.implicit` on ``f`` with ``theta`` as the
    hyperparameters: the Hessian of ``f`` in ``phi`` is ``H + lam I`` and the mixed
    derivative is ``-lam I``, which turns the implicit-function-theorem formula
    ``-(d^2 f / d theta d phi) (H + lam I)^{-1} grad L_Q`` into the one above. The linear
    system ``(H + lam I) x = grad L_Q`` is solved by ``solver`` (default ``hg.CG(maxiter=20,
    tol=1e-6)``; Rajeswaran et al. use 5 to 20 CG steps).

    Args:
        model_or_loss: ``loss_fn(params, batch) -> scalar`` or an ``nn.Module``.
        lam: proximal strength ``lambda > 0``: large values keep ``phi`` near ``theta``
            (and make the system well conditioned), small values let it adapt more.
        inner_steps: optimizer steps of the inner problem (>= 1).
        inner_lr / inner_optimizer: plain gradient descent of step ``inner_lr``, or
            ``hg.optim.sgd(...)`` / ``hg.optim.adam(...)`` (without weight decay); exactly one.
        solver: any solver of :mod:`hypergradient.solvers` (CG, Neumann, Nystrom, Exact...).
        damping: ``d >= 0`` added to the system's diagonal: solves
            ``(H + (lam + d) I) x = grad L_Q`` and returns ``lam x``. Zero (the default) is
            iMAML; ``d > 0`` regularizes a non-convex support loss whose ``H + lam I`` is
            indefinite at ``phi`` (CG then stops with a warning).
        vectorize: in :meth:`step`, process the meta-batch as one
            :class:`~hypergradient.meta.StackedTasks` problem (see below).
        criterion: loss on the module's outputs (``nn.Module`` only; default MSE).

    The formula is exact at an exact minimizer; :attr:`TaskInfo.inner_grad_norm` says how
    far ``phi`` is from one. Cost per task: ``inner_steps`` gradients, then about ``k + 4``
    gradients for ``k`` solver products; memory O(P) plus one double-backward graph of the
    support loss, independent of ``inner_steps``.

    ``vectorize=True`` stacks the ``B`` tasks (their batches must have equal shapes, and
    the loss must work under ``torch.func.vmap``) into one block-separable inner problem
    ``sum_b f(phi_b, theta)`` with outer loss ``mean_b L_Q(phi_b)``: one inner loop and
    one linear solve (block diagonal) for the whole batch, much faster for small models.
    Its exact solution is the mean of the per-task meta-gradients; with a fixed solver
    budget the joint solve is a different (usually better) approximation than ``B``
    separate ones, since its Krylov space is that of the whole block-diagonal system.

    Reference: A. Rajeswaran, C. Finn, S. Kakade, S. Levine, "Meta-Learning with Implicit
    Gradients", NeurIPS 2019.
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
        super().__init__(
            model_or_loss,
            inner_steps=inner_steps,
            inner_lr=inner_lr,
            inner_optimizer=inner_optimizer,
            vectorize=vectorize,
            criterion=criterion,
        )
        refuse_learned_setting(lam, "lam")
        self.lam = as_float(lam, "lam", min=0.0, open_min=True)
        self.solver = as_solver(solver)
        self.damping = as_float(damping, "damping", min=0.0)

    @property
    def method(self) -> str:
        return "imaml"

    def state_dict(self) -> dict[str, Any]:
        """The solver's state (a recycled subspace, a cached sketch, a generator), which
        carries over between meta-steps: tensors and plain data (``weights_only=True``)."""
        return {"solver": self.solver.state_dict()}

    def load_state_dict(self, state: Any) -> None:
        """Restore :meth:`state_dict`; validated by the solver, which changes nothing if it
        does not fit (a checkpoint of another solver)."""
        if not isinstance(state, dict) or set(state) != {"solver"}:
            raise ValueError(
                f"IMAML.load_state_dict takes IMAML.state_dict()'s {{'solver': ...}}, got "
                f"{type(state).__name__} {sorted(state) if isinstance(state, dict) else ''}."
            )
        self.solver.load_state_dict(state["solver"])

    def config(self) -> dict[str, Any]:
        return {
            "lam": self.lam,
            "inner_steps": self.inner_steps,
            "inner_optimizer": self.inner_optimizer,
            "solver": self.solver,
            "damping": self.damping,
            "vectorize": self.vectorize,
        }

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

    def batch_gradient(self, theta: list[Tensor], spec: TreeSpec, batch: TaskBatch) -> BatchResult:
        """Mean iMAML meta-gradient of ``batch``'s tasks, and their diagnostics."""
        lam = self.lam
        theta_tree = _tree.unflatten(spec, theta)
        refuse_stacked_exact(self.solver, batch.num_tasks, sum(t.numel() for t in theta))

        def f(phi: Tree, h: Tree) -> Tensor:
            return batch.support_loss(phi) + 0.5 * lam * proximal_term(phi, h)

        def g(phi: Tree, h: Tree) -> Tensor:
            return batch.query_loss(phi)

        def f_at_theta(phi: Tree) -> Tensor:
            return f(phi, theta_tree)

        phi = descend(f_at_theta, batch.start(theta), spec, self.inner_steps, self.inner_optimizer)
        require_finite_phi(phi, spec)
        grad, info = relay_warnings(  # a solver's warnings at the user's line
            lambda: implicit(
                f,
                g,
                _tree.unflatten(spec, phi),
                theta_tree,
                self.solver,
                damping=self.damping,
                return_info=True,
                stationarity=None,  # checked below, in iMAML's words
            ),
            drop=lambda text: "solved an indefinite Hessian" in text,  # below, in iMAML's
        )
        inner = batch.task_norms(gradient(f_at_theta, phi, spec)[0])
        outer = None  # each stacked task's own query gradient (the query loss is their mean)
        if batch.num_tasks > 1:
            norms = batch.task_norms(gradient(batch.query_loss, phi, spec)[0])
            outer = [n * batch.num_tasks for n in norms]
        solve = SolveSummary.of(info)
        report_solve(info, solve, inner, outer)
        return BatchResult(
            grad=[x.detach() for x in _tree.flatten(grad, "grad")[0]],
            phi=phi,
            status=solve.status,
            solve=solve,
            inner_grad_norms=inner,
        )


def refuse_stacked_exact(solver: Solver, tasks: int, size: int) -> None:
    """Refuse, before the adaptation, a dense solve of ``tasks`` stacked tasks that
    ``Exact`` cannot materialize, naming ``vectorize=False`` (one solve per task)."""
    if tasks > 1 and isinstance(solver, Exact) and tasks * size > solver.max_size:
        raise ValueError(
            f"vectorize=True stacks the {tasks} tasks into one system of {tasks * size} "
            f"unknowns, above Exact's max_size={solver.max_size} (each task has "
            f"{size}): use vectorize=False (one {size} x {size} solve per task), hg.CG(), "
            "or raise max_size."
        )


def report_solve(
    info: Any, solve: SolveSummary, inner: list[float], outer: list[float] | None
) -> None:
    """Warn (at the caller's line) about adapted parameters that are no minimum: not
    stationary (per task: ``inner`` and ``outer`` norms of a stack's tasks; else the
    solve's own), or at an indefinite system (a dense solve's eigenvalues)."""
    level = caller_level() + 1
    if outer is None:
        warn_not_stationary(info, STATIONARITY, NOT_SOLVED, NOT_SOLVED_FIX, level)
    else:
        ratios = [a / max(c, 1e-300) for a, c in zip(inner, outer)]
        worst = max(range(len(ratios)), key=ratios.__getitem__)
        check = copy.copy(info)
        check.inner_grad_norm, check.outer_grad_norm = inner[worst], outer[worst]
        many = sum(r > STATIONARITY for r in ratios)
        what = f"{NOT_SOLVED} (tasks[{worst}], the worst of {many} of {len(ratios)} tasks)"
        warn_not_stationary(check, STATIONARITY, what, NOT_SOLVED_FIX, level)
    negative = int(info.stats.get("negative_eigenvalues") or 0)  # a dense solve's count
    if negative and solve.status.ok:
        solve.status = Status.NEGATIVE_CURVATURE
        lowest = float(info.stats.get("lambda_min", math.nan))
        warnings.warn(
            f"The iMAML system H + (lam + damping) I is indefinite at the adapted "
            f"parameters ({negative} negative eigenvalue(s), the lowest {lowest:.3g}): "
            "they are no minimum of the inner objective, and the meta-gradient is that of "
            "a stationary point the adaptation does not stay at (an iterative solver "
            "reports negative_curvature). Raise lam, or damping above "
            f"{-lowest:.3g}.",
            HypergradientWarning,
            stacklevel=level - 1,
        )


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
