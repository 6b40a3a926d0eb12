"""Linear operators on flat vectors: the Hessian of the inner objective, and friends.

Every solver sees the system matrix only through :class:`LinearOperator`: ``matvec``
(one product), ``matmat`` (a batch of products, for sketches), ``dense`` (for the exact
solver). Operators count their products, which is how every hypergradient reports its
cost.

:class:`HessianOperator` builds the gradient graph of ``f`` once (``create_graph=True``)
and answers each product ``H v`` by one backward pass through that retained graph. On
CPU this costs about one gradient evaluation per product, where recomputing
``jvp(grad(f))`` from scratch costs 3.2-3.8 gradients and ``vjp(grad(f))`` 2.4-2.7
(``benchmarks/hvp_cost.py``, results in ``benchmarks/results/hvp_cost.md``). The same
graph answers the mixed product ``v -> d/dphi <grad_theta f, v>`` that turns the solution of
the linear system into a hypergradient.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import _tree
from ._tree import Tree, TreeSpec

__all__ = [
    "LinearOperator",
    "MatrixOperator",
    "DampedOperator",
    "HessianOperator",
    "FixedPointOperator",
]


class LinearOperator:
    """A square linear operator acting on 1-D tensors of length ``size``.

    Subclasses implement ``_matvec`` (and may override ``_matmat``). ``num_matvecs``
    counts every product taken, batched ones included.

    Attributes:
        size: dimension n of the operator (the number of parameters).
        dtype, device: of the vectors it acts on.
        symmetric: whether the operator is symmetric (CG and Nystrom require it).
    """

    symmetric: bool = True

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device | str):
        self.size = int(size)
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_matvecs = 0

    # -- products -------------------------------------------------------------------
    def _matvec(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def _matmat(self, V: Tensor) -> Tensor:
        return torch.stack([self._matvec(v) for v in V])

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for a 1-D ``v``; one product."""
        self.num_matvecs += 1
        return self._matvec(v)

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matvec(v)

    def matmat(self, V: Tensor, chunk_size: int | None = None) -> Tensor:
        """Products with each row of ``V`` (shape ``(k, n)``), returned as rows ``(k, n)``.

        ``chunk_size`` bounds how many products are evaluated at once (memory grows
        linearly with it); ``None`` does all ``k`` together.
        """
        if V.dim() != 2 or V.shape[1] != self.size:
            raise ValueError(f"matmat expects a (k, {self.size}) tensor, got {tuple(V.shape)}")
        k = V.shape[0]
        self.num_matvecs += k
        if k == 0:
            return V.clone()
        step = k if chunk_size is None else max(1, int(chunk_size))
        return torch.cat([self._matmat(V[i : i + step]) for i in range(0, k, step)])

    def dense(self, chunk_size: int | None = None) -> Tensor:
        """Materialize the operator as an ``(n, n)`` matrix; costs ``n`` products."""
        eye = torch.eye(self.size, dtype=self.dtype, device=self.device)
        return self.matmat(eye, chunk_size).T.contiguous()


class MatrixOperator(LinearOperator):
    """An explicit matrix as an operator (tests, small problems, preconditioners)."""

    def __init__(self, matrix: Tensor, symmetric: bool | None = None):
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"`matrix` must be square, got shape {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix
        if symmetric is None:  # relative test: a matrix's symmetry does not depend on its scale
            tol = 100 * torch.finfo(matrix.dtype).eps * float(matrix.abs().max())
            symmetric = bool((matrix - matrix.T).abs().max() <= tol)
        self.symmetric = symmetric

    def _matvec(self, v: Tensor) -> Tensor:
        return self.matrix @ v

    def _matmat(self, V: Tensor) -> Tensor:
        return V @ self.matrix.T


class DampedOperator(LinearOperator):
    """``A + damping * I``. Products are counted on the wrapped operator."""

    def __init__(self, base: LinearOperator, damping: float):
        if not math.isfinite(damping) or damping < 0:
            raise ValueError(f"`damping` must be a finite number >= 0, got {damping}")
        super().__init__(base.size, base.dtype, base.device)
        self.base = base
        self.damping = float(damping)
        self.symmetric = base.symmetric

    @property  # type: ignore[override]
    def num_matvecs(self) -> int:
        return self.base.num_matvecs

    @num_matvecs.setter
    def num_matvecs(self, value: int) -> None:  # the base class __init__ sets it
        pass

    def matvec(self, v: Tensor) -> Tensor:
        return self.base.matvec(v) + self.damping * v

    def matmat(self, V: Tensor, chunk_size: int | None = None) -> Tensor:
        return self.base.matmat(V, chunk_size) + self.damping * V


def _prepare_leaves(tree: Tree, name: str, as_is: bool = False) -> tuple[list[Tensor], TreeSpec]:
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


def _check_scalar(value: Any, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"`{name}` must return a scalar tensor, got {type(value).__name__}.")
    if value.numel() != 1:
        raise ValueError(
            f"`{name}` must return a scalar tensor, got shape {tuple(value.shape)}; "
            "reduce it with .mean() or .sum()."
        )
    if not value.is_floating_point():
        raise TypeError(f"`{name}` returned dtype {value.dtype}; it must be floating point.")
    return value.reshape(())


class _GraphOperator(LinearOperator):
    """Shared machinery: a retained autograd graph from (params, hparams) to ``outputs``.

    ``outputs`` is a list aligned with the parameter leaves (a gradient, or a fixed-point
    map's value). ``_vjp(v, leaves)`` returns ``sum_i <outputs_i, v_i>`` differentiated
    with respect to ``leaves``, by one backward pass through the retained graph.
    """

    def _setup_graph(self, outputs: list[Tensor | None], batched: bool | str) -> None:
        if batched not in (True, False, "auto"):
            raise ValueError(f"`batched` must be True, False or 'auto', got {batched!r}.")
        self._batched: bool | str = batched
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


class HessianOperator(_GraphOperator):
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
        self.param_leaves, self.param_spec = _prepare_leaves(params, "params")
        if hparams is None:
            self.hparam_leaves, self.hparam_spec = [], _tree.flatten((), "hparams")[1]
        else:
            self.hparam_leaves, self.hparam_spec = _prepare_leaves(
                hparams, "hparams", hparams_by_reference
            )
        dtype = _tree.accumulator_dtype(self.param_leaves)
        super().__init__(self.param_spec.size, dtype, self.param_leaves[0].device)
        p = _tree.unflatten(self.param_spec, self.param_leaves)
        h = _tree.unflatten(self.hparam_spec, self.hparam_leaves) if hparams is not None else None
        with torch.enable_grad():
            loss = _check_scalar(loss_fn(p, h), loss_name)
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


class FixedPointOperator(_GraphOperator):
    """``A = I - J^T`` with ``J = dT/dtheta`` for a fixed-point map ``theta = T(theta, phi)``.

    The implicit function theorem applied to ``theta* = T(theta*, phi)`` gives
    ``dg/dphi = d_phi g + (d_phi T)^T x`` with ``(I - J^T) x = grad_theta g``. This operator
    is that system's matrix (not symmetric in general), and ``mixed(x)`` returns
    ``-(d_phi T)^T x`` so that the hypergradient is ``d_phi g - mixed(x)`` as for argmin.
    Each product is one backward pass through the retained graph of ``T``.
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
        self.param_leaves, self.param_spec = _prepare_leaves(params, "params")
        if hparams is None:
            self.hparam_leaves, self.hparam_spec = [], _tree.flatten((), "hparams")[1]
        else:
            self.hparam_leaves, self.hparam_spec = _prepare_leaves(hparams, "hparams")
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
