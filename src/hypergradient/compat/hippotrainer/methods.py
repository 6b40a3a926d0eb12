"""HippoTrainer's implicit methods ``T1T2``, ``Neumann`` and ``HOAG`` on this package's solvers.

Each class has two ways in, which agree to rounding (tested):

- the hyper-step (``step``/``hyper_step``/``hyper_grad_on_batches``) calls
  ``hg.implicit`` with the matching solver (``hg.Identity(lr)``, ``hg.Neumann(num_terms,
  alpha=lr)``, ``hg.CG`` with HippoTrainer's stopping rule) on the criterion as a function
  of the model's weights (at copies swapped into the model's attributes; a criterion that
  reads a weight through a reference of its own, ``weights = list(model.parameters())``,
  is found at the first hyper-step and then differentiated on its graphs, as the hook);
- HippoTrainer's hook ``hyper_grad(train_loss, val_loss)`` and its public helpers
  (``Neumann.approx_inverse_hvp``, ``HOAG.conjugate_gradient``,
  ``HOAG.hessian_vector_product``) work on loss tensors, as documented upstream. A subclass
  that overrides one of them is used by the hyper-step, as in HippoTrainer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ... import CG, Identity, Solver
from ... import Neumann as NeumannSeries
from ..._vocab import (
    ArgumentTypeError,
    HypergradientWarning,
    NonFiniteHypergradientError,
    Status,
    as_callable,
    as_float,
    require_finite,
)
from ...hyperoptimizer.build import coupled_decays, with_decay
from ...operators import LinearOperator
from ...solvers import Solution
from ._autograd import (
    CallableOperator,
    flat,
    grads_or_zeros,
    implicit_by_reference,
    unflat,
    vjp_or_zeros,
)
from ._checks import reads_by_reference
from ._settings import Setting, at_least_one, non_negative
from .base import HyperOptimizer, is_batch

__all__ = ["HOAG", "Neumann", "T1T2"]

_NO_GRAPH = (
    "`{}` carries no autograd graph (computed without create_graph=True, or under "
    "torch.no_grad()), so every Hessian product would be zero; pass {} (HippoTrainer "
    "raised autograd's 'does not require grad' here)."
)


class _Implicit(HyperOptimizer):
    """Shared hyper-step of the implicit methods: ``hg.implicit`` with ``self._solver()``."""

    def _solver(self) -> Solver:
        raise NotImplementedError

    def _warm_start(self) -> Tensor | None:
        return None

    _reference: str | None | bool = False  # reads_by_reference's answer (False: not asked)

    def _builtin_hyper_grad(self, train_batch: Any, val_batch: Any) -> list[Tensor]:
        if self._reference is False:  # asked once, at the first hyper-step
            names, params = self._named_params()
            self._reference = reads_by_reference(
                self.model, self.criterion, train_batch, names, params
            )
        if self._reference is not None:
            # the criterion reads a weight through a reference of its own, which the copies
            # hg.implicit differentiates at do not reach: differentiate the losses' graphs at
            # the real parameters instead (HippoTrainer's hook; the same mathematics)
            return self.hyper_grad(*self._losses(train_batch, val_batch))
        inner = self._loss(train_batch)
        decays = self._decays()
        if decays is not None:  # the optimizer's L2 term: its fixed point's Hessian is H + wd I
            inner = with_decay(inner, decays)
        hyper, info = implicit_by_reference(
            inner,
            self._loss(val_batch, validation=True),
            self._params(),
            self.hyperparams.values(),
            self._solver(),
            x0=self._warm_start(),
        )
        self._solved(info.solution)
        return hyper

    def _solved(self, solution: Tensor | None) -> None:
        """Called with the flat solution of each solve (HOAG keeps it as its warm start)."""

    def _decays(self) -> list[float] | None:
        """Per trained parameter, the L2 ``weight_decay`` the optimizer adds to its gradient
        (``torch.optim.SGD``, ``Adam``, ...; not ``AdamW``'s decoupled one), or None when
        there is none. The steps converge to a stationary point of the criterion plus
        ``weight_decay / 2 * ||w||^2``: the implicit methods' Hessian is ``H + weight_decay
        I`` there, as ``hg.HyperOptimizer``'s (HippoTrainer ignored it)."""
        return coupled_decays(self.optimizer, self._named_params()[1])

    def _with_decay(self, hv: list[Tensor], u: list[Tensor]) -> list[Tensor]:
        """``(H + weight_decay I) u`` from ``hv = H u`` (``u`` aligned with the trained
        parameters)."""
        decays = self._decays()
        if decays is None:
            return hv
        return [h + d * t.to(h.dtype) if d else h for h, d, t in zip(hv, decays, u)]


class _LookAhead(Solver):
    """``A^{-1} ~ diag(lr)``: the look-ahead step with each coordinate's learning rate."""

    def __init__(self, scale: Tensor):
        self.scale = scale

    def solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> Solution:
        self.validate(op, b, x0)
        x = self.scale.to(dtype=b.dtype).to(b.device) * b  # cast first: MPS has no float64
        return Solution(x, 0, None, None, Status.FIXED_BUDGET, 0)


class T1T2(_Implicit):
    """One-step look-ahead (Luketina et al., 2016, ICML): ``H^{-1} ~ lr * I``.

    ``dg/dphi ~ d_phi g - (d_phi grad_theta f)^T (lr * grad_theta g)`` at the current
    weights, ``lr`` the optimizer's learning rate (the factor of the look-ahead step, which
    HippoTrainer drops); with param groups of different learning rates, each parameter's
    own (the look-ahead step ``theta - lr_group * grad f`` the optimizer takes). Cost: two
    gradients and one mixed product; no Hessian products.
    """

    def hyper_grad(self, train_loss: Tensor, val_loss: Tensor) -> list[Tensor]:
        """The T1-T2 hypergradient from the graphs of ``train_loss`` and ``val_loss``."""
        if is_batch(train_loss):
            return self._deprecated_batches(train_loss, val_loss)
        lrs = self._group_lrs()
        return self._graph_hyper_grad(
            train_loss, val_loss, lambda v, _: [lr * t for lr, t in zip(lrs, v)]
        )

    def _group_lrs(self) -> list[float]:
        """The learning rate of each trained parameter's param group (checked > 0 when they
        are all equal; each >= 0 otherwise: a group at lr 0 is frozen)."""
        groups = enumerate(self.optimizer.param_groups)
        lr_of = {id(p): (i, g["lr"]) for i, g in groups for p in g["params"]}
        _, params = self._named_params()
        lrs = [
            as_float(lr_of[id(p)][1], f"optimizer.param_groups[{lr_of[id(p)][0]}]['lr']", min=0.0)
            for p in params
        ]
        if len(set(lrs)) == 1:
            return [self._lr()] * len(lrs)  # (checked > 0)
        return lrs

    def _solver(self) -> Solver:
        lrs = self._group_lrs()
        if len(set(lrs)) == 1:
            return Identity(lrs[0])
        _, params = self._named_params()
        scale = [torch.full((p.numel(),), lr, dtype=torch.float64) for lr, p in zip(lrs, params)]
        return _LookAhead(torch.cat(scale))


class Neumann(_Implicit):
    """Implicit differentiation with a Neumann series (Lorraine et al., 2020, AISTATS).

    ``H^{-1} v ~ lr * sum_{j=0}^{num_terms} (I - lr H)^j v`` with ``lr`` the optimizer's
    learning rate: ``num_terms`` Hessian-vector products. Converges to the implicit
    hypergradient as ``num_terms`` grows when ``0 < lr < 2 / lambda_max(H)``. ``H`` is the
    Hessian of the criterion plus the optimizer's L2 ``weight_decay`` (``torch.optim.SGD``,
    ``Adam``, ...; not ``AdamW``'s decoupled decay): ``H + weight_decay I``, the Hessian at
    the fixed point of the optimizer's steps.

    Args:
        num_terms: Hessian-vector products of the series (>= 1).
        *args, **kwargs: those of :class:`HyperOptimizer`.
    """

    _hooks = ("hyper_grad", "approx_inverse_hvp")

    num_terms = Setting(at_least_one)

    def __init__(self, *args: Any, num_terms: int = 1, **kwargs: Any):
        self.num_terms = num_terms
        super().__init__(*args, **kwargs)

    def approx_inverse_hvp(self, v: Sequence[Tensor], f: Sequence[Tensor]) -> list[Tensor]:
        """``lr * sum_{j=0}^{num_terms} (I - lr H)^j v`` with ``H u = d<f, u>/d params``
        (plus ``weight_decay * u``, the optimizer's L2 term, if it has one).

        Args:
            v: the vector, one tensor per trained parameter (``grad_theta g``), or one per
                entry of ``model.parameters()`` as HippoTrainer's own ``hyper_grad`` passes
                (the entries of parameters the optimizer does not train, e.g. a gate held
                by the model, are constants of the inner problem: their result is zero).
            f: the gradient of the training loss with respect to the same tensors,
                computed with ``create_graph=True``; its graph gives the products.

        Returns:
            One tensor per entry of ``v``. (HippoTrainer rescaled the partial sum by ``lr``
            at every term, which is not the series for ``num_terms > 1``.)
        """
        lr = self._lr()
        _, params = self._named_params()
        v, f = list(v), list(f)
        if f and not any(isinstance(t, Tensor) and t.requires_grad for t in f):
            raise ValueError(_NO_GRAPH.format("f", "a gradient computed with create_graph=True"))
        every = list(self.model.parameters())
        if len(v) == len(f) == len(every) != len(params):
            trained = {id(p) for p in params}
            keep = [i for i, p in enumerate(every) if id(p) in trained]
            out = [torch.zeros_like(t) for t in v]
            sub = self._series([v[i] for i in keep], [f[i] for i in keep], params, lr)
            for i, s in zip(keep, sub):
                out[i] = s
            return out
        if not len(v) == len(f) == len(params):
            raise ValueError(
                f"approx_inverse_hvp takes `v` and `f` with one tensor per trained parameter "
                f"({len(params)}) or per entry of model.parameters() ({len(every)}), got "
                f"{len(v)} and {len(f)}."
            )
        return self._series(v, f, params, lr)

    def _series(
        self, v: list[Tensor], f: list[Tensor], params: list[Tensor], lr: float
    ) -> list[Tensor]:
        """``lr * sum_{j=0}^{num_terms} (I - lr H)^j v``, ``v``/``f`` aligned with ``params``.

        Summed by ``hg.Neumann`` on the graph's products, so that a series that diverges
        (``lr >= 2 / lambda_max``: finite but growing terms) raises as the built-in
        hyper-step does, instead of returning a diverged vector.
        """
        if any(t.shape != p.shape for t, p in zip([*v, *f], [*params, *params])):
            # not a Hessian series (HippoTrainer's own test passes scalars): its recursion
            term, total = list(v), list(v)
            for _ in range(self.num_terms):
                hv = vjp_or_zeros(f, params, term)
                term = [t - lr * h for t, h in zip(term, hv)]
                total = [s + t for s, t in zip(total, term)]
            return [lr * s for s in total]
        b = flat([t.detach() for t in v])

        def matvec(vec: Tensor) -> Tensor:
            u = unflat(vec, v)
            return flat(self._with_decay(vjp_or_zeros(f, params, u), u))

        sol = NeumannSeries(self.num_terms, alpha=lr).solve(CallableOperator(matvec, b), b)
        if sol.status in (Status.DIVERGED, Status.NONFINITE) or not bool(
            torch.isfinite(sol.value).all()
        ):
            raise NonFiniteHypergradientError(
                f"Neumann.approx_inverse_hvp: the series with step lr={lr:g} (the optimizer's "
                f"learning rate) {Status.DIVERGED.message}. Lower the learning rate below "
                "2 / lambda_max of the training loss's Hessian. Nothing was updated.",
                "the inverse-Hessian-vector product",
            )
        if sol.status == Status.NEGATIVE_CURVATURE:
            warnings.warn(
                f"Neumann.approx_inverse_hvp: {Status.NEGATIVE_CURVATURE.message}.",
                HypergradientWarning,
                stacklevel=3,
            )
        return unflat(sol.value, v)

    def hyper_grad(self, train_loss: Tensor, val_loss: Tensor) -> list[Tensor]:
        """The Neumann hypergradient from the graphs of ``train_loss`` and ``val_loss``."""
        if is_batch(train_loss):
            return self._deprecated_batches(train_loss, val_loss)
        return self._graph_hyper_grad(train_loss, val_loss, self.approx_inverse_hvp)

    def _solver(self) -> Solver:
        return NeumannSeries(self.num_terms, alpha=self._lr())


class HOAG(_Implicit):
    """HOAG (Pedregosa, 2016, ICML): conjugate gradient on ``H x = grad_theta g``.

    ``H`` is the Hessian of the criterion plus the optimizer's L2 ``weight_decay``
    (``H + weight_decay I``, as :class:`Neumann`'s).

    CG stops when ``||r||^2 < epsilon`` or after ``cg_max_iter`` Hessian-vector products,
    warm-started from the previous hyper-step's solution (HippoTrainer starts from zero).

    Args:
        epsilon: tolerance on the squared residual norm (>= 0; 0 spends all ``cg_max_iter``
            products unless the residual reaches rounding level, as HippoTrainer's loop).
        cg_max_iter: maximum number of CG iterations (>= 1).
        *args, **kwargs: those of :class:`HyperOptimizer`.
    """

    _hooks = ("hyper_grad", "conjugate_gradient", "hessian_vector_product")

    epsilon = Setting(non_negative)
    cg_max_iter = Setting(at_least_one)

    def __init__(self, *args: Any, epsilon: float = 1e-4, cg_max_iter: int = 10, **kwargs: Any):
        self.epsilon = epsilon
        self.cg_max_iter = cg_max_iter
        self._x: Tensor | None = None
        super().__init__(*args, **kwargs)

    def _solver(self) -> Solver:
        return CG(self.cg_max_iter, tol=0.0, atol=math.sqrt(self.epsilon))

    def _warm_start(self) -> Tensor | None:
        size = sum(p.numel() for p in self._named_params()[1])
        return self._x if self._x is not None and self._x.numel() == size else None

    def _solved(self, solution: Tensor | None) -> None:
        self._x = None if solution is None else solution.detach()

    def conjugate_gradient(
        self, matvec_fn: Callable[[Tensor], Tensor], b: Tensor, x0: Tensor | None = None
    ) -> Tensor:
        """Solve ``A x = b`` by conjugate gradient (``hg.CG``) with HOAG's stopping rule.

        Args:
            matvec_fn: ``v -> A v`` on 1-D tensors, ``A`` symmetric positive definite.
            b: the right-hand side, 1-D.
            x0: starting point (default zero); one whose residual ``||b - A x0||``
                exceeds ``||b||`` is worse than zero and is dropped (``hg.CG``'s rule;
                HippoTrainer iterates from it).

        Returns:
            The approximate solution. Warns (``HypergradientWarning``) if ``A`` has
            non-positive curvature along a search direction (the best iterate is returned).
        """
        as_callable(matvec_fn, "matvec_fn", "v -> A v on 1-D tensors")
        if not isinstance(b, Tensor) or b.dim() != 1 or not b.is_floating_point():
            raise ArgumentTypeError(f"`b` must be a 1-D floating-point tensor, got {b!r}.")
        sol = self._solver().solve(
            CallableOperator(matvec_fn, b), b.detach(), None if x0 is None else x0.detach()
        )
        require_finite([sol.value], ["the conjugate-gradient solution"], "", "Add damping.")
        if sol.status == Status.NEGATIVE_CURVATURE:
            warnings.warn(
                f"HOAG.conjugate_gradient: {Status.NEGATIVE_CURVATURE.message}.",
                HypergradientWarning,
                stacklevel=2,
            )
        return sol.value

    def hessian_vector_product(
        self, loss: Tensor, params: Sequence[Tensor], vector: Sequence[Tensor]
    ) -> list[Tensor]:
        """``H v`` for the Hessian of ``loss`` with respect to ``params`` (two backward passes).

        Returns:
            One detached tensor per parameter (zeros where ``loss`` does not use it).
        """
        if isinstance(loss, Tensor) and not loss.requires_grad:
            raise ValueError(_NO_GRAPH.format("loss", "a loss computed with grad enabled"))
        params = list(params)
        grads = grads_or_zeros(loss, params, create_graph=True)
        return vjp_or_zeros(grads, params, list(vector))

    def hyper_grad(self, train_loss: Tensor, val_loss: Tensor) -> list[Tensor]:
        """The HOAG hypergradient from the graphs of ``train_loss`` and ``val_loss``."""
        if is_batch(train_loss):
            return self._deprecated_batches(train_loss, val_loss)
        _, params = self._named_params()

        def inverse(v1: list[Tensor], _: Any) -> list[Tensor]:
            def matvec(vec: Tensor) -> Tensor:
                u = unflat(vec, params)
                return flat(self._with_decay(self.hessian_vector_product(train_loss, params, u), u))

            x = self.conjugate_gradient(matvec, flat(v1), self._warm_start())
            self._solved(x)
            return unflat(x, params)

        return self._graph_hyper_grad(train_loss, val_loss, inverse)
