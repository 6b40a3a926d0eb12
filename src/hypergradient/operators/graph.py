"""Operators answered by backward passes through a retained autograd graph."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from .. import _tree, _vocab
from .._tree import Tree, TreeSpec
from .base import LinearOperator

__all__ = ["BATCHED", "GraphOperator", "prepare_leaves"]

BATCHED = (True, False, "auto")


def prepare_leaves(tree: Tree, name: str, as_is: bool = False) -> tuple[list[Tensor], TreeSpec]:
    """The leaves of ``tree`` as tensors that require grad (fresh copies unless ``as_is``)."""
    leaves, spec = _tree.flatten(tree, name)
    _tree.check_leaves(leaves, spec, name)
    if as_is:
        # The caller's own leaves (for losses that capture them by reference, as stateful
        # criteria do); they must already require grad. Only autograd.grad reads them.
        for t, path in zip(leaves, spec.paths):
            if not (t.is_leaf and t.requires_grad):
                raise ValueError(f"{path} must be a leaf tensor with requires_grad=True.")
        return list(leaves), spec
    # Fresh leaves: the caller's tensors are never modified, and their .grad stays as it was.
    return [t.detach().requires_grad_(True) for t in leaves], spec


class GraphOperator(LinearOperator):
    """Shared machinery: a retained autograd graph from (params, hparams) to ``outputs``.

    ``outputs`` is a list aligned with the parameter leaves (a gradient, or a fixed-point
    map's value). ``_vjp(v, leaves)`` returns ``sum_i <outputs_i, v_i>`` differentiated
    with respect to ``leaves``, by one backward pass through the retained graph.
    """

    param_leaves: list[Tensor]
    param_spec: TreeSpec
    hparam_leaves: list[Tensor]
    hparam_spec: TreeSpec

    def _setup_graph(self, outputs: list[Tensor | None], batched: bool | str) -> None:
        self._batched: bool | str = _vocab.as_choice(batched, "batched", BATCHED)
        self._connected = [i for i, o in enumerate(outputs) if o is not None and o.requires_grad]
        self._outputs = [outputs[i] for i in self._connected]
        self._out_dtypes = [leaf.dtype for leaf in self.param_leaves]

    def _vjp(self, v: Tensor, leaves: list[Tensor], batched: bool = False) -> list[Tensor | None]:
        if not self._outputs:
            return [None] * len(leaves)
        parts = _tree.split(v, self.param_spec, self._out_dtypes)
        grads = torch.autograd.grad(
            self._outputs,
            leaves,
            grad_outputs=[parts[i] for i in self._connected],
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=batched,
        )
        return list(grads)

    def _param_vjp_flat(self, v: Tensor) -> Tensor:
        grads = self._vjp(v, self.param_leaves)
        return _tree.cat(grads, self.param_spec, self.dtype, self.device)

    def _vmapped(self, V: Tensor) -> Tensor | None:
        """All rows of ``V`` by one vmapped backward; ``None`` if an op has no batching rule."""
        try:
            grads = self._vjp(V, self.param_leaves, batched=True)
        except RuntimeError:
            return None
        k = V.shape[0]
        parts = [
            torch.zeros(k, n, dtype=self.dtype, device=self.device)
            if g is None
            else g.reshape(k, -1).to(self.dtype)
            for g, n in zip(grads, self.param_spec.numels)
        ]
        return torch.cat(parts, dim=1)

    def _looped(self, V: Tensor) -> Tensor:
        return torch.stack([self._param_vjp_flat(v) for v in V])

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _param_vjp_flat_batched(self, V: Tensor) -> Tensor:
        if self._batched == "auto":
            if V.shape[0] < 4:
                return self._looped(V)
            # Time two looped products against the vmapped rest and keep the faster per
            # product: vmap is several times faster for most networks, but several times
            # slower for some backward formulas (e.g. elementwise products with a
            # matrix-vector product on CPU). Every product computed is used.
            t0 = self._clock()
            head = self._looped(V[:2])
            t1 = self._clock()
            tail = self._vmapped(V[2:])
            t2 = self._clock()
            if tail is None:
                self._batched = False
                return torch.cat([head, self._looped(V[2:])])
            self._batched = (t2 - t1) / (V.shape[0] - 2) < (t1 - t0) / 2
            return torch.cat([head, tail])
        if self._batched:
            out = self._vmapped(V)
            if out is not None:
                return out
            self._batched = False  # some backward formula has no batching rule
        return self._looped(V)

    def mixed(self, v: Tensor) -> list[Tensor | None]:
        """``d/dphi <outputs(theta, phi), v>`` per hyperparameter leaf (``None``: no path)."""
        return self._vjp(v, self.hparam_leaves)

    def release(self) -> None:
        """Free the retained graph."""
        self._outputs = []
        self._connected = []
