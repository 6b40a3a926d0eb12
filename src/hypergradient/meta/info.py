"""Diagnostics of meta-gradients: :class:`TaskInfo` per task, :class:`MetaInfo` per meta-batch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .._vocab import Status
from ..methods.base import Info

__all__ = [
    "BatchResult",
    "MetaInfo",
    "SolveSummary",
    "TaskInfo",
    "combine_solves",
    "info_value",
    "summarize",
]


@dataclass
class TaskInfo:
    """Diagnostics of one task's adaptation and meta-gradient.

    Attributes:
        support_loss_before: support loss at ``theta`` (before adaptation).
        support_loss_after: support loss at the adapted parameters ``phi``.
        query_loss: query loss at ``phi``: the task's meta-objective.
        inner_grad_norm: iMAML: ``||grad_phi f(phi, theta)||`` of the proximal objective at
            the task's ``phi``; the implicit formula is exact only where it is zero. None
            for MAML.
        num_hvps: iMAML: Hessian-vector products spent by the linear solve of the task's
            batch (in a vectorized meta-batch, the joint solve shared by all its tasks;
            :attr:`MetaInfo.num_hvps` is the total). 0 for MAML.
        relative_residual: iMAML: ``||b - (H + (lam + damping) I) x|| / ||b||`` of that solve.
        converged: iMAML: whether that solve met its tolerance.
        status: the solve's status (iMAML), ``"unrolled"`` or ``"first_order"`` (MAML);
            ``"diverged"`` when the support loss ended at least 10x above its value at
            ``meta_params`` (:func:`~hypergradient.methods.growth.adaptation_failed`).
        seconds: the task's share of the wall time of its batch (its own wall time when
            tasks run one at a time).
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


@dataclass(kw_only=True)
class MetaInfo(Info):
    """Diagnostics of a meta-batch (an :class:`~hypergradient.Info`).

    Attributes:
        method: ``"imaml"``, ``"maml"`` or ``"fomaml"``.
        tasks: one :class:`TaskInfo` per task.
        seconds: wall time of the meta-batch.
        outer_loss: mean query loss after adaptation (:attr:`query_loss`).
        num_hvps: iMAML: solver products, all tasks together (0 for MAML).
        status: iMAML: the first solve status that is not ``ok``, else the first one's;
            MAML: ``Status.FIXED_BUDGET`` (``K`` steps by design); ``Status.DIVERGED`` when
            a task's adaptation diverged (its :attr:`TaskInfo.status` is ``"diverged"``).
        vectorized: whether the tasks were processed as one stacked problem.
        relative_residual: iMAML: the largest relative residual of the solves (the joint
            solve's when vectorized). None for MAML.
        converged: iMAML: whether every solve met its tolerance. None for MAML.
    """

    tasks: list[TaskInfo] = field(default_factory=list, repr=False)
    vectorized: bool = False
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


def info_value(info: Any, name: str) -> Any:
    """A diagnostic of a functional-API info: its attribute ``name``, else ``stats[name]``."""
    if hasattr(info, name):
        return getattr(info, name)
    return getattr(info, "stats", {}).get(name)


@dataclass
class SolveSummary:
    """What iMAML reports of one linear solve (one per task batch)."""

    num_hvps: int
    relative_residual: float | None
    converged: bool | None
    status: Status

    @classmethod
    def of(cls, info: Any) -> SolveSummary:
        """From the info returned by ``hg.implicit(..., return_info=True)``."""
        return cls(
            num_hvps=int(info_value(info, "num_hvps") or 0),
            relative_residual=info_value(info, "relative_residual"),
            converged=info_value(info, "converged"),
            status=Status(str(info_value(info, "status"))),
        )


@dataclass
class BatchResult:
    """What an algorithm returns for one task batch; the driver adds the per-task records.

    Attributes:
        grad: the mean meta-gradient of the batch's tasks (leaves shaped like ``theta``).
        phi: the adapted parameters (leaves shaped like the batch's ``phi``).
        status: the tasks' :attr:`TaskInfo.status`.
        solve: iMAML: the linear solve of the batch.
        inner_grad_norms: iMAML: per task, ``||grad_phi f||`` at its adapted parameters.
        tasks: one :class:`TaskInfo` per task (filled by the driver).
    """

    grad: list[Tensor]
    phi: list[Tensor]
    status: str
    solve: SolveSummary | None = None
    inner_grad_norms: list[float] | None = None
    tasks: list[TaskInfo] = field(default_factory=list)


def summarize(
    method: str, results: list[BatchResult], started: float, vectorized: bool
) -> MetaInfo:
    """One :class:`MetaInfo` from the results of the meta-batch's task batches."""
    info = MetaInfo(method=method, tasks=[t for r in results for t in r.tasks])
    info.vectorized = vectorized
    info.outer_loss = info.query_loss
    solves = [r.solve for r in results if r.solve is not None]
    if solves:
        combine_solves(info, solves)
    info.seconds = time.perf_counter() - started
    return info


def combine_solves(info: MetaInfo, solves: list[SolveSummary]) -> None:
    """Products summed, the worst residual, every solve converged, the first bad status."""
    info.num_hvps = sum(s.num_hvps for s in solves)
    residuals = [s.relative_residual for s in solves if s.relative_residual is not None]
    info.relative_residual = max(residuals) if residuals else None
    flags = [s.converged for s in solves]
    info.converged = None if None in flags else all(flags)
    bad = [s.status for s in solves if not s.status.ok]
    info.status = bad[0] if bad else solves[0].status
