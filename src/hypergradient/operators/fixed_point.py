"""The fixed-point operator ``I - J^T`` of a map ``theta = T(theta, phi)``."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .. import _tree, _vocab
from .._tree import Tree
from .buffers import keep_buffers
from .graph import BATCHED, GRAPH_MODES, GraphOperator, direct_vjp, prepare_hparams, prepare_leaves
from .modes import autocast_dtype

__all__ = ["FixedPointOperator"]


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
        mode: ``"auto"``, ``"double"`` or ``"double_math"`` as in :class:`HessianOperator`
            ("auto" falls back to the math kernels when ``T`` itself contains a gradient
            through a kernel without double backward). There is no first-order mode: the
            products ``J^T v`` need a reverse pass, which differences of ``T`` (``J v``)
            cannot give.

    Attributes:
        residual: ``T(theta) - theta`` as a flat vector (detached).
        mode, requested_mode, fallback_reason: as in :class:`HessianOperator`.
    """

    symmetric = False

    def __init__(
        self,
        map_fn: Callable[[Tree, Tree], Tree],
        params: Tree,
        hparams: Tree | None = None,
        *,
        batched: bool | str = "auto",
        mode: str = "auto",
    ):
        self._map_fn = _vocab.as_callable(
            map_fn, "fixed_point_map", "(params, hparams) -> tree like params"
        )
        batched = _vocab.as_choice(batched, "batched", BATCHED)
        if mode == "first_order":
            raise ValueError(
                "FixedPointOperator has no `mode`='first_order': its products J^T v need a "
                "reverse pass, which central differences of the map (J v) cannot give. Use "
                "mode='double_math' (or 'auto') for kernels without double backward."
            )
        mode = _vocab.as_choice(mode, "mode", GRAPH_MODES)
        self.param_leaves, self.param_spec = prepare_leaves(params, "params")
        self.hparam_leaves, self.hparam_spec = prepare_hparams(hparams)
        self._has_hparams = hparams is not None
        dtype = _tree.accumulator_dtype(self.param_leaves)
        super().__init__(self.param_spec.size, dtype, self.param_leaves[0].device)
        self._start_modes(mode)
        self.autocast_dtype = autocast_dtype(self.device)  # the products' (product_eps)
        self._setup_graph(batched)
        self._out_leaves: list[Tensor] | None = None
        self._build_first()
        assert self._out_leaves is not None
        self.residual = _tree.cat(
            [(o - t).detach() for o, t in zip(self._out_leaves, self.param_leaves)],
            self.param_spec,
            dtype,
            self.device,
        )

    def _graph_outputs(self) -> list[Tensor | None]:
        p = _tree.unflatten(self.param_spec, self.param_leaves)
        h = _tree.unflatten(self.hparam_spec, self.hparam_leaves) if self._has_hparams else None
        with keep_buffers():
            out = self._map_fn(p, h)
        out_leaves, out_spec = _tree.flatten(out, "fixed_point_map(params, hparams)")
        if out_spec.structure() != self.param_spec.structure() or out_spec.shapes != tuple(
            t.shape for t in self.param_leaves
        ):
            raise ValueError(
                "`fixed_point_map` must return a tree with the structure and shapes of "
                f"`params`; got shapes {[tuple(s) for s in out_spec.shapes]}, expected "
                f"{[tuple(t.shape) for t in self.param_leaves]}{_kinds(out_spec, self.param_spec)}"
            )
        if self._out_leaves is None:
            self._out_leaves = list(out_leaves)
        return list(out_leaves)

    def _matvec(self, v: Tensor) -> Tensor:
        out = direct_vjp(self, v)
        return v - (self._guarded(self._param_vjp_flat, v) if out is None else out)

    def _matmat(self, V: Tensor) -> Tensor:
        return V - self._guarded(self._param_vjp_flat_batched, V)

    def mixed(self, v: Tensor) -> list[Tensor | None]:
        return [None if g is None else -g for g in super().mixed(v)]


def _kinds(got: _tree.TreeSpec, want: _tree.TreeSpec) -> str:
    """How two trees' structures differ, in words ("." when they do not)."""
    if got.structure() == want.structure():
        return "."
    a, b = _kind(got), _kind(want)
    if a == b:  # the difference is deeper
        a, b = str(got.structure()), str(want.structure())
    return f"; got {a}, expected {b}."


def _kind(spec: _tree.TreeSpec) -> str:
    """A tree's outer structure in words: a tensor, a tuple of 2, a dict with keys [...]."""
    if spec.kind == "leaf":
        return "a tensor"
    if spec.kind == "dict":
        return f"a dict with keys {list(spec.keys)}"
    return f"a {spec.kind} of {len(spec.children)}"
