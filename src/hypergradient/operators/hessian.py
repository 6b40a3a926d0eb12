"""The Hessian of the inner objective (the fixed-point operator ``I - J^T``: ``fixed_point``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.linalg import vector_norm

from .. import _autograd, _tree, _vocab
from .._norms import in_rows, read_exactly, wide_norm
from .._tree import Tree, TreeSpec
from .base import check_vector
from .buffers import keep_buffers
from .first_order import FirstOrderProducts, row_scale
from .graph import BATCHED, GraphOperator, direct_vjp, flat_output, prepare_hparams, prepare_leaves
from .modes import MODES, autocast_dtype

__all__ = ["HessianOperator"]


class HessianOperator(GraphOperator, FirstOrderProducts):
    """The Hessian ``H = d^2 f / d theta^2`` of ``f(params, hparams)`` at the given point.

    In the double-backward modes, construction evaluates ``f`` and its gradient once with
    ``create_graph=True``; each product ``H v`` is then one backward pass through that
    graph (about the cost of one gradient), and ``mixed(v)`` gives
    ``d/dphi <grad_theta f, v>``, the second factor of the implicit hypergradient, from the
    same graph. In the first-order mode, construction evaluates the gradient once without a
    graph, and each product is a central difference of gradients:

        ``H v ~ (grad f(theta + h v) - grad f(theta - h v)) / 2h``,
        ``h = eps^(1/3) (1 + ||theta|| / sqrt(n)) / ||v||``

    (:func:`~hypergradient.operators.modes.first_order_step`), and ``mixed(v)`` the same
    central difference of ``grad_phi f`` along ``v``. Each of these gradient evaluations
    replays the random-number state captured at construction (dropout draws the masks of
    the graph the other modes keep). Measured relative error of ``H v`` against float64
    double backward (``tests/test_operators_modes.py``, worst of 8 directions): 1.1e-10
    (float64) and 6.7e-5 (float32) on a tanh MLP, 3.1e-10 and 2.5e-4 on a
    ``TransformerEncoderLayer``; the mixed product 7e-10 and 4e-4 on the MLP. Cost: two
    gradient evaluations per product and no retained graph.

    Args:
        loss_fn: ``f(params, hparams) -> scalar tensor``.
        params, hparams: trees of tensors (tensor, tuple/list, dict). They are not modified.
        batched: answer ``matmat`` with one vmapped backward (``is_grads_batched``,
            ``True``) or a loop of backward passes (``False``). ``"auto"`` (default) times
            both on the first ``matmat`` of at least 4 vectors and keeps the faster. Falls
            back to the loop for operations without a batching rule. (First-order products
            always loop.)
        loss_name: how messages name ``loss_fn``.
        hparams_by_reference: differentiate with respect to the ``hparams`` tensors
            themselves (leaves with ``requires_grad=True``) instead of fresh copies, for
            losses that use them by reference rather than through their argument.
        mode: ``"auto"`` (default), ``"double"``, ``"double_math"`` or ``"first_order"``
            (:mod:`hypergradient.operators.modes`). ``"auto"`` uses double backward and, on
            torch's "derivative ... is not implemented" error (fused attention, cuDNN RNNs,
            ``@once_differentiable`` functions), rebuilds the graph with the math kernels,
            then uses first-order products, warning once with a ``HypergradientWarning``.

    Attributes:
        loss: ``f`` at the point (detached).
        grad: ``grad_theta f`` at the point as a flat vector (detached); its norm tells how
            far ``params`` is from a stationary point.
        mode, requested_mode, fallback_reason: the product mode in use, the one asked for,
            and why "auto" moved away from "double" (None if it did not).
        gradient_evaluations: gradients evaluated by first-order products (2 per product).
        scale: the largest ``||H v|| / ||v||`` of the products answered so far (every
            first-order one; double-backward ones at counts 1, 2, 4, 8, ...), a lower
            bound of ``||H||`` (0 before the first): first-order products are checked for
            kinks against ``scale ||v||`` (a null direction of ``H`` is no kink), and the
            stationarity check's rounding floor uses it
            (:func:`~hypergradient.methods.implicit_info.gradient_floor`).

    Memory: the graph of one double-backward of ``f`` until ``release()``; none in the
    first-order mode (two gradients at a time).
    """

    symmetric = True
    _fallbacks = ("double_math", "first_order")

    def __init__(
        self,
        loss_fn: Callable[[Tree, Tree], Tensor],
        params: Tree,
        hparams: Tree | None = None,
        *,
        batched: bool | str = "auto",
        loss_name: str = "inner_loss",
        hparams_by_reference: bool = False,
        mode: str = "auto",
    ):
        self._loss_fn = _vocab.as_callable(loss_fn, "loss_fn", "(params, hparams) -> scalar")
        batched = _vocab.as_choice(batched, "batched", BATCHED)
        mode = _vocab.as_choice(mode, "mode", MODES)
        by_reference = _vocab.as_bool(hparams_by_reference, "hparams_by_reference")
        self._loss_name = loss_name
        self.param_leaves, self.param_spec = prepare_leaves(params, "params")
        self.hparam_leaves, self.hparam_spec = prepare_hparams(hparams, by_reference)
        self._has_hparams = hparams is not None
        self._start(batched, mode)

    @classmethod
    def from_leaves(
        cls,
        loss_fn: Callable[[Tree, Tree], Tensor],
        params: tuple[Sequence[Tensor], TreeSpec],
        hparams: tuple[Sequence[Tensor], TreeSpec],
        *,
        batched: bool | str = "auto",
        loss_name: str = "inner_loss",
        hparams_by_reference: bool = False,
        mode: str = "auto",
    ) -> HessianOperator:
        """The operator at trees given flattened, as ``(leaves, spec)`` pairs that
        :func:`hypergradient._tree.flatten` made and :func:`~hypergradient._tree.check_leaves`
        accepted (the implicit methods validate their inputs first); the same operator as
        the constructor's, without flattening and checking the trees again."""
        op = cls.__new__(cls)
        op._loss_fn = _vocab.as_callable(loss_fn, "loss_fn", "(params, hparams) -> scalar")
        batched = _vocab.as_choice(batched, "batched", BATCHED)
        mode = _vocab.as_choice(mode, "mode", MODES)
        by_reference = _vocab.as_bool(hparams_by_reference, "hparams_by_reference")
        op._loss_name = loss_name
        op.param_leaves = [t.detach().requires_grad_(True) for t in params[0]]
        op.param_spec = params[1]
        h_leaves, op.hparam_spec = hparams
        if by_reference:
            prepare_leaves(_tree.unflatten(op.hparam_spec, h_leaves), "hparams", True)
            op.hparam_leaves = list(h_leaves)
        else:
            op.hparam_leaves = [t.detach().requires_grad_(True) for t in h_leaves]
        op._has_hparams = True
        op._start(batched, mode)
        return op

    def _start(self, batched: bool | str, mode: str) -> None:
        """Set up the products and evaluate ``f`` (and its gradient) at the point."""
        dtype = _tree.accumulator_dtype(self.param_leaves)
        super().__init__(self.param_spec.size, dtype, self.param_leaves[0].device)
        self._start_modes(mode)
        self.autocast_dtype = autocast_dtype(self.device)  # the products' (product_eps)
        self._setup_graph(batched)
        self._theta_norm: float | None = None  # first order only: computed on first use
        self._centers: dict[bool, list[Tensor | None]] = {}  # first order: see _center
        # the largest ||H v|| / ||v|| (True) and ||mixed(v)|| / ||v|| (False) answered so
        # far, kept on the device (no synchronization); _probed: the keys probed
        self._scales: dict[bool, Tensor] = {}
        self._answered, self._next_scale = 0, 1  # double-backward products: see _scaled
        self._norms: list[tuple[Tensor, Tensor]] = []  # (||H v||, ||v||) not yet in _scales
        self._defer = False  # the next product's sample is the caller's (defer_scale_sample)
        self._deferred: tuple[Tensor, Tensor, int] | None = None  # (H v, v, v's version)
        self._probed: set[bool] = set()
        self.gradient_evaluations = 0
        self._first: tuple[Tensor, list[Tensor | None]] | None = None
        if mode == "first_order":
            self._first = self._gradients(None, self.param_leaves, replay=False)
        else:
            self._build_first()
            if self._first is None:  # fell back to first order at build time (compiled model)
                self._first = self._gradients(None, self.param_leaves)
        loss, grads = self._first
        self._first = None
        self.loss = loss.detach()
        if self._direct:  # the products' concatenated output is the gradient
            self.grad = flat_output(self).detach()
        else:
            parts = [None if g is None else g.detach() for g in grads]
            self.grad = _tree.cat(parts, self.param_spec, dtype, self.device)

    # -- evaluation -----------------------------------------------------------------
    def _point(self, params: list[Tensor]) -> tuple[Tree, Tree | None]:
        p = _tree.unflatten(self.param_spec, params)
        h = _tree.unflatten(self.hparam_spec, self.hparam_leaves) if self._has_hparams else None
        return p, h

    def _graph_outputs(self) -> list[Tensor | None]:
        with keep_buffers():  # BatchNorm running statistics: untouched (operators.buffers)
            loss = _vocab.as_scalar_loss(
                self._loss_fn(*self._point(self.param_leaves)), self._loss_name
            )
        if not loss.requires_grad:
            grads: list[Tensor | None] = [None] * len(self.param_leaves)
        else:
            with _tree.dense_gradients(self._loss_name):
                grads = list(_autograd.grad((loss,), self.param_leaves, create_graph=True))
            _tree.require_dense(grads, self.param_spec.paths, self._loss_name)
        if self._first is None:
            self._first = (loss, grads)
        return grads

    def _matvec_now(self, v: Tensor) -> Tensor:
        if self.mode == "first_order":
            return self._first_order_matvec(v)
        return self._param_vjp_flat(v)

    def _matmat_now(self, V: Tensor) -> Tensor:
        if self.mode == "first_order":
            return torch.stack([self._first_order_matvec(v) for v in V])
        return self._param_vjp_flat_batched(V)

    def _matvec(self, v: Tensor) -> Tensor:
        out = direct_vjp(self, v)
        out = self._guarded(self._matvec_now, v) if out is None else out
        self._scaled(out, v, 1)
        return out

    def _matmat(self, V: Tensor) -> Tensor:
        out = self._guarded(self._matmat_now, V)
        if out.shape[0]:
            self._scaled(out, V, out.shape[0])
        return out

    def _scaled(self, out: Tensor, v: Tensor, rows: int) -> None:
        """Keep ``||H v|| / ||v||`` in :attr:`scale`: at every first-order product (whose
        kink check reads it; its two gradients dwarf the norms), and at the 1st, 2nd, 4th,
        8th, ... double-backward product (per product, two norms, a where, a division and
        two maxima took 19-24 us alone, against 3-5 ms for a 31-parameter CG(10) call; a
        sample is two norms, their ratio taken when :attr:`scale` is read).
        Either way a lower bound of ``||H||``."""
        self._answered += rows
        defer, self._defer = self._defer, False
        self.settle_scale_sample()
        if self.mode == "first_order" or self._answered >= self._next_scale:
            self._next_scale = 2 * self._answered
            if v.dim() == 1 and self.mode != "first_order":  # the ratio when read
                if defer:  # the caller norms both anyway (conjugate gradient)
                    self._deferred = (out, v, v._version)
                else:
                    self._norms.append(_sample_norms(out, v, _tree.wide_dtype(v.device)))
            else:
                self._track(True, row_scale(out, v).max())

    def defer_scale_sample(self) -> None:
        """The next product's scale sample, if one is due, waits for its norms from the
        caller (:meth:`settle_scale_sample`), which computes them anyway: conjugate
        gradient reads ``||A p||`` and ``||p||`` at every step (two passes over two vectors
        per sample, three samples in a five-product solve, saved)."""
        self._defer = True

    def settle_scale_sample(
        self, out_norm: float | None = None, v_norm: float | None = None
    ) -> None:
        """Record the deferred sample with the caller's norms of ``H v`` and ``v`` (None:
        computed here, from the product and ``v`` if ``v`` is unchanged since)."""
        got, self._deferred = self._deferred, None
        if got is None:
            return
        out, v, version = got
        wide = _tree.wide_dtype(v.device)
        if out_norm is not None and v_norm is not None:
            pair = (torch.tensor(out_norm, dtype=wide), torch.tensor(v_norm, dtype=wide))
            self._norms.append(tuple(t.to(v.device) for t in pair))  # type: ignore[arg-type]
        elif v._version == version:
            self._norms.append(_sample_norms(out, v, wide))

    def mixed(self, v: Tensor) -> list[Tensor | None]:
        """``d/dphi <grad_theta f, v>`` per hyperparameter leaf (``None``: no path)."""
        if self.mode != "first_order":
            return super().mixed(v)  # checks v
        check_vector(v, self.size, "v")
        diff = self._difference(v, None)
        if diff is None:  # v = 0: zeros where a path exists (one gradient tells which)
            paths = self._gradients(None, None)[1]
            diff = [None if g is None else torch.zeros_like(g) for g in paths]
        return [None if d is None else d.to(t.dtype) for d, t in zip(diff, self.hparam_leaves)]


def _sample_norms(out: Tensor, v: Tensor, wide: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(||out||, ||v||)`` in ``wide``. On the CPU, large float32 vectors are normed by
    float32 rows (:func:`~hypergradient._norms.wide_norm`) and read at once (a float64 copy
    of each took 0.15-0.6 ms at 2e5 entries; the read, a microsecond), and in float64 where
    rows may be more than a rounding off."""
    pair = (out, v)
    if v.is_cpu and all(in_rows(t, wide) for t in pair):
        norms = [wide_norm(t, wide) for t in pair]
        read = torch.stack(norms).tolist()
        if not any(read_exactly(x, t, wide) for x, t in zip(read, pair)):
            return norms[0], norms[1]
    return vector_norm(out, dtype=wide), vector_norm(v, dtype=wide)
