"""Tangents of one step's gradient, for forward mode, in plain ``torch.autograd``.

Forward mode carries ``m`` tangents ``(dtheta_k, dphi_k)`` through the run. At each step it
needs the directional derivatives of the gradient, ``J_k = H_tt dtheta_k + H_tp dphi_k``
(``H_tt = d^2 f / dtheta^2``, ``H_tp = d^2 f / dtheta dphi``). Because ``f`` is scalar, these
are vector-Jacobian products of ``(grad_theta f, grad_phi f)`` with respect to ``theta`` with
cotangents ``(dtheta_k, dphi_k)``: ``H_tt`` is symmetric and ``(d grad_phi f / d theta)^T =
H_tp``. So one graph of both gradients and one *batched* backward pass
(``is_grads_batched=True``) give all ``m`` tangents, in about ``1.5 + 1.1 m`` gradient
evaluations measured on a 200k-parameter MLP (``torch.func.jvp`` vmapped over the
directions: about ``2.4 m``).

Product modes (:mod:`~hypergradient.methods.traj_modes`): ``"double"`` as above;
``"double_math"`` builds the graph with the math attention kernel and without cuDNN;
``"first_order"`` takes central differences of gradients along each direction
(``2 m`` gradients, no double backward, any kernel); ``"auto"`` falls back through them on
torch's "derivative ... is not implemented" error, with one warning. Every evaluation runs
under the step's recorded random numbers (same dropout masks as the step).

For forward mode's watch (``sources``), the products of ``grad_phi f``, ``H_tp dphi_k``
(the tangents' sources), are taken apart from the batched pass (a penalty's small graph:
one plain product for one hyperparameter) and added to its result: the same tangents, to
rounding (float32 MNIST MLP: 7.6e-7 relative on the hypergradient).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any

import torch
from torch import Tensor

from .. import _tree
from .._vocab import HypergradientWarning
from ..operators.graph import rows_agree
from .replay import Run
from .traj_modes import (
    central_difference,
    first_order_step,
    has_error_node,
    is_double_backward_error,
    math_kernels,
)

__all__ = ["GradientTangents"]

Leaves = tuple[Tensor, ...]


def _live(grads: Any) -> int:
    """How many of ``grads`` have a graph (the outputs a tangent pass differentiates)."""
    return sum(g is not None and g.requires_grad for g in grads)


def _present(grads: Any) -> list[bool]:
    return [g is not None for g in grads]


def _detached(grads: Any, like: list[Tensor]) -> list[Tensor]:
    """The first ``len(like)`` gradients, detached (zeros for None)."""
    return [torch.zeros_like(x) if d is None else d.detach() for x, d in zip(like, grads)]


class GradientTangents:
    """``(theta_t, t, dtheta, dphi) -> J`` with ``J[k] = H_tt dtheta[k] + H_tp dphi[k]``.

    Tangents are leaf-wise tensors with a leading axis of length ``m`` (one row per
    direction). One instance serves one forward sweep and keeps the mode it settled on.

    Args:
        run: the validated run.
        mode: ``"auto"``, ``"double"``, ``"double_math"`` or ``"first_order"``.
        chunk_size: directions per batched backward pass (bounds memory); None: all.

    Attributes:
        mode: the mode in use; ``fallback``: torch's error that made ``"auto"`` leave
        ``"double"``; ``batched``: False once a batched backward pass failed (the directions
        are then taken one at a time).
    """

    def __init__(self, run: Run, mode: str, chunk_size: int | None, vmap_checked: bool = False):
        self.run = run
        self.requested = mode
        self.mode = "double" if mode == "auto" else mode
        self.chunk = chunk_size
        self.fallback: str | None = None
        self.batched = True
        self.vmap_checked = vmap_checked  # (by an earlier sweep of the same shapes)
        self.checked = False
        #: ``(grad_theta f, f)`` from the last double-backward graph (see :meth:`double`)
        self.primal: tuple[list[Tensor], Tensor] = ([], torch.zeros(()))
        #: whether ``grad_phi f`` depended on ``theta`` (so ``grad_theta f`` on the leaf) at
        #: some step (double backward); a leaf only in a term without ``theta`` (a prior
        #: ``h ** 2``, a term of detached parameters) steers no step, as for Unrolled
        self.used_h = [False] * len(run.h)
        self.seen: list[bool] = []
        #: with ``sources``, each call also leaves ``H_tp dphi[k]`` (the tangents' part that
        #: does not depend on ``dtheta``: the sources of forward mode's watch) in
        #: :attr:`source`, by the vector-Jacobian products of ``grad_phi f`` alone
        self.sources = False
        self.source: list[Tensor] = []
        self._theta_outs = 0

    def __call__(self, p: Leaves, t: int, dp: Leaves, dh: Leaves) -> list[Tensor]:
        while True:
            try:
                if self.mode == "first_order":
                    out = self._differences(p, t, dp, dh)
                    if self.sources:  # the directions (0, dphi[k]): 2 gradients each
                        zeros = tuple(torch.zeros_like(x) for x in dp)
                        self.source = self._differences(p, t, zeros, dh)
                    return out
                return self.double(p, t, dp, dh)
            except RuntimeError as error:
                if not self._fall_back(error):
                    raise

    # -- double backward ----------------------------------------------------------------
    def double(self, p: Leaves, t: int, dp: Leaves, dh: Leaves) -> list[Tensor]:
        """The tangents by double backward (no fallback); the graph's gradient in ``theta``
        and the loss are left in :attr:`primal`."""
        pp = [x.detach().requires_grad_(True) for x in p]
        outs, cots = self._graph(pp, t, [*dp, *dh])
        m = dp[0].shape[0] if dp else 0
        if self.sources:  # grad_phi f's outputs apart (the sources), added after
            n = self._theta_outs
            self.source = _sources(self, outs[n:], pp, cots[n:], dp)
            outs, cots = outs[:n], cots[:n]
        if not outs:
            return (
                [x.clone() for x in self.source]
                if self.sources
                else [torch.zeros_like(x) for x in dp]
            )
        out = _chunked(self, outs, pp, cots, m)
        return [x.add_(b) for x, b in zip(out, self.source)] if self.sources else out

    def _graph(
        self, pp: list[Tensor], t: int, directions: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The gradients in ``theta`` and ``phi`` with their graph, paired with the direction
        rows as cotangents (only the gradients that depend on ``theta``)."""
        run = self.run
        hh = [x.detach().requires_grad_(True) for x in run.h]
        kernels = math_kernels() if self.mode == "double_math" else contextlib.nullcontext()
        with run.again(t), kernels, torch.enable_grad():
            loss = run.loss(pp, run.htree_of(hh), t)
            grads: tuple[Tensor | None, ...] = (None,) * (len(pp) + len(hh))
            if loss.requires_grad:
                with _tree.dense_gradients("inner_loss"):
                    grads = torch.autograd.grad(
                        loss, [*pp, *hh], create_graph=True, allow_unused=True
                    )
                paths = run.pspec.paths + run.hspec.paths
                _tree.require_dense(grads, paths, "inner_loss")
        self.primal = (_detached(grads, pp), loss.detach())
        self.seen = _present(grads[: len(pp)])  # leaves with a gradient (a fused step's skips)
        pairs = [(g, c) for g, c in zip(grads, directions) if g is not None and g.requires_grad]
        self._theta_outs = len(pairs) - _live(grads[len(pp) :])
        if pairs and not self.checked:  # once per sweep: the graph's structure is fixed
            self.checked = True
            if has_error_node([g for g, _ in pairs]):
                raise RuntimeError(
                    "trying to differentiate twice a function that was marked with "
                    "@once_differentiable: forward mode would miss its part of the Hessian. "
                    "Use hvp='first_order' (or 'auto')."
                )
        self.used_h = [u or _reaches(g, pp) for u, g in zip(self.used_h, grads[len(pp) :])]
        return [g for g, _ in pairs], [c.to(g.dtype) for g, c in pairs]

    def _backward(self, outs: list[Tensor], pp: list[Tensor], rows: list[Tensor]) -> list[Tensor]:
        """Vector-Jacobian products of ``outs`` for each row of ``rows`` (batched if it can)."""
        if self.batched:
            try:  # the graph is kept: a failed or rejected batched pass falls back to rows
                got = torch.autograd.grad(
                    outs, pp, rows, retain_graph=True, is_grads_batched=True, allow_unused=True
                )
                n = rows[0].shape[0]
                batch = [
                    torch.zeros((n, *x.shape), dtype=x.dtype, device=x.device) if d is None else d
                    for x, d in zip(pp, got)
                ]
                if self.vmap_checked or self._rows_agree(outs, pp, rows, batch):
                    return batch
            except RuntimeError as error:
                if is_double_backward_error(error):
                    raise
            self.batched = False  # no (right) batching rule for some op: one row at a time
        out: list[list[Tensor]] = [[] for _ in pp]
        for k in range(rows[0].shape[0]):
            for i, d in enumerate(self._row(outs, pp, [r[k] for r in rows])):
                out[i].append(d)
        return [torch.stack(o) for o in out]

    def _row(self, outs: list[Tensor], pp: list[Tensor], row: list[Tensor]) -> list[Tensor]:
        terms = [(o * r).sum() for o, r in zip(outs, row)]
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        got = torch.autograd.grad(total, pp, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(x) if d is None else d for x, d in zip(pp, got)]

    def _rows_agree(
        self, outs: list[Tensor], pp: list[Tensor], rows: list[Tensor], batch: list[Tensor]
    ) -> bool:
        """The sum of the batched pass's rows against the looped product of the rows' sum
        (some batching rules are silently wrong: torch 2.x's ``group_norm`` double
        backward), until a pass whose rows reach every output has agreed."""
        want = self._row(outs, pp, [r.sum(0) for r in rows])
        least = min((w.dtype for w in want), key=lambda d: torch.finfo(d).bits)
        got = torch.cat([b.sum(0).reshape(-1).double() for b in batch])
        agree = rows_agree(got, torch.cat([w.reshape(-1).double() for w in want]), least)
        self.vmap_checked = agree and all(bool(r.any()) for r in rows)
        return agree

    # -- first order --------------------------------------------------------------------
    def _differences(self, p: Leaves, t: int, dp: Leaves, dh: Leaves) -> list[Tensor]:
        """``(grad f(theta + e dtheta, phi + e dphi) - grad f(theta - ..., ...)) / 2e``."""
        run = self.run
        wide = _tree.wide_dtype(run.device)
        theta_norm = math.sqrt(sum(float(x.to(wide).pow(2).sum()) for x in p))
        least = min((x.dtype for x in p), key=lambda d: torch.finfo(d).bits)
        size = sum(x.numel() for x in p)
        m = dp[0].shape[0] if dp else 0
        out: list[list[Tensor]] = [[] for _ in p]
        center: list[Tensor] | None = None  # grad f at the point, with the step's draws
        for k in range(m):
            vp, vh = [d[k] for d in dp], [d[k] for d in dh]
            v_norm = math.sqrt(sum(float(x.to(wide).pow(2).sum()) for x in (*vp, *vh)))
            if v_norm == 0.0:
                for i, x in enumerate(p):
                    out[i].append(torch.zeros_like(x))
                continue
            if center is None:
                center = self._gradient(p, vp, vh, 0.0, t)
            e = first_order_step(theta_norm, v_norm, size, least)
            for i, d in enumerate(self._central(p, vp, vh, e, t, center)):
                out[i].append(d)
        return [torch.stack(o) for o in out]

    def _central(
        self, p: Leaves, vp: list[Tensor], vh: list[Tensor], e: float, t: int, center: list
    ) -> list[Tensor]:
        """One direction's central difference, checked for kinks (``central_difference``)."""

        def evaluate(step: float) -> tuple[list[Tensor], list[Tensor]]:
            plus = self._gradient(p, vp, vh, step, t)
            return plus, self._gradient(p, vp, vh, -step, t)

        what = f"inner_loss at step {t} of the window"
        got = central_difference(evaluate, center, e, what)
        return [torch.zeros_like(x) if d is None else d for x, d in zip(p, got)]

    def _gradient(
        self, p: Leaves, vp: list[Tensor], vh: list[Tensor], e: float, t: int
    ) -> list[Tensor]:
        run = self.run
        q = [(x + e * v.to(x.dtype)).requires_grad_(True) for x, v in zip(p, vp)]
        h = [x + e * v.to(x.dtype) for x, v in zip(run.h, vh)]
        with run.again(t), torch.enable_grad():
            loss = run.loss(q, run.htree_of(h), t)
            if not loss.requires_grad:
                return [torch.zeros_like(x) for x in q]
            got = torch.autograd.grad(loss, q, allow_unused=True)
        return [torch.zeros_like(x) if d is None else d for x, d in zip(q, got)]

    # -- auto ---------------------------------------------------------------------------
    def _fall_back(self, error: RuntimeError) -> bool:
        if self.requested != "auto" or not is_double_backward_error(error):
            return False
        if self.fallback is None:
            self.fallback = str(error).strip().splitlines()[0][:200]
        once = "once_differentiable" in str(error)
        self.mode = "double_math" if self.mode == "double" and not once else "first_order"
        self.checked = False
        if self.mode == "first_order":
            warnings.warn(
                f"Double backward is not available for this inner loss ({self.fallback}); "
                "forward mode uses hvp='first_order' (central differences of gradients: "
                "2 gradient evaluations per direction and step, relative error "
                "~eps^(2/3)). Pass hvp='first_order' to skip the failed attempt.",
                HypergradientWarning,
                stacklevel=6,
            )
        return True

    def report(self) -> dict[str, Any]:
        """The mode in use and why ``"auto"`` left ``"double"`` (for ``info.stats``); warns
        once for a fallback to ``"double_math"`` (the one to ``"first_order"`` warned)."""
        if self.mode == "double_math" and self.requested == "auto":
            warnings.warn(
                f"Double backward is not available for this inner loss ({self.fallback}); "
                "forward mode used hvp='double_math' (the graph rebuilt with the math "
                "attention kernel and without cuDNN). Pass hvp='double_math' to skip the "
                "failed attempt.",
                HypergradientWarning,
                stacklevel=5,
            )
        return {"hvp": self.mode, "hvp_fallback": self.fallback}


def _chunked(
    tangents: GradientTangents, outs: list[Tensor], pp: list[Tensor], cots: list[Tensor], m: int
) -> list[Tensor]:
    """The vector-Jacobian products of ``outs`` for the ``m`` rows of ``cots``, batched by
    chunks of ``tangents.chunk`` rows (:meth:`GradientTangents._backward`)."""
    step = m if tangents.chunk is None else tangents.chunk
    pieces = [
        tangents._backward(outs, pp, [c[lo : lo + step] for c in cots]) for lo in range(0, m, step)
    ]
    return [torch.cat([piece[i] for piece in pieces]) for i in range(len(pp))]


def _sources(
    tangents: GradientTangents, outs: list[Tensor], pp: list[Tensor], cots: list[Tensor], like: Any
) -> list[Tensor]:
    """``H_tp dphi[k]`` for each row ``k``: the vector-Jacobian products of the outputs
    ``grad_phi f`` alone (a penalty's graph, or a loss weight's first-order one; zeros
    without such an output). One row: a plain product; more: batched as the tangents
    (checked against a looped product as long as theirs is, not counting as their check)."""
    if not outs:
        return [torch.zeros_like(x) for x in like]
    m = like[0].shape[0]
    if m == 1:
        rows = [c[0] for c in cots]
        got = torch.autograd.grad(outs, pp, rows, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(x) if d is None else d[None] for x, d in zip(like, got)]
    checked = tangents.vmap_checked
    try:
        return _chunked(tangents, outs, pp, cots, m)
    finally:
        tangents.vmap_checked = checked


def _reaches(grad: Tensor | None, params: list[Tensor]) -> bool:
    """Whether ``grad`` (a hyperparameter's ``grad_phi f``, with its graph) depends on
    ``params``: the graph connectivity that makes Unrolled's mixed product not None."""
    if grad is None or not grad.requires_grad:
        return False
    got = torch.autograd.grad(
        grad, params, torch.ones_like(grad), retain_graph=True, allow_unused=True
    )
    return any(d is not None for d in got)


def _shapes(obj: Any, seen: list[Tensor]) -> Any:
    """Shapes, dtypes and devices of the tensors of a batch (tuples, lists, dicts), the
    type's name for anything else; the tensors met are appended to ``seen``."""
    if isinstance(obj, Tensor):
        seen.append(obj)
        return (tuple(obj.shape), obj.dtype, obj.device)
    if isinstance(obj, dict):
        return tuple((k, _shapes(v, seen)) for k, v in obj.items())
    if isinstance(obj, (tuple, list)):
        return tuple(_shapes(v, seen) for v in obj)
    return type(obj).__name__


def batching_key(run: Run) -> Any:
    """What a batched pass's check holds for: the leaves' and the window's batches' shapes
    (torch's wrong ``group_norm`` batching rule depends on the activations' shapes); None
    when no batch holds a tensor (data inside the losses: nothing tells a new shape)."""
    seen: list[Tensor] = []
    batches = frozenset(_shapes(b, seen) for b in run.batches)
    if not seen:
        return None
    leaves = tuple((tuple(x.shape), x.dtype) for x in (*run.p0, *run.h))
    return leaves, batches
