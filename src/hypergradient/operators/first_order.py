"""First-order (finite-difference) products of a :class:`HessianOperator`, checked for
kinks against the operator's scale (:func:`~hypergradient.operators.modes.central_difference`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import _autograd, _tree, _vocab
from .._tree import Tree, TreeSpec
from .buffers import keep_buffers
from .modes import RngState, central_difference, first_order_step

__all__ = ["FirstOrderProducts"]


class FirstOrderProducts:
    """The first-order mode of :class:`~hypergradient.HessianOperator` (a mixin): products
    ``H v`` and mixed products as central differences of gradients, and the operator's scale
    (:attr:`scale`) they are checked against."""

    param_leaves: list[Tensor]
    param_spec: TreeSpec
    hparam_leaves: list[Tensor]
    hparam_spec: TreeSpec
    size: int
    dtype: torch.dtype
    device: torch.device
    gradient_evaluations: int
    _loss_fn: Callable[..., Tensor]
    _loss_name: str
    _rng: RngState | None
    _theta_norm: float | None
    _centers: dict[bool, list[Tensor | None]]
    _scales: dict[bool, Tensor]
    _probed: set[bool]

    def _point(self, params: list[Tensor]) -> tuple[Tree, Tree | None]:
        raise NotImplementedError

    def _gradients(
        self, shift: Tensor | None, wrt: list[Tensor] | None, replay: bool = True
    ) -> tuple[Tensor, list[Tensor | None]]:
        """``f`` and its gradient with respect to ``wrt`` at ``theta + shift`` (no graph).

        ``wrt=None`` differentiates with respect to the hyperparameter leaves; otherwise
        with respect to the (shifted) parameter leaves.
        """
        params = [t.detach() for t in self.param_leaves]
        if shift is not None:
            parts = _tree.split(shift, self.param_spec, [t.dtype for t in params])
            params = [t + s for t, s in zip(params, parts)]
        if wrt is not None:
            params = [t.requires_grad_(True) for t in params]
        targets = params if wrt is not None else self.hparam_leaves
        if replay:
            self.gradient_evaluations += 1
        rng = self._rng.replay() if replay and self._rng is not None else contextlib.nullcontext()
        with rng, torch.enable_grad(), keep_buffers():
            loss = _vocab.as_scalar_loss(self._loss_fn(*self._point(params)), self._loss_name)
            if not targets or not loss.requires_grad:
                grads: list[Tensor | None] = [None] * len(targets)
            else:
                with _tree.dense_gradients(self._loss_name):
                    grads = list(_autograd.grad((loss,), targets, retain_graph=False))
                paths = self.param_spec.paths if wrt is not None else self.hparam_spec.paths
                _tree.require_dense(grads, paths, self._loss_name)
        return loss.detach(), grads

    def _difference(
        self, v: Tensor, wrt: list[Tensor] | None, probe: bool = False
    ) -> list[Tensor | None] | None:
        """``(g(theta + h v) - g(theta - h v)) / 2h`` per leaf; None if ``v = 0``. Checked
        for kinks against the operator's scale (``probe``: against its own norm)."""
        vnorm = _norm([v])
        if vnorm == 0.0:
            return None
        if self._theta_norm is None:
            self._theta_norm = _norm(self.param_leaves)
        fd_dtype = max((t.dtype for t in self.param_leaves), key=_epsilon)
        h = first_order_step(self._theta_norm, vnorm, self.size, fd_dtype)

        def evaluate(step: float) -> tuple[list[Tensor | None], list[Tensor | None]]:
            return self._gradients(step * v, wrt)[1], self._gradients(-step * v, wrt)[1]

        what = self._loss_name + ("" if wrt is not None else " (the mixed product)")
        key = wrt is not None

        def scale(probe: bool) -> float:  # ||H|| ||v||: what a product's size is measured
            return self._scale_of(key, wrt, probe) * vnorm  # against (central_difference)

        center = self._center(wrt)
        out = central_difference(evaluate, center, h, what, None if probe else scale)
        out = [None if d is None else d.to(self.dtype) for d in out]
        if not key:  # (the products' scale is kept by _matvec and _matmat)
            self._track(key, _tree_norm([d for d in out if d is not None]) / vnorm)
        return out

    def _scale_of(self, key: bool, wrt: list[Tensor] | None, probe: bool) -> float:
        """The operator's scale (``||H||``, or the mixed product's norm) as far as the
        products so far tell, and (``probe``) one product along a fixed random direction
        (made once per ``key``: two gradients, checked for kinks against its own norm)."""
        if probe and key not in self._probed:
            self._probed.add(key)
            gen = torch.Generator().manual_seed(0x5CA1E)
            r = torch.randn(self.size, generator=gen, dtype=torch.float64)
            r = r.to(self.device, self.dtype)
            out = self._difference(r, wrt, probe=True)
            if out is not None:
                size = _tree_norm([d for d in out if d is not None]) / _norm([r])
                self._track(key, size)
        got = self._scales.get(key)
        return 0.0 if got is None else float(got)

    def _track(self, key: bool, size: Tensor) -> None:
        """Keep the largest product norm per unit vector (:attr:`scale`)."""
        old = self._scales.get(key)
        size = size.detach().to(self.device, _tree.wide_dtype(self.device))
        self._scales[key] = size if old is None else torch.maximum(old, size)

    @property
    def scale(self) -> float:
        """The largest ``||H v|| / ||v||`` of the products answered so far: a lower bound of
        ``||H||`` (0 before the first product; one synchronization)."""
        return float(self.scale_tensor)

    @property
    def scale_tensor(self) -> Tensor:
        """:attr:`scale` as a 0-d tensor on the operator's device (no synchronization)."""
        self._settle()
        pending = getattr(self, "_norms", None)
        if pending:  # the sampled products' norms (HessianOperator._scaled)
            tops, bottoms = (torch.stack(n) for n in zip(*pending))
            ratios = torch.where(bottoms > 0, tops / bottoms.clamp_min(_tiny(bottoms)), 0.0)
            pending.clear()
            self._track(True, ratios.max())
        got = self._scales.get(True)
        return torch.zeros((), device=self.device) if got is None else got

    def scale_parts(self) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
        """What :attr:`scale` is made of, unread: the kept maximum (a list of 0 or 1
        tensors) and the sampled products' ``(||H v||, ||v||)`` not yet folded into it
        (read together with other numbers in one synchronization: ``gradient_floor``)."""
        self._settle()
        got = self._scales.get(True)
        return ([] if got is None else [got]), list(getattr(self, "_norms", None) or ())

    def _settle(self) -> None:
        settle = getattr(self, "settle_scale_sample", None)  # a sample a caller deferred
        if settle is not None:
            settle()

    def _center(self, wrt: list[Tensor] | None) -> list[Tensor | None]:
        """The gradient at the point with the products' random numbers (made once per
        ``wrt``: the parameters, or the hyperparameters for the mixed product)."""
        key = wrt is None
        got = self._centers.get(key)
        if got is None:
            got = self._centers[key] = self._gradients(None, wrt)[1]
        return got

    # -- products -------------------------------------------------------------------
    def _first_order_matvec(self, v: Tensor) -> Tensor:
        diff = self._difference(v, self.param_leaves)
        if diff is None:
            return torch.zeros_like(v, dtype=self.dtype)
        return _tree.cat(diff, self.param_spec, self.dtype, self.device)


def _tiny(t: Tensor) -> float:
    return torch.finfo(t.dtype).tiny


def row_scale(out: Tensor, v: Tensor) -> Tensor:
    """``||out_i|| / ||v_i||`` per row (0 where ``v_i = 0``), in ``_tree.wide_dtype``."""
    wide = _tree.wide_dtype(v.device)
    top = torch.linalg.vector_norm(out, dim=-1, dtype=wide)
    bottom = torch.linalg.vector_norm(v, dim=-1, dtype=wide)
    return torch.where(bottom > 0, top / bottom.clamp_min(torch.finfo(wide).tiny), 0.0)


def _tree_norm(leaves: Sequence[Tensor]) -> Tensor:
    """The 2-norm of the leaves together, in ``_tree.wide_dtype`` (0-d; 0 for none)."""
    if not leaves:
        return torch.zeros(())
    wide = _tree.wide_dtype(leaves[0].device)
    parts = [torch.linalg.vector_norm(t.detach(), dtype=wide) for t in leaves]
    return torch.linalg.vector_norm(torch.stack(parts))


def _epsilon(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _norm(leaves: Sequence[Tensor]) -> float:
    """The 2-norm of all the leaves together, accumulated in float64 (float32 on MPS)."""
    wide = _tree.wide_dtype(leaves[0].device)
    norms = [torch.linalg.vector_norm(t.detach(), dtype=wide) for t in leaves]
    return float(torch.linalg.vector_norm(torch.stack(norms)))
