"""T1-T2: the one-step look-ahead hypergradient.

Luketina et al. (2016), "Scalable Gradient-Based Tuning of Continuous Regularization
Hyperparameters", ICML.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from .. import _tree
from .._norms import ROWS_FROM, norm_parts
from .._tree import Tree
from .._vocab import Status, as_choice, as_scalar_loss
from ..operators.buffers import keep_buffers
from ..operators.modes import delayed_error_in, is_double_backward_error
from ..solvers import Identity, Solver
from ._checks import Inputs, check_problem
from .base import Problem
from .implicit_base import ImplicitMethod, as_hvp
from .implicit_info import ImplicitInfo
from .leaf_rates import LeafRates, look_ahead_solver
from .mixed_order import (
    HPARAMS_FIRST_SHARE,
    MIXED_ORDERS,
    grad_along,
    hparams_first,
    on_path_share,
)
from .replay import rng_state, set_rng_state
from .t1t2_read import b_parts, read_look_ahead
from .t1t2_shared import shared_leaves

__all__ = ["T1T2", "look_ahead"]


class T1T2(ImplicitMethod):
    """One-step look-ahead (T1-T2; Luketina et al., 2016, ICML).

    With ``theta' = theta - lr * grad_theta f(theta, phi)`` the last inner step,

        dg(theta', phi)/dphi = d_phi g(theta')
                               - lr * (d_phi grad_theta f(theta))^T grad_theta g(theta')

    exactly, for plain SGD: this is one unrolled step. ``torch.optim.SGD`` with momentum
    steps ``theta' = theta - lr k g + (terms constant in phi)``, with ``k = 1`` on a
    parameter's first step (its buffer starts at ``g``, undamped), ``1 - dampening`` after,
    and ``1 + momentum k`` with Nesterov: ``hg.HyperOptimizer`` passes ``Problem.lr = lr k``
    per parameter (read from the optimizer's state before the step), which makes the
    look-ahead exact for every SGD flag (weight decay included; ``maximize`` is refused).
    Adam's and AdamW's step is elementwise: its derivative in ``g`` is a diagonal, which
    ``hg.HyperOptimizer`` passes as per-entry rates (``Problem.lr`` items that are tensors;
    :mod:`~hypergradient.hyperoptimizer.step_rates`), exact too. With other optimizers
    (RMSprop, NAdam, ...) it is the usual approximation that keeps only the learning-rate
    factor. ``hg.HyperOptimizer`` compares the step's gradient with ``train_loss``'s at every
    hyper-step (:mod:`~hypergradient.hyperoptimizer.step_grads`): a constant multiple ``c``
    of it applied inside autograd (a scaled loss) multiplies the rates by ``c``; any other
    (``clip_grad_norm_``, a term outside ``train_loss``) is not the step differentiated: it
    warns (or skips, with ``on_divergence="skip"``). It is the implicit
    formula with ``H^{-1} ~ lr I`` (``hg.Identity(lr)``), the operator at
    ``problem.prev_params`` (``theta``) and the outer gradient at ``problem.params``
    (``theta'``); ``problem.lr`` is required (one per leaf: ``H^{-1} ~ Lambda``).

    In the usual case (one process, double backward, hyperparameters passed as
    arguments) the call takes the formula's three backward passes directly
    (:func:`look_ahead`) with one host synchronization for every finiteness check; any
    other case (a process group, ``hvp="first_order"`` or a fallback from double backward,
    ``hparams_by_reference``, a once-differentiable function in ``f``'s gradient, a
    non-finite quantity to name, an unused hyperparameter to warn about,
    ``grad_theta g = 0``) runs the general implicit formula (from the same random-number
    state), which gives the same hypergradient and diagnostics (the direct path reads
    ``info.outer_grad_norm`` as ``||lr b|| / lr``: ``||b||`` to the rounding of ``lr b``,
    2^-24 relative in float32; float32 norms of at least 32768 entries are read by rows
    of 256 in float32, about 1e-7 relative instead of float64's 1e-16; norms too small for
    either go the general way).

    Args:
        hvp: how the mixed product is taken (as :class:`~hypergradient.Implicit`):
            ``"first_order"`` differences ``grad_phi f`` along the outer gradient (two
            gradients, no double backward, no retained graph).
        mixed: the order of the mixed product on the direct path
            (:mod:`~hypergradient.methods.mixed_order`): ``"params"`` records
            ``grad_theta f`` (a backward pass over ``f``'s graph) and differentiates
            ``<grad_theta f, x>`` in ``phi``; ``"hparams"`` records ``grad_phi f`` and
            differentiates it along ``x`` (two backward passes over ``grad_phi f``'s graph
            alone: for a penalty hyperparameter a few elementwise operations, so the
            hyper-step skips the recorded backward over the network); ``"auto"`` (default)
            takes the hyperparameters first when at most half of ``f``'s autograd nodes lie
            on a path to ``phi`` (a penalty, per-example weights), decided once per problem
            shape. The hypergradient is the same to rounding; with the hyperparameters
            first nothing computes ``grad_theta f``, so ``info.inner_grad_norm`` is NaN
            (``info.stats["mixed"]`` says which order ran).

    Cost: ``f``'s forward pass (none under ``hg.HyperOptimizer``, which hands over its
    replay of the step: :mod:`~.t1t2_shared`) and one gradient of ``g``, plus (parameters first) a
    recorded backward over ``f`` and a double backward to ``phi``, or (hyperparameters
    first) three backward passes over ``grad_phi f``'s graph; no Hessian-vector product.
    State: the product mode ``"auto"`` settled on.
    """

    name = "t1t2"
    residual = False

    def __init__(self, *, hvp: str = "auto", mixed: str = "auto"):
        self.hvp = as_hvp(hvp)
        self.mixed = as_choice(mixed, "mixed", MIXED_ORDERS)
        self._found = None
        self._solver_text: tuple[float, str] | None = None
        self._orders: dict[tuple, str] = {}  # "auto"'s choice per problem shape

    def solver_for(self, problem: Problem) -> Solver:
        if problem.lr is None:
            raise ValueError("T1T2 needs the inner learning rate: pass Problem(lr=...).")
        return look_ahead_solver(problem.lr)

    def _prepare(self, problem: Problem, x0: Any) -> Any:
        prep = super()._prepare(problem, x0)  # per-leaf rates: laid out over the leaves
        if isinstance(prep.solver, LeafRates):
            prep.solver.bind(prep.inputs.param_leaves)
        return prep

    def points(self, problem: Problem) -> tuple[Tree, Tree | None]:
        if problem.prev_params is None:
            return problem.params, None
        return problem.prev_params, problem.params

    def config(self) -> dict[str, Any]:
        return {"hvp": self.hvp, "mixed": self.mixed}

    def _general(self, problem: Problem, x0: Tree | Tensor | None) -> tuple[Tree, Any]:
        """The general implicit formula (its mixed product takes the parameters first)."""
        out, info = super().__call__(problem, x0=x0)
        info.stats["mixed"] = "params"
        return out, info

    def _order(self, inputs: Inputs) -> tuple[tuple, str]:
        """The problem's shape key and the order to take (``"auto"``: not yet decided)."""
        if self.mixed != "auto":
            return (), self.mixed
        key = (*(t.shape for t in inputs.param_leaves), None)
        key += tuple(t.shape for t in inputs.hparam_leaves)
        return key, self._orders.get(key, "auto")

    def direct(self, problem: Problem) -> bool:
        """Whether :func:`look_ahead` serves ``problem`` (else the general formula does)."""
        return (
            problem.process_group is None
            and not problem.hparams_by_reference
            and self.product_mode() in ("auto", "double")
            and isinstance(self.damping, float)
            and self.damping == 0.0
        )

    def __call__(self, problem: Problem, *, x0: Tree | Tensor | None = None) -> tuple[Tree, Any]:
        """The hypergradient of ``problem`` and an :class:`ImplicitInfo` (``x0`` is accepted
        for the implicit methods' signature; the look-ahead has no solve to start)."""
        started = time.perf_counter()
        problem = check_problem(problem, type(self).__name__)
        if x0 is not None or not self.direct(problem):
            return self._general(problem, x0)
        prep = self._prepare(problem, None)
        lr: float | Tensor
        if isinstance(prep.solver, LeafRates):  # one rate per leaf: its diagonal
            lr, solver_text = prep.solver.diagonal, repr(prep.solver)
        else:
            lr = cast(Identity, prep.solver).scale
            text = getattr(self, "_solver_text", None)  # repr(Identity(lr)), once per lr
            if text is None or text[0] != lr:
                text = self._solver_text = (lr, repr(prep.solver))
            solver_text = text[1]
        device = prep.inputs.param_leaves[0].device
        before = rng_state(device)
        key, order = self._order(prep.inputs)
        try:
            out = look_ahead(problem, prep.inputs, prep.outer_at, lr, order)
        except RuntimeError as err:  # no double backward here: "auto" falls back in there
            if not is_double_backward_error(err):
                raise
            out = None
        if out is None:  # the general formula names, warns, falls back (same draws)
            set_rng_state(before, device)
            return self._general(problem, None)
        result, terms = out
        if order == "auto":
            self._orders[key] = terms.order
        info = ImplicitInfo(
            method=self.name,
            seconds=time.perf_counter() - started,
            outer_loss=terms.outer_value,
            num_hvps=0,
            status=Status.FIXED_BUDGET,
            stats={"damping": 0.0, "hvp": "double", "hvp_fallback": None, "mixed": terms.order},
            solver=solver_text,
            inner_loss=terms.inner_value,
            inner_grad_norm=terms.stat_norm,
            outer_grad_norm=terms.bnorm,
            solution=terms.solution,
        )
        return result, info


@dataclass
class LookAheadTerms:
    """The scalars and the solution :func:`look_ahead` reports (for the info)."""

    outer_value: float
    inner_value: float
    stat_norm: float
    bnorm: float
    solution: Tensor
    order: str = "params"


def _fresh(leaves: Sequence[Tensor]) -> list[Tensor]:
    return [t.detach().requires_grad_(True) for t in leaves]


def _grads(value: Tensor, wrt: list[Tensor], **kw: Any) -> list[Tensor | None]:
    if not value.requires_grad:
        return [None] * len(wrt)
    return list(torch.autograd.grad(value, wrt, allow_unused=True, **kw))


def _pieces(x: Tensor, inputs: Inputs) -> list[Tensor]:
    """``x`` cut into the parameter leaves' shapes, each in its leaf's dtype."""
    out, start = [], 0
    for leaf, n in zip(inputs.param_leaves, inputs.param_spec.numels):
        piece = x[start : start + n].reshape(leaf.shape)
        out.append(piece if piece.dtype == leaf.dtype else piece.to(leaf.dtype))
        start += n
    return out


def _mixed(grads: list[Tensor | None], pieces: list[Tensor], h: list[Tensor]) -> list[Any]:
    """``d/dphi <grad_theta f, x>`` per hyperparameter leaf (None: no path)."""
    pairs = [(g, v) for g, v in zip(grads, pieces) if g is not None and g.requires_grad]
    if not pairs:
        return [None] * len(h)
    return list(grad_along([g for g, _ in pairs], h, [v for _, v in pairs]))


#: Vectors of at least this many entries take the passes that save memory traffic (``x``
#: written leaf by leaf, float32 norms by rows); smaller ones the fewest kernels.
LARGE = ROWS_FROM


def _scaled(
    gq: Sequence[Tensor | None], lr: float | Tensor, inputs: Inputs, dtype: torch.dtype
) -> Tensor:
    """``x = lr * b`` as one flat vector in ``dtype`` (``lr`` a number or the flat diagonal of
    per-leaf rates, in ``dtype``); a leaf ``g`` does not reach is zero.

    From :data:`LARGE` entries it is written leaf by leaf (``b``, the flat
    ``grad_theta g``, is never built: one pass over the gradient instead of a copy and a
    product); below, ``lr * cat(leaves)`` (two kernels, whatever the number of leaves).
    Both round as the formula's ``lr * b``."""
    device = inputs.param_leaves[0].device
    if inputs.param_spec.size < LARGE:
        return lr * _tree.cat(gq, inputs.param_spec, dtype, device)
    x = torch.empty(inputs.param_spec.size, dtype=dtype, device=device)
    start, per_leaf = 0, isinstance(lr, Tensor)
    for g, n in zip(gq, inputs.param_spec.numels):
        part = x[start : start + n]
        if g is None:
            part.zero_()
        else:
            g = g if g.dtype == dtype else g.to(dtype)  # multiplied in dtype, as lr * b
            factor = cast(Tensor, lr)[start : start + n] if per_leaf else lr
            torch.mul(g.reshape(-1), factor, out=part)
        start += n
    return x


def _difference(direct: Sequence[Tensor | None], mixed: Sequence[Any]) -> list[Tensor]:
    """``d_phi g - mixed`` per hyperparameter leaf (a missing term is zero; the caller
    has ruled out leaves with neither), rounded as the formula's flat difference."""
    out = []
    for d, m in zip(direct, mixed):
        if m is None:
            out.append(cast(Tensor, d).detach().clone(memory_format=torch.contiguous_format))
        elif d is None:
            out.append(torch.rsub(m.detach(), 0))  # 0 - m: +0 where m = 0, as the formula
        else:
            out.append(torch.sub(d.detach(), m.detach()))
    return out


def _first_pass(
    f: Tensor, p: list[Tensor], h: list[Tensor], order: str
) -> tuple[str, list[Tensor | None] | None]:
    """The order taken (``"auto"`` decided from ``f``'s graph; ``"params"`` when ``f`` has
    none) and, parameters first, ``grad_theta f`` with its graph (hyperparameters first: no
    gradient, ``[]``); None for the gradient when a once-differentiable function is in it."""
    if order == "auto" or not f.requires_grad:
        share = on_path_share(f.grad_fn, h)
        order = "hparams" if share <= HPARAMS_FIRST_SHARE else "params"
    if order == "hparams":
        return order, []
    gf = _grads(f, p, create_graph=True)
    if delayed_error_in([t for t in gf if t is not None and t.requires_grad]):
        return order, None
    return order, gf


def look_ahead(
    problem: Problem,
    inputs: Inputs,
    outer_at: Sequence[Tensor] | None,
    lr: float | Tensor,
    order: str = "params",
) -> tuple[Tree, LookAheadTerms] | None:
    """``d_phi g(theta') - lr (d_phi grad_theta f(theta))^T grad_theta g(theta')`` by three
    backward passes; None when the general formula must answer (a once-differentiable
    function in ``f``'s gradient, a non-finite quantity, ``grad_theta g = 0``, or a
    hyperparameter with no influence).

    ``inputs`` are the validated leaves at ``theta`` (and the hyperparameters);
    ``outer_at`` the leaves of ``theta'`` (None: ``theta``). The arithmetic is the
    formula's: ``x = lr * b`` in the accumulator dtype (written leaf by leaf from
    ``grad_theta g``), the mixed product as the gradient of one inner product, the
    difference per hyperparameter leaf. Every finiteness check is one stacked probe read
    once: ``||x||`` (``||b|| = ||x|| / lr`` to the rounding of ``x``; with one rate per
    leaf, ``lr`` the flat diagonal, ``||b||`` from ``b``'s leaves) and
    ``||grad_theta f||`` (:func:`norm_parts`; a non-finite norm means a non-finite entry
    or a float32 row too large to square, either way the general formula answers),
    ``f``, ``g`` and a sum of each hypergradient leaf. ``order`` is the mixed product's
    (:mod:`~hypergradient.methods.mixed_order`; ``"auto"`` measures ``f``'s graph); with
    the hyperparameters first ``grad_theta f`` is not computed (its norm is NaN). An inner
    loss that already holds ``f`` at leaves aliasing ``theta`` and ``phi``
    (:class:`~.t1t2_shared.SharedLoss`: the driver's replay of the step) gives those leaves
    and that value: no forward pass of ``f`` here.
    """
    p_spec, h_spec = inputs.param_spec, inputs.hparam_spec
    shared = shared_leaves(problem.inner_loss, inputs.param_leaves, inputs.hparam_leaves)
    p, h = shared or (_fresh(inputs.param_leaves), _fresh(inputs.hparam_leaves))
    q = _fresh(inputs.param_leaves if outer_at is None else outer_at)
    h_outer = _fresh(inputs.hparam_leaves)
    dtype = _tree.accumulator_dtype(p)
    with torch.enable_grad(), keep_buffers():  # BatchNorm statistics: untouched
        f = as_scalar_loss(
            problem.inner_loss(_tree.unflatten(p_spec, p), _tree.unflatten(h_spec, h)), "inner_loss"
        )
        order, gf = _first_pass(f, p, h, order)
        if gf is None:
            return None  # a once-differentiable function: the general formula falls back
        wide = _tree.wide_dtype(p[0].device)
        stat = [part for t in gf if t is not None for part in norm_parts(t.detach(), wide)]
        g = as_scalar_loss(
            problem.outer_loss(_tree.unflatten(p_spec, q), _tree.unflatten(h_spec, h_outer)),
            "outer_loss",
        )
        gq = _grads(g, q + h_outer)
        direct, outer = gq[len(q) :], gq[: len(q)]
        del gq  # (the outer gradient's leaves are freed once x holds them: less peak memory)
        _tree.require_dense(outer, p_spec.paths, "outer_loss")  # (an Embedding's)
        x = _scaled(outer, lr, inputs, dtype)
        xparts = norm_parts(x, wide)
        b = b_parts(lr, outer, wide)  # per-leaf rates: ||b|| from b's leaves
        del outer
        pieces = _pieces(x, inputs)
        if order == "params":
            mixed: list[Any] | None = _mixed(gf, pieces, h)
        else:
            mixed = hparams_first(f, p, h, pieces)
        if mixed is None:
            return None
    if any(d is None and m is None for d, m in zip(direct, mixed)):
        return None
    out = _difference(direct, mixed)
    read = read_look_ahead((stat, xparts), gf, x, (f, g), out, lr, b)
    if read is None:
        return None
    stat_norm, bnorm, inner_value, outer_value = read
    stat_norm = stat_norm if order == "params" else math.nan
    terms = LookAheadTerms(outer_value, inner_value, stat_norm, bnorm, x.detach(), order)
    return _tree.unflatten(h_spec, out), terms
