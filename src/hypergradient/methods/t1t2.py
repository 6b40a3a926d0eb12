"""T1-T2: the one-step look-ahead hypergradient.

Luketina et al. (2016), "Scalable Gradient-Based Tuning of Continuous Regularization
Hyperparameters", ICML.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from .. import _tree
from .._tree import Tree
from .._vocab import Status, as_float, as_scalar_loss, finite_probe
from ..operators.graph import SYMBOLIC_SHAPES
from ..operators.modes import delayed_error_in, is_double_backward_error
from ..solvers import Identity, Solver
from ._checks import Inputs, check_problem
from .base import Problem
from .implicit_base import ImplicitMethod, as_hvp
from .implicit_info import ImplicitInfo
from .replay import rng_state, set_rng_state

__all__ = ["T1T2", "look_ahead"]


class T1T2(ImplicitMethod):
    """One-step look-ahead (T1-T2; Luketina et al., 2016, ICML).

    With ``theta' = theta - lr * grad_theta f(theta, phi)`` the last inner step,

        dg(theta', phi)/dphi = d_phi g(theta')
                               - lr * (d_phi grad_theta f(theta))^T grad_theta g(theta')

    exactly, for plain SGD: this is one unrolled step. With momentum or Adam it is the
    usual approximation that keeps only the learning-rate factor. It is the implicit
    formula with ``H^{-1} ~ lr I`` (``hg.Identity(lr)``), the operator at
    ``problem.prev_params`` (``theta``) and the outer gradient at ``problem.params``
    (``theta'``); ``problem.lr`` is required.

    In the usual case (one process, double backward, hyperparameters passed as
    arguments) the call takes the formula's three backward passes directly
    (:func:`look_ahead`) with one host synchronization for every finiteness check; any
    other case (a process group, ``hvp="first_order"`` or a fallback from double backward,
    ``hparams_by_reference``, a once-differentiable function in ``f``'s gradient, a
    non-finite quantity to name, an unused hyperparameter to warn about,
    ``grad_theta g = 0``) runs the general implicit formula (from the same random-number
    state), which gives the same hypergradient and diagnostics.

    Args:
        hvp: how the mixed product is taken (as :class:`~hypergradient.Implicit`):
            ``"first_order"`` differences ``grad_phi f`` along the outer gradient (two
            gradients, no double backward, no retained graph).

    Cost: ``f``'s gradient graph, one gradient of ``g`` and one mixed product (no
    Hessian-vector product). State: the product mode ``"auto"`` settled on.
    """

    name = "t1t2"
    residual = False

    def __init__(self, *, hvp: str = "auto"):
        self.hvp = as_hvp(hvp)
        self._found = None
        self._solver_text: tuple[float, str] | None = None

    def solver_for(self, problem: Problem) -> Solver:
        if problem.lr is None:
            raise ValueError("T1T2 needs the inner learning rate: pass Problem(lr=...).")
        return Identity(as_float(problem.lr, "lr", min=0.0, open_min=True))

    def points(self, problem: Problem) -> tuple[Tree, Tree | None]:
        if problem.prev_params is None:
            return problem.params, None
        return problem.prev_params, problem.params

    def config(self) -> dict[str, Any]:
        return {"hvp": self.hvp}

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
            return super().__call__(problem, x0=x0)
        prep = self._prepare(problem, None)
        lr = cast(Identity, prep.solver).scale
        text = getattr(self, "_solver_text", None)  # repr(Identity(lr)), once per lr
        if text is None or text[0] != lr:
            text = self._solver_text = (lr, repr(prep.solver))
        device = prep.inputs.param_leaves[0].device
        before = rng_state(device)
        try:
            out = look_ahead(problem, prep.inputs, prep.outer_at, lr)
        except RuntimeError as err:  # no double backward here: "auto" falls back in there
            if not is_double_backward_error(err):
                raise
            out = None
        if out is None:  # the general formula names, warns, falls back (same draws)
            set_rng_state(before, device)
            return super().__call__(problem)
        result, terms = out
        info = ImplicitInfo(
            method=self.name,
            seconds=time.perf_counter() - started,
            outer_loss=terms.outer_value,
            num_hvps=0,
            status=Status.FIXED_BUDGET,
            stats={"damping": 0.0, "hvp": "double", "hvp_fallback": None},
            solver=text[1],
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


def _fresh(leaves: Sequence[Tensor]) -> list[Tensor]:
    return [t.detach().requires_grad_(True) for t in leaves]


def _grads(value: Tensor, wrt: list[Tensor], **kw: Any) -> list[Tensor | None]:
    if not value.requires_grad:
        return [None] * len(wrt)
    return list(torch.autograd.grad(value, wrt, allow_unused=True, **kw))


def _mixed(grads: list[Tensor | None], x: Tensor, inputs: Inputs, h: list[Tensor]) -> list[Any]:
    """``d/dphi <grad_theta f, x>`` per hyperparameter leaf (None: no path)."""
    outputs, pieces, start = [], [], 0
    for g, leaf, n in zip(grads, inputs.param_leaves, inputs.param_spec.numels):
        if g is not None and g.requires_grad:
            piece = x[start : start + n].reshape(leaf.shape)
            outputs.append(g)
            pieces.append(piece if piece.dtype == leaf.dtype else piece.to(leaf.dtype))
        start += n
    if not outputs:
        return [None] * len(h)
    if SYMBOLIC_SHAPES in sys.modules:
        return list(torch.autograd.grad(outputs, h, grad_outputs=pieces, allow_unused=True))
    dot = (outputs[0] * pieces[0]).sum()  # grad_outputs would import sympy (cold start)
    for o, p in zip(outputs[1:], pieces[1:]):
        dot = dot + (o * p).sum()
    return list(torch.autograd.grad(dot, h, allow_unused=True))


def _read(gf: list[Tensor | None], b: Tensor, more: tuple[Tensor, ...]) -> list[float]:
    """``[||grad_theta f||, ||b||, f, g, probe(direct), probe(result)]`` in the device's
    wide dtype, read in one host synchronization (the norm of ``grad_theta f`` from its
    leaves' norms: no flat copy)."""
    wide = _tree.wide_dtype(b.device)
    norms = [torch.linalg.vector_norm(t.detach(), dtype=wide) for t in gf if t is not None]
    probes = [
        torch.linalg.vector_norm(torch.stack(norms)) if norms else b.new_zeros((), dtype=wide)
    ]
    probes += [torch.linalg.vector_norm(b, dtype=wide)]
    probes += [t.detach().to(b.device, wide) for t in more[:2]]
    probes += [finite_probe(t).to(wide) for t in more[2:]]
    return torch.stack(probes).tolist()


def look_ahead(
    problem: Problem, inputs: Inputs, outer_at: Sequence[Tensor] | None, lr: float
) -> tuple[Tree, LookAheadTerms] | None:
    """``d_phi g(theta') - lr (d_phi grad_theta f(theta))^T grad_theta g(theta')`` by three
    backward passes; None when the general formula must answer (a once-differentiable
    function in ``f``'s gradient, a non-finite quantity, ``grad_theta g = 0``, or a
    hyperparameter with no influence).

    ``inputs`` are the validated leaves at ``theta`` (and the hyperparameters);
    ``outer_at`` the leaves of ``theta'`` (None: ``theta``). The arithmetic is the
    formula's (flat vectors in the accumulator dtype, the mixed product as the gradient of
    one inner product), and every finiteness check is one stacked probe read once (the
    solution's from ``lr ||grad_theta g||``, ``||grad_theta f||`` from the leaves' norms).
    """
    p_spec, h_spec = inputs.param_spec, inputs.hparam_spec
    p, h = _fresh(inputs.param_leaves), _fresh(inputs.hparam_leaves)
    q = _fresh(inputs.param_leaves if outer_at is None else outer_at)
    h_outer = _fresh(inputs.hparam_leaves)
    device, dtype = p[0].device, _tree.accumulator_dtype(p)
    with torch.enable_grad():
        f = as_scalar_loss(
            problem.inner_loss(_tree.unflatten(p_spec, p), _tree.unflatten(h_spec, h)), "inner_loss"
        )
        gf = _grads(f, p, create_graph=True)
        if delayed_error_in([t for t in gf if t is not None and t.requires_grad]):
            return None  # a once-differentiable function: the general formula falls back
        g = as_scalar_loss(
            problem.outer_loss(_tree.unflatten(p_spec, q), _tree.unflatten(h_spec, h_outer)),
            "outer_loss",
        )
        gq = _grads(g, q + h_outer)
        b = _tree.cat(gq[: len(q)], p_spec, dtype, device)
        x = lr * b
        mixed = _mixed(gf, x, inputs, h)
    direct, hdtype = gq[len(q) :], _tree.common_dtype(inputs.hparam_leaves)
    if any(d is None and m is None for d, m in zip(direct, mixed)):
        return None
    flat_direct = _tree.cat(direct, h_spec, hdtype, device)
    diff = flat_direct - _tree.cat(mixed, h_spec, hdtype, device)
    values = _read(gf, b, (f, g, flat_direct, diff))
    # |x_i| = lr |b_i| <= lr ||b||: x is finite when that bound is (no pass over x)
    bound = values[1] * lr < torch.finfo(x.dtype).max
    if not (all(math.isfinite(v) for v in values) and bound) or values[1] == 0.0:
        return None
    out, start = [], 0
    for leaf, n in zip(inputs.hparam_leaves, h_spec.numels):
        piece = diff[start : start + n].reshape(leaf.shape)
        out.append((piece if piece.dtype == leaf.dtype else piece.to(leaf.dtype)).clone())
        start += n
    terms = LookAheadTerms(values[3], values[2], values[0], values[1], x.detach())
    return _tree.unflatten(h_spec, out), terms
