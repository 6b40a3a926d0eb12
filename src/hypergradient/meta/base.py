"""The driver shared by MAML and iMAML: a meta-batch as task batches, averaged.

An algorithm implements one method, :meth:`MetaLearner.batch_gradient`: the mean
meta-gradient of the tasks of one :class:`~hypergradient.meta.TaskBatch` (one task, or a
stack of them) and their diagnostics. :meth:`MetaLearner.step` splits the meta-batch
(``vectorize``) and averages; :meth:`MetaLearner.meta_gradient` runs one task.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import _tree
from .._tree import Tree, TreeSpec
from .._vocab import as_bool, as_int
from ..optim.functional import FunctionalOptimizer
from ._common import LossFn, Task, as_inner_optimizer, as_loss, flatten_meta_params
from .info import BatchResult, MetaInfo, TaskInfo, summarize
from .tasks import SingleTask, TaskBatch, check_task, task_batches

__all__ = ["MetaLearner", "task_infos"]


def task_infos(batch: TaskBatch, before: list[float], phi: Tree, status: str) -> list[TaskInfo]:
    """Per-task losses before and after adaptation, as :class:`TaskInfo` records."""
    after = batch.task_losses(phi, "support")
    query = batch.task_losses(phi, "query")
    return [TaskInfo(b, a, q, status=status) for b, a, q in zip(before, after, query)]


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
        """Mean meta-gradient (leaves shaped like ``theta``) of ``batch``'s tasks."""
        raise NotImplementedError

    def meta_gradient(self, meta_params: Tree, task: Task) -> tuple[Tree, TaskInfo]:
        """Meta-gradient of one task ``(support, query)`` and its diagnostics."""
        theta, spec = flatten_meta_params(meta_params)
        batch = SingleTask(self.loss_fn, check_task(task))
        grad, info = self._run(theta, spec, [batch], vectorized=False)
        return grad, info.tasks[0]

    def step(self, meta_params: Tree, tasks: Sequence[Task]) -> tuple[Tree, MetaInfo]:
        """Mean meta-gradient over a meta-batch of tasks ``(support, query)``, and diagnostics.

        Returns ``(meta_gradient, info)``: the gradient has the structure, shapes, dtypes
        and device of ``meta_params`` and is detached.
        """
        theta, spec = flatten_meta_params(meta_params)
        batches = task_batches(self.loss_fn, tasks, self.vectorize)
        return self._run(theta, spec, batches, vectorized=self.vectorize)

    def _run(
        self, theta: list[Tensor], spec: TreeSpec, batches: list[TaskBatch], vectorized: bool
    ) -> tuple[Tree, MetaInfo]:
        """Weighted mean of the batches' meta-gradients (weights: their shares of the tasks)."""
        started = time.perf_counter()
        total = sum(b.num_tasks for b in batches)
        results = []
        mean = [torch.zeros_like(t) for t in theta]
        for batch in batches:
            t0 = time.perf_counter()
            result = self.batch_gradient(theta, spec, batch)
            share = (time.perf_counter() - t0) / batch.num_tasks
            for t in result.tasks:
                t.seconds = share
            weight = batch.num_tasks / total
            mean = [m + weight * g.to(m.dtype) for m, g in zip(mean, result.grad)]
            results.append(result)
        info = summarize(self.method, results, started, vectorized)
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
