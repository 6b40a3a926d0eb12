"""Differentiation for the HippoTrainer compat layer.

HippoTrainer's hyperparameters are held *by reference*: the criterion (or the model) reads
the hyperparameter tensors themselves, rather than receiving them as an argument. Two
things follow:

- the hypergradient is taken with respect to those very leaf tensors; the library's
  method objects differentiate with respect to fresh copies of ``problem.hparams``, so the
  built-in hyper-steps go through :func:`implicit_by_reference`, **the one place** where
  ``hg.implicit``'s public ``hparams_by_reference=True`` is used;
- HippoTrainer's documented hook ``hyper_grad(train_loss, val_loss)`` receives loss
  *tensors*, whose graphs are differentiated as they are (:func:`grads_or_zeros`,
  :func:`vjp_or_zeros`). Solvers reach such graphs through :class:`CallableOperator`.

:func:`criterion_loss` turns ``(model, criterion, batch)`` into ``f(params, hparams)`` with
the model's weights as an explicit argument (``torch.func.functional_call``), evaluating
the criterion inside the same reparametrization, so a penalty that reads the model's
weights is differentiated with respect to the argument.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ... import implicit
from ..._vocab import ArgumentTypeError
from ...operators import LinearOperator
from ...solvers import Solver

__all__ = [
    "CallableOperator",
    "criterion_loss",
    "flat",
    "grads_or_zeros",
    "implicit_by_reference",
    "leaves_reached",
    "split_batch",
    "unflat",
    "vjp_or_zeros",
]


def implicit_by_reference(
    inner_loss: Callable[[Any, Any], Tensor],
    outer_loss: Callable[[Any, Any], Tensor],
    params: dict[str, Tensor],
    hparams: Iterable[Tensor],
    solver: Solver,
    x0: Tensor | None = None,
) -> tuple[list[Tensor], Any]:
    """``hg.implicit`` with respect to the caller's own hyperparameter leaves.

    The losses ignore their ``hparams`` argument and read the tensors of ``hparams`` by
    reference (they must require grad): ``hg.implicit(..., hparams_by_reference=True)``.

    Only the solver's products are spent: the residual of a fixed-budget solve (T1T2's
    ``Identity``, ``Neumann``), which would cost one more, is not computed.

    Returns:
        ``(hypergradients, info)``: a list aligned with ``hparams`` and ``hg.implicit``'s
        info (``info.solution`` is the warm start of the next solve).
    """
    hyper, info = implicit(
        inner_loss,
        outer_loss,
        params,
        tuple(hparams),
        solver,
        x0=x0,
        return_info=True,
        hparams_by_reference=True,
        stationarity=None,  # HippoTrainer differentiates mid-training by design
        residual=False,  # nothing reads info.residual_norm here: no diagnostic product
    )
    return list(hyper), info


class _Joint(nn.Module):
    """``criterion(model(inputs), targets)`` as one module call (for ``functional_call``)."""

    def __init__(self, model: nn.Module, criterion: Callable[..., Tensor]):
        super().__init__()
        self.model = model
        self.criterion = [criterion]  # in a list: not registered as a submodule

    def forward(self, inputs: Any, targets: Any) -> Tensor:
        return self.criterion[0](self.model(inputs), targets)


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch, or an error saying what a batch must be."""
    try:
        inputs, targets = batch
    except (TypeError, ValueError):
        raise ArgumentTypeError(
            "A batch must be a pair (inputs, targets), as HippoTrainer's loaders yield; got "
            f"{type(batch).__name__}."
        ) from None
    return inputs, targets


def criterion_loss(
    model: nn.Module, criterion: Callable[..., Tensor], batch: Any, *, validation: bool = False
) -> Callable[[dict[str, Tensor], Any], Tensor]:
    """``f(params, hparams) = criterion(model_params(inputs), targets)`` on one batch.

    ``params`` maps the model's parameter names to tensors; parameters not in it keep
    their values. The model's buffers are copies, so BatchNorm statistics are not changed.
    ``hparams`` is ignored: the criterion reads the hyperparameters by reference.

    A training loss runs the model in its current mode (that of the training steps); a
    ``validation`` loss in eval mode (no dropout, BatchNorm's running statistics), as
    HippoTrainer's ``evaluate()`` scores the validation set. Each submodule's mode is put
    back after every call.
    """
    inputs, targets = split_batch(batch)
    joint = _Joint(model, criterion)

    def loss(params: dict[str, Tensor], hparams: Any = None) -> Tensor:
        state = {f"model.{k}": v for k, v in params.items()}
        for k, b in model.named_buffers():
            state[f"model.{k}"] = b.clone()
        if not validation:
            return torch.func.functional_call(joint, state, (inputs, targets))
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            return torch.func.functional_call(joint, state, (inputs, targets))
        finally:
            for m, training in modes:
                m.training = training

    return loss


def grads_or_zeros(
    output: Tensor, inputs: Sequence[Tensor], *, create_graph: bool = False
) -> list[Tensor]:
    """``d output / d inputs``, zeros for inputs it does not use; the graph is retained."""
    out = [torch.zeros_like(t) for t in inputs]
    needs = [i for i, t in enumerate(inputs) if t.requires_grad]
    if output.requires_grad and needs:
        got = torch.autograd.grad(
            output,
            [inputs[i] for i in needs],
            retain_graph=True,
            create_graph=create_graph,
            allow_unused=True,
        )
        for i, g in zip(needs, got):
            if g is not None:
                out[i] = g
    return out


def vjp_or_zeros(
    outputs: Sequence[Tensor], inputs: Sequence[Tensor], vectors: Sequence[Tensor]
) -> list[Tensor]:
    """``d/d inputs sum_i <outputs_i, vectors_i>``, zeros where unused; graph retained.

    With ``outputs`` the gradient of a loss with respect to parameters this is a Hessian-
    vector product (``inputs`` the parameters) or the mixed product (``inputs`` the
    hyperparameters): one backward pass through the retained graph.
    """
    out = [torch.zeros_like(t) for t in inputs]
    pairs = [(o, v) for o, v in zip(outputs, vectors) if o.requires_grad]
    needs = [i for i, t in enumerate(inputs) if t.requires_grad]
    if pairs and needs:
        got = torch.autograd.grad(
            [o for o, _ in pairs],
            [inputs[i] for i in needs],
            grad_outputs=[v.to(o.dtype) for o, v in pairs],
            retain_graph=True,
            allow_unused=True,
        )
        for i, g in zip(needs, got):
            if g is not None:
                out[i] = g.detach()
    return out


def flat(tensors: Sequence[Tensor]) -> Tensor:
    """One 1-D vector from a list of tensors."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vec: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """The inverse of :func:`flat` for tensors shaped like ``like``."""
    out, start = [], 0
    for t in like:
        out.append(vec[start : start + t.numel()].view_as(t))
        start += t.numel()
    return out


class CallableOperator(LinearOperator):
    """A symmetric linear operator given by a function ``v -> A v`` on 1-D tensors.

    Lets the library's solvers (:class:`hypergradient.CG`, ...) solve systems whose
    products come from a user's function, as HippoTrainer's ``conjugate_gradient`` takes.
    """

    def __init__(self, matvec_fn: Callable[[Tensor], Tensor], like: Tensor):
        super().__init__(like.numel(), like.dtype, like.device)
        self.fn = matvec_fn

    def _matvec(self, v: Tensor) -> Tensor:
        out = self.fn(v)
        if not isinstance(out, Tensor) or out.shape != v.shape:
            raise ValueError(
                "`matvec_fn` must return a tensor shaped like its argument "
                f"{tuple(v.shape)}, got {getattr(out, 'shape', type(out).__name__)}."
            )
        return out.detach().to(v.dtype)


#: The most autograd nodes :func:`graph_leaves` visits.
MAX_GRAPH_NODES = 100_000


def graph_leaves(
    outputs: Sequence[Any], targets: set[int], first: bool = False
) -> tuple[set[int], bool]:
    """The ids in ``targets`` of the leaf tensors the autograd graph of ``outputs`` reaches,
    and whether the walk saw the whole graph: it stops at :data:`MAX_GRAPH_NODES` nodes
    (incomplete), once every target is found, or with ``first`` at the first one."""
    found: set[int] = set()
    stack: list[Any] = [o.grad_fn for o in outputs if isinstance(o, Tensor)]
    seen: set[int] = set()
    while stack and found != targets and not (first and found):
        if len(seen) >= MAX_GRAPH_NODES:
            return found, False
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor) and id(variable) in targets:
            found.add(id(variable))
        stack.extend(fn for fn, _ in node.next_functions)
    return found, True


def leaves_reached(outputs: Sequence[Tensor], leaves: Sequence[Tensor]) -> list[bool]:
    """Whether the autograd graph of any of ``outputs`` reaches each of ``leaves`` (all
    True for a graph too large to walk)."""
    found, complete = graph_leaves(outputs, {id(t) for t in leaves})
    return [id(t) in found or not complete for t in leaves]
