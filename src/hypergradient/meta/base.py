"""The driver shared by MAML and iMAML: a meta-batch as task batches, averaged.

An algorithm implements one method, :meth:`MetaLearner.batch_gradient`: the mean
meta-gradient of the tasks of one :class:`~hypergradient.meta.TaskBatch` (one task, or a
stack of them) and their diagnostics. :meth:`MetaLearner.step` splits the meta-batch
(``vectorize``) and averages; :meth:`MetaLearner.meta_gradient` runs one task.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import _tree
from .._tree import Tree, TreeSpec
from .._vocab import (
    HypergradientWarning,
    NonFiniteHypergradientError,
    Status,
    as_bool,
    as_int,
    require_finite,
)
from ..methods.growth import ADAPT_GROWTH, adaptation_failed
from ..optim.functional import FunctionalOptimizer
from ._common import (
    NONFINITE_FIX,
    LossFn,
    Task,
    as_inner_optimizer,
    as_loss,
    autograd_on,
    caller_level,
    check_groups,
    flatten_meta_params,
    require_finite_losses,
)
from .info import BatchResult, MetaInfo, TaskInfo, summarize
from .modules import warn_max_norm
from .tasks import SingleTask, TaskBatch, check_task, task_batches

__all__ = ["MetaLearner", "name_the_task", "report_failed", "task_records"]


def task_records(
    batch: TaskBatch, before: list[float], phi: Tree, result: BatchResult
) -> list[TaskInfo]:
    """Per-task losses before and after adaptation and the batch's solve, as records."""
    after = batch.task_losses(phi, "support")
    query = batch.task_losses(phi, "query")
    norms: list[float | None] = [None] * batch.num_tasks
    if result.inner_grad_norms is not None:
        norms = list(result.inner_grad_norms)
    solve = result.solve
    return [
        TaskInfo(
            support_loss_before=b,
            support_loss_after=a,
            query_loss=q,
            inner_grad_norm=n,
            num_hvps=0 if solve is None else solve.num_hvps,
            relative_residual=None if solve is None else solve.relative_residual,
            converged=None if solve is None else solve.converged,
            status=result.status,
        )
        for b, a, q, n in zip(before, after, query, norms)
    ]


def report_failed(tasks: list[TaskInfo], names: list[str]) -> bool:
    """Mark (``status = "diverged"``) and warn about the tasks whose adaptation ended at
    least :data:`~hypergradient.methods.growth.ADAPT_GROWTH` times above its support loss
    at ``meta_params`` (:func:`~hypergradient.methods.growth.adaptation_failed`); whether
    there were any."""
    failed = [
        (n, t)
        for n, t in zip(names, tasks)
        if adaptation_failed(t.support_loss_before, t.support_loss_after)
    ]
    for _, t in failed:
        t.status = Status.DIVERGED.value
    if failed:
        shown = ", ".join(
            f"{n} ({t.support_loss_before:.3g} -> {t.support_loss_after:.3g})"
            for n, t in failed[:3]
        )
        more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
        warnings.warn(
            f"The adaptation diverged on {len(failed)} task(s): its support loss ended at least "
            f"{ADAPT_GROWTH:g}x above its value at meta_params (a loss < 0 there: rose by "
            f"{ADAPT_GROWTH - 1:g}x its magnitude): {shown}{more}. Their "
            "meta-gradient is that of a failed adaptation (info.status is 'diverged'). Lower "
            "inner_lr (or the inner optimizer's lr) or inner_steps.",
            HypergradientWarning,
            stacklevel=caller_level(),
        )
    return bool(failed)


def name_the_task(
    err: NonFiniteHypergradientError,
    batch: TaskBatch,
    theta: list[Tensor],
    spec: TreeSpec,
    names: list[str],
) -> NonFiniteHypergradientError:
    """``err`` (raised by the method on the whole batch) with the task it comes from.

    A task whose query loss at ``meta_params`` is not finite is named as that; otherwise a
    single task is named in front of the method's message (a stack of tasks cannot be
    told apart: the message is kept). The quantity stays the one the method found.
    """
    query = batch.task_losses(_tree.unflatten(spec, batch.start(theta)), "query")
    for name, value in zip(names, query):
        if not math.isfinite(value):
            return NonFiniteHypergradientError(
                f"The query loss at meta_params of {name} is not finite ({value}). Check "
                f"{name}'s query batch and loss_fn. ({err})",
                err.quantity,
            )
    if len(names) == 1:
        return NonFiniteHypergradientError(f"{names[0]}: {err}", err.quantity)
    return err


class MetaLearner:
    """Base class of meta-gradient algorithms (the shared arguments and the batch loop).

    Args:
        model_or_loss: ``loss_fn(params, batch) -> scalar`` or an ``nn.Module``.
        inner_steps: optimizer steps of the adaptation (>= 1).
        inner_lr / inner_optimizer: plain gradient descent of that step, or a functional
            optimizer (``hg.optim.sgd(...)``, ``hg.optim.adam(...)``); exactly one.
        vectorize: in :meth:`step`, run the meta-batch as one stacked problem.
        criterion: loss on the module's outputs (``nn.Module`` only; default MSE).
    """

    def __init__(
        self,
        model_or_loss: nn.Module | LossFn,
        *,
        inner_steps: int,
        inner_lr: float | None,
        inner_optimizer: FunctionalOptimizer | None,
        vectorize: bool,
        criterion: Callable[[Tensor, Tensor], Tensor] | None,
    ):
        self.loss_fn = as_loss(model_or_loss, criterion)
        if isinstance(model_or_loss, nn.Module):
            warn_max_norm(model_or_loss)
        self.inner_steps = as_int(inner_steps, "inner_steps", min=1)
        self.inner_optimizer = as_inner_optimizer(
            inner_lr, inner_optimizer, "inner_lr", "inner_optimizer"
        )
        self.vectorize = as_bool(vectorize, "vectorize")

    @property
    def method(self) -> str:
        """The algorithm's name in :attr:`MetaInfo.method`."""
        raise NotImplementedError

    def batch_gradient(self, theta: list[Tensor], spec: TreeSpec, batch: TaskBatch) -> BatchResult:
        """Mean meta-gradient (leaves shaped like ``theta``) of ``batch``'s tasks, and ``phi``."""
        raise NotImplementedError

    def meta_gradient(self, meta_params: Tree, task: Task) -> tuple[Tree, TaskInfo]:
        """Meta-gradient of one task ``(support, query)`` and its diagnostics."""
        grad_mode = autograd_on(f"{type(self).__name__}.meta_gradient()")
        theta, spec = flatten_meta_params(meta_params, loss_fn=self.loss_fn)
        check_groups(self.inner_optimizer, spec, "meta_params")
        batch = SingleTask(self.loss_fn, check_task(task))
        with grad_mode:
            grad, info = self._run(theta, spec, [batch], vectorized=False, names=["task"])
        return grad, info.tasks[0]

    def step(self, meta_params: Tree, tasks: Sequence[Task]) -> tuple[Tree, MetaInfo]:
        """Mean meta-gradient over a meta-batch of tasks ``(support, query)``, and diagnostics.

        Returns ``(meta_gradient, info)``: the gradient has the structure, shapes, dtypes
        and device of ``meta_params`` and is detached.

        Raises:
            NonFiniteHypergradientError: naming the first non-finite quantity: a task's
                support loss at ``meta_params``, the adapted parameters, a query gradient,
                or the meta-gradient.
            ValueError: under ``torch.inference_mode()`` (``torch.no_grad()`` is fine), or
                a leaf of ``meta_params`` holds NaN or Inf (naming it).
        """
        grad_mode = autograd_on(f"{type(self).__name__}.step()")
        theta, spec = flatten_meta_params(meta_params, loss_fn=self.loss_fn)
        check_groups(self.inner_optimizer, spec, "meta_params")
        batches = task_batches(self.loss_fn, tasks, self.vectorize)
        names = [f"tasks[{i}]" for i in range(sum(b.num_tasks for b in batches))]
        with grad_mode:
            return self._run(theta, spec, batches, vectorized=self.vectorize, names=names)

    def _run(
        self,
        theta: list[Tensor],
        spec: TreeSpec,
        batches: list[TaskBatch],
        vectorized: bool,
        names: list[str],
    ) -> tuple[Tree, MetaInfo]:
        """Weighted mean of the batches' meta-gradients (weights: their shares of the tasks);
        a call that raises leaves the solver's state (IMAML) as it was."""
        solver = getattr(self, "solver", None)  # IMAML's: a failed call puts its state back
        saved = None if solver is None else solver.snapshot()
        try:
            return self._batches(theta, spec, batches, vectorized, names)
        except BaseException:
            if solver is not None:
                solver.restore(saved)
            raise

    def _batches(
        self,
        theta: list[Tensor],
        spec: TreeSpec,
        batches: list[TaskBatch],
        vectorized: bool,
        names: list[str],
    ) -> tuple[Tree, MetaInfo]:
        started = time.perf_counter()
        mean = [torch.zeros_like(t) for t in theta]
        results, done = [], 0
        for batch in batches:
            t0 = time.perf_counter()
            before = batch.task_losses(_tree.unflatten(spec, batch.start(theta)), "support")
            here = names[done : done + batch.num_tasks]
            require_finite_losses(before, here, "the support loss at meta_params of", "support")
            try:
                result = self.batch_gradient(theta, spec, batch)
            except NonFiniteHypergradientError as err:
                raise name_the_task(err, batch, theta, spec, here) from err
            result.tasks = task_records(batch, before, _tree.unflatten(spec, result.phi), result)
            share = (time.perf_counter() - t0) / batch.num_tasks
            for t in result.tasks:
                t.seconds = share
            weight = batch.num_tasks / len(names)
            mean = [m + weight * g.to(m.dtype) for m, g in zip(mean, result.grad)]
            results.append(result)
            done += batch.num_tasks
        require_finite(mean, spec.paths, "The meta-gradient of", NONFINITE_FIX)
        info = summarize(self.method, results, started, vectorized)
        if report_failed(info.tasks, names):
            info.status = Status.DIVERGED
        return _tree.unflatten(spec, mean), info

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    def config(self) -> dict[str, Any]:
        """The settings, as shown by ``repr``."""
        return {
            "inner_steps": self.inner_steps,
            "inner_optimizer": self.inner_optimizer,
            "vectorize": self.vectorize,
        }
