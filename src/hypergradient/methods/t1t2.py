"""T1-T2: the one-step look-ahead hypergradient.

Luketina et al. (2016), "Scalable Gradient-Based Tuning of Continuous Regularization
Hyperparameters", ICML.
"""

from __future__ import annotations

from typing import Any

from .._tree import Tree
from .._vocab import as_float
from ..solvers import Identity, Solver
from .base import Problem
from .implicit_base import ImplicitMethod, as_hvp

__all__ = ["T1T2"]


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
