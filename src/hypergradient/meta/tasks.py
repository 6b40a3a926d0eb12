"""Task batches: the one interface MAML and iMAML are written against.

A :class:`TaskBatch` poses ``n`` tasks ``(support_b, query_b)`` as one *block-separable*
problem on parameters ``phi`` started from the meta-parameters ``theta``:

    support_loss(phi) = sum_b L(phi_b, support_b),     query_loss(phi) = mean_b L(phi_b, query_b).

The gradient of the summed support loss in the block ``phi_b`` is the task's own
``grad L(phi_b, support_b)``, so any elementwise optimizer (SGD, momentum, Adam) adapts the
``n`` tasks exactly as ``n`` separate runs would, the Hessian is block diagonal, and the
derivative of the mean query loss with respect to ``theta`` is the mean of the per-task
meta-gradients. An algorithm therefore computes the meta-gradient of a task batch with one
code path, whatever the batch holds. Two implementations:

- :class:`SingleTask` (``n = 1``): ``phi`` has the shapes of ``theta``; a meta-batch is
  processed one task at a time (ragged tasks, any loss).
- :class:`StackedTasks` (``n = B``): ``phi`` carries a leading task dimension ``B``
  (``phi[b]`` is task ``b``'s), the batches are stacked along it and the loss runs under
  ``torch.func.vmap``; one inner loop and one reverse pass or linear solve serve the whole
  meta-batch (batches of equal shapes, a ``vmap``-compatible loss).

:func:`task_batches` splits a meta-batch into ``B`` single tasks or one stack.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .. import _tree
from .._tree import Tree
from .._vocab import ArgumentTypeError, as_bool, as_callable, as_scalar_loss
from ._common import LOSS_SIGNATURE, LossFn, Task

__all__ = [
    "SingleTask",
    "StackedTasks",
    "TaskBatch",
    "check_module_batches",
    "check_task",
    "check_tasks",
    "refuse_padding",
    "stack_batches",
    "task_batches",
]

Split = Literal["support", "query"]


@runtime_checkable
class TaskBatch(Protocol):
    """``num_tasks`` tasks as one block-separable problem on parameters ``phi``.

    ``theta`` leaves (the meta-parameters) and ``phi`` leaves (one block per task) are lists
    of tensors in the order of the meta-parameters' tree; losses take ``phi`` as a tree.
    ``theta`` broadcasts against ``phi`` (``phi_b - theta``, ``theta + delta_b``).
    """

    num_tasks: int

    def start(self, theta: list[Tensor]) -> list[Tensor]:
        """``phi`` at ``theta``: a fresh copy of ``theta`` in every block."""
        ...

    def support_loss(self, phi: Tree) -> Tensor:
        """``sum_b L(phi_b, support_b)``: each block sees its own task's gradient."""
        ...

    def query_loss(self, phi: Tree) -> Tensor:
        """``mean_b L(phi_b, query_b)``: the meta-objective of the batch."""
        ...

    def task_losses(self, phi: Tree, split: Split) -> list[float]:
        """Each task's loss on its support or query batch (no graph)."""
        ...

    def reduce(self, leaves: list[Tensor]) -> list[Tensor]:
        """Sum over the blocks: a quantity on ``phi`` -> one with the shapes of ``theta``."""
        ...

    def task_norms(self, leaves: list[Tensor]) -> list[float]:
        """Each block's 2-norm of a quantity on ``phi`` (e.g. a gradient)."""
        ...


class SingleTask(TaskBatch):
    """One task: ``phi`` has the shapes of ``theta``; the loss is called as it is.

    Cost per loss evaluation: one call of ``loss_fn``.
    """

    num_tasks = 1

    def __init__(self, loss_fn: LossFn, task: Task):
        self.loss_fn = as_callable(loss_fn, "loss_fn", LOSS_SIGNATURE)
        self.support, self.query = check_task(task)

    def _batch(self, split: Split) -> Any:
        return self.support if split == "support" else self.query

    def start(self, theta: list[Tensor]) -> list[Tensor]:
        return [t.detach().clone() for t in theta]

    def support_loss(self, phi: Tree) -> Tensor:
        return as_scalar_loss(self.loss_fn(phi, self.support), "loss_fn")

    def query_loss(self, phi: Tree) -> Tensor:
        return as_scalar_loss(self.loss_fn(phi, self.query), "loss_fn")

    def task_losses(self, phi: Tree, split: Split) -> list[float]:
        with torch.no_grad():
            return [float(as_scalar_loss(self.loss_fn(phi, self._batch(split)), "loss_fn"))]

    def reduce(self, leaves: list[Tensor]) -> list[Tensor]:
        return list(leaves)

    def task_norms(self, leaves: list[Tensor]) -> list[float]:
        squares = [float(x.to(_tree.wide_dtype(x.device)).pow(2).sum()) for x in leaves]
        return [math.sqrt(sum(squares))]


def stack_batches(batches: Sequence[Any], name: str) -> Any:
    """Stack the tasks' batches leaf by leaf along a new leading dimension (the batch
    containers' types kept: a namedtuple stays one, for a loss that reads its fields)."""
    first, spec0 = _flatten_batch(batches[0], f"{name}[0]")
    columns = [[t] for t in first]
    for i, b in enumerate(batches[1:], 1):
        leaves, spec = _flatten_batch(b, f"{name}[{i}]")
        if spec.structure() != spec0.structure() or spec.shapes != spec0.shapes:
            raise ValueError(
                "vectorize=True needs batches of one structure and shape in every task: "
                f"{name}[0] has shapes {[tuple(s) for s in spec0.shapes]}, {name}[{i}] has "
                f"{[tuple(s) for s in spec.shapes]}. Use vectorize=False for ragged tasks."
            )
        for c, t in zip(columns, leaves):
            c.append(t)
    return _like(batches[0], iter([torch.stack(c) for c in columns]))


def _flatten_batch(batch: Any, name: str) -> tuple[list[Tensor], _tree.TreeSpec]:
    try:
        return _tree.flatten(batch, name)
    except ArgumentTypeError as err:
        raise ArgumentTypeError(
            f"{str(err).split(';')[0]}: vectorize=True stacks the tasks' batches, whose "
            "leaves must then be tensors (in tuples, lists or dicts). Use vectorize=False for "
            "batches that hold other values."
        ) from err


def _like(batch: Any, leaves: Any) -> Any:
    """``batch`` with its tensors replaced by ``leaves`` (in ``_tree.flatten``'s order),
    rebuilt with its containers' types (a namedtuple's, a dict subclass's if it can)."""
    if isinstance(batch, Tensor):
        return next(leaves)
    if isinstance(batch, Mapping):
        items = [(k, _like(v, leaves)) for k, v in batch.items()]
        kind: Any = type(batch)
        try:
            return kind(items)
        except Exception:
            return dict(items)
    values = [_like(v, leaves) for v in batch]
    if isinstance(batch, tuple):
        return type(batch)(*values) if hasattr(batch, "_fields") else tuple(values)
    return values


class StackedTasks(TaskBatch):
    """``B`` tasks stacked along a leading dimension of ``phi`` and of the batches.

    The per-task losses are ``torch.func.vmap(loss_fn)(phi, batch)`` (shape ``(B,)``), so
    the loss must work under ``vmap`` and the tasks' batches must have equal shapes. Cost
    per loss evaluation: one vmapped call for all ``B`` tasks; memory ``B`` copies of the
    parameters (and of the optimizer's buffers). An ``nn.Embedding`` with a ``padding_idx``
    is refused (:func:`refuse_padding`).
    """

    def __init__(self, loss_fn: LossFn, tasks: Sequence[Task]):
        loss_fn = as_callable(loss_fn, "loss_fn", LOSS_SIGNATURE)
        tasks = check_tasks(tasks)
        refuse_padding(getattr(loss_fn, "hg_module", None))
        self.num_tasks = len(tasks)
        self.support = stack_batches([s for s, _ in tasks], "support")
        self.query = stack_batches([q for _, q in tasks], "query")
        self.per_task = torch.func.vmap(loss_fn, randomness="different")

    def losses(self, phi: Tree, split: Split) -> Tensor:
        """Per-task losses, shape ``(B,)``."""
        try:
            with no_fastpath():
                out = self.per_task(phi, self.support if split == "support" else self.query)
        except RuntimeError as err:  # torch's words, and the fix
            if "atching rule" not in str(err) and "vmap" not in str(err):
                raise
            raise RuntimeError(
                f"{err}\nvectorize=True evaluates loss_fn under torch.func.vmap, which it (or "
                "an operation in it) does not support; use vectorize=False."
            ) from err
        if not isinstance(out, Tensor) or out.numel() != self.num_tasks:
            raise ValueError(
                "`loss_fn` must return a scalar tensor per task (vectorize=True maps it over "
                f"the tasks), got {type(out).__name__} of shape "
                f"{tuple(getattr(out, 'shape', ()))} for {self.num_tasks} tasks."
            )
        return out.reshape(self.num_tasks)

    def start(self, theta: list[Tensor]) -> list[Tensor]:
        return [t.detach().unsqueeze(0).expand(self.num_tasks, *t.shape).clone() for t in theta]

    def support_loss(self, phi: Tree) -> Tensor:
        return self.losses(phi, "support").sum()

    def query_loss(self, phi: Tree) -> Tensor:
        return self.losses(phi, "query").mean()

    def task_losses(self, phi: Tree, split: Split) -> list[float]:
        with torch.no_grad():
            return self.losses(phi, split).tolist()

    def reduce(self, leaves: list[Tensor]) -> list[Tensor]:
        return [x.sum(0) for x in leaves]

    def task_norms(self, leaves: list[Tensor]) -> list[float]:
        squares = [
            x.reshape(self.num_tasks, -1).to(_tree.wide_dtype(x.device)).pow(2).sum(1)
            for x in leaves
        ]
        return torch.stack(squares).sum(0).sqrt().tolist()


@contextlib.contextmanager
def no_fastpath() -> Iterator[None]:
    """Attention layers off their inference fast path, which has no derivative: under
    ``vmap`` an eval-mode ``nn.TransformerEncoderLayer`` takes it (its weights do not look
    like they require grad there) and the meta-gradient failed ("derivative for
    aten::_transformer_encoder_layer_fwd is not implemented"). (torch < 2.2 has no switch.)"""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def refuse_padding(model: Any) -> None:
    """Refuse an ``nn.Embedding`` with a ``padding_idx`` under ``vmap``: autograd through
    torch's batching rule gives the padding row a gradient in every task but the first
    (measured: 0.04 off in a second-order meta-gradient). A ``loss_fn`` calling
    ``F.embedding(..., padding_idx=...)`` itself cannot be seen: use ``vectorize=False``."""
    if not isinstance(model, nn.Module):
        return
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            raise ValueError(
                f"vectorize=True cannot run {name!r} (nn.Embedding with padding_idx="
                f"{m.padding_idx}): under vmap, torch gives its padding row a gradient in "
                "every task but the first, so the meta-gradient would be wrong. Use "
                "vectorize=False."
            )


def check_task(task: Any, name: str = "task") -> Task:
    """``(support, query)`` from a pair."""
    if not isinstance(task, (tuple, list)) or len(task) != 2:
        if isinstance(task, (tuple, list)):
            got = f"a {type(task).__name__} of {len(task)} items"
        elif isinstance(task, Mapping):
            got = f"a {type(task).__name__} with keys {list(task)[:4]}"
        else:
            got = type(task).__name__
        raise ArgumentTypeError(f"`{name}` must be a pair (support, query) of batches, got {got}.")
    return task[0], task[1]


def check_tasks(tasks: Any) -> list[Task]:
    """A non-empty list of ``(support, query)`` pairs."""
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence):
        raise ArgumentTypeError(
            f"`tasks` must be a sequence of (support, query) pairs, got {type(tasks).__name__}."
        )
    if len(tasks) == 0:
        raise ValueError("`tasks` is empty; pass at least one (support, query) pair.")
    return [check_task(t, f"tasks[{i}]") for i, t in enumerate(tasks)]


def check_module_batches(pairs: list[Task]) -> None:
    """Refuse, for a module's loss, a batch that is no pair ``(inputs, targets)``: most
    often one task ``(support, query)`` passed as ``tasks``, whose two batches were then
    read as two tasks (vectorize=True blamed their shapes as ragged tasks)."""
    for i, task in enumerate(pairs):
        for split, batch in zip(("support", "query"), task):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ArgumentTypeError(
                    f"tasks[{i}]'s {split} batch is a {type(batch).__name__}, but with an "
                    "nn.Module every batch is a pair (inputs, targets). `tasks` is a list of "
                    "tasks (support, query); for one task, pass [task] (or call "
                    "meta_gradient(meta_params, task))."
                )


def task_batches(loss_fn: LossFn, tasks: Any, vectorize: bool) -> list[TaskBatch]:
    """The meta-batch ``tasks`` as task batches: ``B`` single tasks, or one stack of ``B``."""
    vectorize = as_bool(vectorize, "vectorize")
    pairs = check_tasks(tasks)
    if getattr(loss_fn, "hg_module", None) is not None:
        check_module_batches(pairs)
    if vectorize:
        return [StackedTasks(loss_fn, pairs)]
    return [SingleTask(loss_fn, t) for t in pairs]
