"""The Hessian of the inner objective, and the fixed-point operator ``I - J^T``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import _tree, _vocab
from .._tree import Tree, TreeSpec
from .graph import BATCHED, GraphOperator, prepare_leaves

__all__ = ["FixedPointOperator", "HessianOperator"]


def _hparams(hparams: Tree | None, by_reference: bool = False) -> tuple[list[Tensor], TreeSpec]:
    if hparams is None:
        return [], _tree.flatten((), "hparams")[1]
    return prepare_leaves(hparams, "hparams", by_reference)


class HessianOperator(GraphOperator):
    """The Hessian ``H = d^2 f / d theta^2`` of ``f(params, hparams)`` at the given point.

    Construction evaluates ``f`` and its gradient once with ``create_graph=True``; each
    product ``H v`` is then one backward pass through that graph (about the cost of one
    gradient). ``mixed(v)`` gives ``d/dphi <grad_theta f, v>``, the second factor of the
    implicit hypergradient, from the same graph.

    Args:
        loss_fn: ``f(params, hparams) -> scalar tensor``.
        params, hparams: trees of tensors (tensor, tuple/list, dict). They are not modified.
        batched: answer ``matmat`` with one vmapped backward (``is_grads_batched``,
            ``True``) or a loop of backward passes (``False``). ``"auto"`` (default) times
            both on the first ``matmat`` of at least 4 vectors and keeps the faster. Falls
            back to the loop for operations without a batching rule.
        loss_name: how messages name ``loss_fn``.
        hparams_by_reference: differentiate with respect to the ``hparams`` tensors
            themselves (leaves with ``requires_grad=True``) instead of fresh copies, for
            losses that use them by reference rather than through their argument.

    Attributes:
        loss: ``f`` at the point (detached).
        grad: ``grad_theta f`` at the point as a flat vector (detached); its norm tells how
            far ``params`` is from a stationary point.

    Memory: the graph of one double-backward of ``f`` is kept alive until ``release()``.
    """

    symmetric = True

    def __init__(
        self,
        loss_fn: Callable[[Tree, Tree], Tensor],
        params: Tree,
        hparams: Tree | None = None,
        *,
        batched: bool | str = "auto",
        loss_name: str = "inner_loss",
        hparams_by_reference: bool = False,
    ):
        _vocab.as_callable(loss_fn, "loss_fn", "(params, hparams) -> scalar tensor")
        batched = _vocab.as_choice(batched, "batched", BATCHED)
        by_reference = _vocab.as_bool(hparams_by_reference, "hparams_by_reference")
        self.param_leaves, self.param_spec = prepare_leaves(params, "params")
        self.hparam_leaves, self.hparam_spec = _hparams(hparams, by_reference)
        dtype = _tree.accumulator_dtype(self.param_leaves)
        super().__init__(self.param_spec.size, dtype, self.param_leaves[0].device)
        p = _tree.unflatten(self.param_spec, self.param_leaves)
        h = _tree.unflatten(self.hparam_spec, self.hparam_leaves) if hparams is not None else None
        with torch.enable_grad():
            loss = _vocab.as_scalar_loss(loss_fn(p, h), loss_name)
            if not loss.requires_grad:
                grads: list[Tensor | None] = [None] * len(self.param_leaves)
            else:
                grads = list(
                    torch.autograd.grad(
                        loss, self.param_leaves, create_graph=True, allow_unused=True
                    )
                )
        self.loss = loss.detach()
        self.grad = _tree.cat(
            [None if g is None else g.detach() for g in grads], self.param_spec, dtype, self.device
        )
        self._setup_graph(grads, batched)

    def _matvec(self, v: Tensor) -> Tensor:
        return self._param_vjp_flat(v)

    def _matmat(self, V: Tensor) -> Tensor:
        return self._param_vjp_flat_batched(V)


class FixedPointOperator(GraphOperator):
    """``A = I - J^T`` with ``J = dT/dtheta`` for a fixed-point map ``theta = T(theta, phi)``.

    The implicit function theorem applied to ``theta* = T(theta*, phi)`` gives
    ``dg/dphi = d_phi g + (d_phi T)^T x`` with ``(I - J^T) x = grad_theta g``. This operator
    is that system's matrix (not symmetric in general), and ``mixed(x)`` returns
    ``-(d_phi T)^T x`` so that the hypergradient is ``d_phi g - mixed(x)`` as for argmin.
    Each product is one backward pass through the retained graph of ``T``.

    Args:
        map_fn: ``T(params, hparams) -> tree like params``.
        params, hparams: trees of tensors; not modified.
        batched: as in :class:`HessianOperator`.

    Attributes:
        residual: ``T(theta) - theta`` as a flat vector (detached).
    """

    symmetric = False

    def __init__(
        self,
        map_fn: Callable[[Tree, Tree], Tree],
        params: Tree,
        hparams: Tree | None = None,
        *,
        batched: bool | str = "auto",
    ):
        _vocab.as_callable(map_fn, "fixed_point_map", "(params, hparams) -> tree like params")
        batched = _vocab.as_choice(batched, "batched", BATCHED)
        self.param_leaves, self.param_spec = prepare_leaves(params, "params")
        self.hparam_leaves, self.hparam_spec = _hparams(hparams)
        dtype = _tree.accumulator_dtype(self.param_leaves)
        super().__init__(self.param_spec.size, dtype, self.param_leaves[0].device)
        p = _tree.unflatten(self.param_spec, self.param_leaves)
        h = _tree.unflatten(self.hparam_spec, self.hparam_leaves) if hparams is not None else None
        with torch.enable_grad():
            out = map_fn(p, h)
        out_leaves, out_spec = _tree.flatten(out, "fixed_point_map(params, hparams)")
        if out_spec.structure() != self.param_spec.structure() or out_spec.shapes != tuple(
            t.shape for t in self.param_leaves
        ):
            raise ValueError(
                "`fixed_point_map` must return a tree with the structure and shapes of "
                f"`params`; got shapes {[tuple(s) for s in out_spec.shapes]}, expected "
                f"{[tuple(t.shape) for t in self.param_leaves]}."
            )
        self.residual = _tree.cat(
            [(o - t).detach() for o, t in zip(out_leaves, self.param_leaves)],
            self.param_spec,
            dtype,
            self.device,
        )
        self._setup_graph(list(out_leaves), batched)

    def _matvec(self, v: Tensor) -> Tensor:
        return v - self._param_vjp_flat(v)

    def _matmat(self, V: Tensor) -> Tensor:
        return V - self._param_vjp_flat_batched(V)

    def mixed(self, v: Tensor) -> list[Tensor | None]:
        return [None if g is None else -g for g in super().mixed(v)]
