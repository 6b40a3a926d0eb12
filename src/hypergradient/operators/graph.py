"""Operators answered by backward passes through a retained autograd graph."""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import _autograd, _tree, _vocab
from .._tree import Tree, TreeSpec
from .._vocab import HypergradientWarning
from .base import LinearOperator, check_vector
from .modes import (
    MODES,
    RngState,
    delayed_error_in,
    is_double_backward_error,
    math_kernels,
)

__all__ = [
    "BATCHED",
    "GRAPH_MODES",
    "SYMBOLIC_SHAPES",
    "GraphOperator",
    "direct_vjp",
    "flat_output",
    "prepare_leaves",
]

#: The module torch.autograd.grad imports on its first call with ``grad_outputs``.
SYMBOLIC_SHAPES = "torch.fx.experimental.symbolic_shapes"

BATCHED: tuple[bool | str, ...] = (True, False, "auto")
_NONE = id(None)
GRAPH_MODES = tuple(m for m in MODES if m != "first_order")


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


def prepare_hparams(hparams: Tree | None, as_is: bool = False) -> tuple[list[Tensor], TreeSpec]:
    """:func:`prepare_leaves` of ``hparams``; no leaves when it is None."""
    if hparams is None:
        return [], _tree.flatten((), "hparams")[1]
    return prepare_leaves(hparams, "hparams", as_is)


class GraphOperator(LinearOperator):
    """Shared machinery: a retained autograd graph from (params, hparams) to ``outputs``.

    ``outputs`` is a list aligned with the parameter leaves (a gradient, or a fixed-point
    map's value). ``_vjp(v, leaves)`` returns ``sum_i <outputs_i, v_i>`` differentiated
    with respect to ``leaves``, by one backward pass through the retained graph.

    Product modes (see :mod:`hypergradient.operators.modes`): subclasses implement
    ``_graph_outputs()`` (evaluate the function with its graph) and the products for the
    current ``mode``; this class builds the graph (under the math kernels for
    ``"double_math"``, replaying the captured random-number state on a rebuild) and, in
    ``"auto"`` mode, falls back on torch's double-backward error and retries the product.

    Attributes:
        mode: the product mode in use (``"double"``, ``"double_math"`` or ``"first_order"``).
        requested_mode: the mode asked for (``"auto"`` or one of the above).
        fallback_reason: why ``"auto"`` left ``"double"`` (torch's error), or None.
    """

    param_leaves: list[Tensor]
    param_spec: TreeSpec
    hparam_leaves: list[Tensor]
    hparam_spec: TreeSpec
    _fallbacks: tuple[str, ...] = ("double_math",)
    _flat: Tensor | None = None  # the outputs as one vector (flat_output)

    def _start_modes(self, mode: str) -> None:
        """Record the requested mode; capture the RNG state when products may replay it."""
        self.requested_mode = mode
        self.mode = "double" if mode == "auto" else mode
        self.fallback_reason: str | None = None
        self._reasons: list[str] = []
        self._outputs: list[Tensor] = []
        self._connected: list[int] = []
        self._rng = RngState(self.device) if mode in ("auto", "first_order") else None

    def _graph_outputs(self) -> list[Tensor | None]:
        raise NotImplementedError

    def _build(self, replay: bool = False) -> None:
        """Evaluate the function with its graph for the current (double) mode."""
        rng = self._rng.replay() if replay and self._rng is not None else None
        if self.mode == "double_math" or rng is not None:
            kernels = math_kernels() if self.mode == "double_math" else contextlib.nullcontext()
            with rng or contextlib.nullcontext(), kernels, torch.enable_grad():
                outputs = self._graph_outputs()
        else:  # the usual first build: no context but grad mode
            with torch.enable_grad():
                outputs = self._graph_outputs()
        connected = [o for o in outputs if o is not None and o.requires_grad]
        if delayed_error_in(connected):
            raise RuntimeError(
                "trying to differentiate twice a function that was marked with "
                "@once_differentiable: a custom autograd.Function in the gradient's graph has "
                "no double backward, so products would miss its part of the Hessian. Use "
                "mode='first_order' (or 'auto')."
            )
        self._keep(outputs, connected)

    def _keep(self, outputs: list[Tensor | None], connected: list[Tensor]) -> None:
        """Keep the outputs the graph connects (``connected``, in order) and whether products
        take the direct path."""
        self._connected = [i for i, o in enumerate(outputs) if o is not None and o.requires_grad]
        self._outputs, self._flat, self._released = connected, None, False
        self._direct = self._uniform and len(connected) == len(self.param_leaves)

    def _build_first(self) -> None:
        """The construction's build; in "auto" mode a double-backward error falls back."""
        try:
            self._build()
        except RuntimeError as error:
            if not self._fall_back(error):
                raise
            self._finish_fallback()

    def _fall_back(self, error: RuntimeError) -> bool:
        """Move to the next mode after ``error``; False if there is none (re-raise it)."""
        if self.requested_mode != "auto" or not is_double_backward_error(error):
            return False
        order = ("double", *self._fallbacks)
        if self.mode not in order or order.index(self.mode) + 1 >= len(order):
            return False
        reason = str(error).strip().splitlines()[0][:200]
        if reason not in self._reasons:
            self._reasons.append(reason)
        self.release()
        self.mode = order[order.index(self.mode) + 1]
        if self.mode != "first_order":
            try:
                self._build(replay=True)
            except RuntimeError as again:  # the math kernels did not help at build time
                return self._fall_back(again)
        return True

    def _finish_fallback(self) -> None:
        self.fallback_reason = "; ".join(self._reasons)
        cost = (
            " (central differences of gradients: 2 gradient evaluations per product)"
            if self.mode == "first_order"
            else " (the graph was rebuilt with the math attention kernel and without cuDNN)"
        )
        warnings.warn(
            f"{type(self).__name__}: double backward is not available for this function "
            f"({self.fallback_reason}); products use mode={self.mode!r}{cost}. Pass "
            f"mode={self.mode!r} to skip the failed attempt.",
            HypergradientWarning,
            stacklevel=4,
        )

    def _guarded(self, product: Callable[[Any], Any], arg: Any) -> Any:
        """``product(arg)``; in "auto" mode, on a double-backward error, fall back and retry."""
        require_graph(self)
        fell_back = False
        while True:
            try:
                out = product(arg)
            except RuntimeError as error:
                if not self._fall_back(error):
                    raise
                fell_back = True
                continue
            if fell_back:
                self._finish_fallback()
            return out

    def _setup_graph(self, batched: bool | str) -> None:
        self._batched: bool | str = _vocab.as_choice(batched, "batched", BATCHED)
        # (start, stop, shape, dtype) of each leaf in a flat vector: products cut it with
        # one split_with_sizes (torch.split goes through symbolic-shape checks, ~10 us per
        # leaf) and reshape only the leaves that are not 1-D
        bounds, sizes, flat, start = [], [], [], 0
        for leaf in self.param_leaves:
            n, shape = leaf.numel(), leaf.shape
            bounds.append((start, start + n, shape, leaf.dtype))
            sizes.append(n)
            flat.append(len(shape) == 1)
            start += n
        self._bounds, self._sizes, self._flat_leaf = bounds, sizes, flat
        self._all_flat = all(flat)
        # every leaf in the operator's dtype: products may take the direct path
        self._uniform = all(b[3] == self.dtype for b in bounds)
        self._direct = False  # set by _build: the graph connects every leaf

    def _pieces(self, v: Tensor) -> list[Tensor]:
        """The connected outputs' parts of ``v`` (1-D, or a batch ``(k, n)``)."""
        lead = tuple(v.shape[:-1])
        parts = v.split_with_sizes(self._sizes, dim=-1)
        out = []
        for i in self._connected:
            piece, (_, _, shape, dtype) = parts[i], self._bounds[i]
            if lead or not self._flat_leaf[i]:
                piece = piece.reshape(lead + tuple(shape))
            out.append(piece if piece.dtype == dtype else piece.to(dtype))
        return out

    def _vjp(self, v: Tensor, leaves: list[Tensor], batched: bool = False) -> list[Tensor | None]:
        if not self._outputs or not leaves:
            return [None] * len(leaves)
        parts = self._pieces(v)
        if not (batched or _autograd.DIRECT or SYMBOLIC_SHAPES in sys.modules):
            # The same product as the dot <outputs, v>'s gradient (bit for bit: the backward
            # of the sum hands each output its part of v), for a torch whose engine _autograd
            # cannot run: torch.autograd.grad with grad_outputs first imports sympy (1-3 s).
            terms = [(o * p).sum() for o, p in zip(self._outputs, parts)]
            dot = terms[0]
            for term in terms[1:]:  # mixed dtypes promote as in ``sum``
                dot = dot + term
            grads = torch.autograd.grad(dot, leaves, retain_graph=True, allow_unused=True)
            return list(grads)
        if not batched:  # (the engine itself where it can: _autograd.grad)
            return list(_autograd.grad(self._outputs, leaves, parts))
        grads = torch.autograd.grad(
            self._outputs,
            leaves,
            grad_outputs=parts,
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=batched,
        )
        return list(grads)

    def _param_vjp_flat(self, v: Tensor) -> Tensor:
        grads = self._vjp(v, self.param_leaves)
        flat = [g for g in grads if g is not None and g.dtype == self.dtype]
        if len(flat) == len(grads):
            # a copy even for one leaf: a gradient may be (a view of) v itself
            return torch.cat([g if g.dim() == 1 else g.reshape(-1) for g in flat])
        return _tree.cat(grads, self.param_spec, self.dtype, self.device)

    def _vmapped(self, V: Tensor, first: Tensor | None = None) -> Tensor | None:
        """All rows of ``V`` by one vmapped backward; None: no batching rule, or a wrong one."""
        try:
            grads = self._vjp(V, self.param_leaves, batched=True)
        except RuntimeError as error:
            if is_double_backward_error(error):
                raise  # not a batching problem: let the mode fallback handle it
            return None
        k = V.shape[0]
        parts = [
            torch.zeros(k, n, dtype=self.dtype, device=self.device)
            if g is None
            else g.reshape(k, -1).to(self.dtype)
            for g, n in zip(grads, self.param_spec.numels)
        ]
        return None if vmap_rejected(self, out := torch.cat(parts, dim=1), V, first) else out

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
            tail = self._vmapped(V[1:], head[1])  # row 1 again: checked (vmap_rejected)
            t2 = self._clock()
            if tail is None:
                self._batched = False
                return torch.cat([head, self._looped(V[2:])])
            self._batched = (t2 - t1) / (V.shape[0] - 1) < (t1 - t0) / 2
            return torch.cat([head, tail[1:]])
        if self._batched:
            out = self._vmapped(V)
            if out is not None:
                return out
            self._batched = False  # some backward formula has no batching rule
        return self._looped(V)

    def mixed(self, v: Tensor) -> list[Tensor | None]:
        """``d/dphi <outputs(theta, phi), v>`` per hyperparameter leaf (``None``: no path);
        ``v`` is checked as by ``matvec``."""
        check_vector(v, self.size, "v")
        out = direct_vjp(self, v, self.hparam_leaves)
        return self._guarded(lambda u: self._vjp(u, self.hparam_leaves), v) if out is None else out

    def release(self) -> None:
        """Free the retained graph (later products raise, but in ``"first_order"`` mode)."""
        self._outputs, self._flat, self._connected = [], None, []
        self._direct, self._released = False, True


def require_graph(op: GraphOperator) -> None:
    """Raise if :meth:`~GraphOperator.release` freed the graph ``op``'s products need (they
    would be zeros); ``"first_order"`` products keep no graph."""
    if getattr(op, "_released", False) and op.mode != "first_order":
        raise RuntimeError(
            f"This {type(op).__name__} was released (release() freed its graph), so its "
            "products would be zeros; build a new operator at the current point."
        )


def vmap_rejected(op: GraphOperator, out: Tensor, V: Tensor, first: Tensor | None) -> bool:
    """At an operator's first vmapped product, whether its row 0 differs from the looped
    product (``first``, else computed): some batching rules are silently wrong (torch
    2.x's ``group_norm`` double backward when the channels equal the spatial size)."""
    if getattr(op, "_vmap_checked", False):
        return False
    op._vmap_checked = True  # type: ignore[attr-defined]  # (once per operator)
    return not rows_agree(out[0], op._param_vjp_flat(V[0]) if first is None else first)


def rows_agree(got: Tensor, want: Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether a vmapped product equals the looped one to rounding: ``sqrt(eps)`` of
    ``dtype`` (default ``want``'s) relative to the norm."""
    tol = torch.finfo(want.dtype if dtype is None else dtype).eps ** 0.5
    return float((got - want).norm()) <= tol * float(want.norm())


def flat_output(op: GraphOperator) -> Tensor:
    """The connected outputs concatenated into one vector, in the graph (made once).

    A product through it hands ``v`` whole to one output (torch checks one
    ``grad_outputs`` pair instead of one per leaf, and no split is made in Python); the
    backward of the concatenation cuts ``v`` into the views ``split`` would make, so
    every product is the same to the last bit.
    """
    flat = op._flat
    if flat is None:
        with torch.enable_grad():  # products may run under no_grad
            parts = [o if o.dim() == 1 else o.reshape(-1) for o in op._outputs]
            flat = op._flat = torch.cat(parts) if len(parts) > 1 else parts[0]
    return flat


def direct_vjp(op: GraphOperator, v: Tensor, leaves: list[Tensor] | None = None) -> Any:
    """``op._param_vjp_flat(v)`` by the shortest path (with ``leaves``: ``op._vjp(v, leaves)``,
    the per-leaf gradients), or None where it does not apply.

    It applies when the graph connects every parameter leaf, all in the operator's dtype,
    and the ``grad_outputs`` form is in use (see :meth:`GraphOperator._vjp`; always where
    :func:`hypergradient._autograd.grad` runs the engine itself, which imports nothing): one
    backward pass through :func:`flat_output`, one concatenation. An error of the backward pass
    returns None, so that the caller's guarded path retries the product and, in ``"auto"``
    mode, falls back.
    """
    if not op._direct or not (_autograd.DIRECT or SYMBOLIC_SHAPES in sys.modules):
        return None
    try:
        wrt = op.param_leaves if leaves is None else leaves
        grads = _autograd.grad((flat_output(op),), wrt, (v,))
    except RuntimeError:
        return None
    if leaves is not None:
        return list(grads)
    if op._all_flat and _NONE not in map(id, grads):  # (ids: no tensor comparison)
        return torch.cat(grads)  # a copy even for one leaf: a gradient may be (a view of) v
    if any(g is None for g in grads):  # a leaf the gradient does not depend on
        return _tree.cat(list(grads), op.param_spec, op.dtype, op.device)
    return torch.cat([g if g.dim() == 1 else g.reshape(-1) for g in grads])
