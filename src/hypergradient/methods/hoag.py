"""HOAG: implicit differentiation with CG to a decreasing tolerance, warm-started.

Pedregosa (2016), "Hyperparameter optimization with approximate gradient", ICML.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .. import _tree
from .._vocab import ArgumentTypeError, as_choice, as_float, as_int
from ..solvers import CG, Solver
from ._checks import BATCHED, Inputs, all_finite
from .base import Problem
from .formula import ImplicitInfo
from .implicit_base import ImplicitMethod, check_state_keys

__all__ = ["HOAG"]


class HOAG(ImplicitMethod):
    """HOAG (Pedregosa, 2016, ICML): conjugate gradient to a decreasing tolerance.

    The ``k``-th call solves ``(H + damping I) x = grad_theta g`` by CG to relative
    tolerance ``max(tol * decay**k, min_tol)``, warm-started from the previous solution,
    so early (inaccurate) hyper-steps are cheap and late ones accurate. Then the implicit
    formula, as :class:`~hypergradient.Implicit`.

    Args:
        maxiter: CG iterations (products) per call.
        tol, decay, min_tol: the tolerance schedule (``0 < decay <= 1``).
        damping: added to the Hessian's diagonal.
        batched: as :class:`~hypergradient.Implicit`.

    Cost: at most ``maxiter`` products per call (plus ``f``'s graph, ``g``'s gradient
    and the mixed product). State: ``k`` and the last solution (``P`` numbers), in
    :meth:`state_dict`; updated only when a call succeeds.
    """

    name = "hoag"

    def __init__(
        self,
        maxiter: int = 50,
        tol: float = 1e-1,
        decay: float = 0.9,
        min_tol: float = 1e-10,
        damping: float = 0.0,
        *,
        batched: bool | str = "auto",
    ):
        self.maxiter = as_int(maxiter, "maxiter", min=1)
        self.tol = as_float(tol, "tol", min=0.0, open_min=True)
        self.decay = as_float(decay, "decay", min=0.0, max=1.0, open_min=True)
        self.min_tol = as_float(min_tol, "min_tol", min=0.0)
        self.damping = as_float(damping, "damping", min=0.0)
        self.batched = as_choice(batched, "batched", BATCHED)
        self._k = 0
        self._x: Tensor | None = None

    def current_tol(self) -> float:
        """The relative tolerance of the next call, ``max(tol * decay**k, min_tol)``."""
        return max(self.tol * self.decay**self._k, self.min_tol)

    def solver_for(self, problem: Problem) -> Solver:
        return CG(self.maxiter, self.current_tol())

    def warm_start(self, inputs: Inputs) -> Tensor | None:
        x = self._x
        if x is None or x.numel() != inputs.param_spec.size:  # the model changed size
            return None
        p = inputs.param_leaves
        return x.to(dtype=_tree.accumulator_dtype(p), device=p[0].device)

    def commit(self, solver: Solver, info: ImplicitInfo) -> None:
        info.stats["tol"] = self.current_tol()
        self._x = info.solution
        self._k += 1

    def state_dict(self) -> dict[str, Any]:
        return {"k": self._k, "x": None if self._x is None else self._x.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = check_state_keys(state, {"k", "x"}, "HOAG")
        k = as_int(state["k"], "state['k']", min=0)
        x = state["x"]
        if x is not None:
            if not isinstance(x, Tensor) or x.dim() != 1 or not x.is_floating_point():
                raise ArgumentTypeError(
                    "HOAG's checkpoint holds a warm start `x` that is not a 1-D floating-point "
                    f"tensor ({type(x).__name__}); it was saved from another method."
                )
            if not all_finite([x]):
                raise ValueError("HOAG's checkpoint holds a warm start with NaN or Inf.")
            x = x.detach().clone()
        self._k, self._x = k, x
