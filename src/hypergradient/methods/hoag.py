"""HOAG: implicit differentiation with CG to a decreasing tolerance, warm-started.

Pedregosa (2016), "Hyperparameter optimization with approximate gradient", ICML.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from .._vocab import ArgumentTypeError, Status, as_float, as_int
from ..solvers import CG, AutoDamping, Solver
from ._checks import Inputs
from .base import Problem
from .formula import ImplicitInfo
from .implicit_base import ImplicitMethod, check_warm_state, warm_status, warm_vector

__all__ = ["HOAG"]

#: Exits after which the solution is not kept as the next warm start (default).
RESETS = ("negative_curvature", "max_iterations")


class HOAG(ImplicitMethod):
    """HOAG (Pedregosa, 2016, ICML): conjugate gradient to a decreasing tolerance.

    The ``k``-th call solves ``(H + damping I) x = grad_theta g`` by CG to relative
    tolerance ``max(tol * decay**k, min_tol)``, warm-started from the previous solution,
    so early (inaccurate) hyper-steps are cheap and late ones accurate. Then the implicit
    formula, as :class:`~hypergradient.Implicit`. A ``tol`` below ``min_tol`` is raised to
    it: ``HOAG(tol=1e-12)`` solves to ``1e-10`` unless ``min_tol`` is lowered as well.

    Warm starts are kept only when they are safe. On a non-convex inner problem a CG run
    that exits on negative curvature (or at ``maxiter``, far from its tolerance) leaves a
    partial solution that can be a poor start for the next system, and chaining such
    starts made the residual grow geometrically (hypergradient norms of 4e8 after 50
    hyper-steps on a tanh MLP, ``tests/test_implicit_hoag.py``). So:

    - a warm start whose residual exceeds ``||b||`` (worse than ``x = 0``) is dropped by
      CG (``stats["warm_start"] = "dropped"``, one product);
    - after an exit listed in ``reset_on`` (default: negative curvature and max
      iterations) the next call starts from 0 (``stats["warm_start_reset"]`` names the
      exit). ``reset_on=("negative_curvature",)`` keeps the warm restarts of the paper
      across calls that stop at ``maxiter``, which is what makes HOAG converge over
      hyper-steps on convex problems.

    Args:
        maxiter: CG iterations (products) per call.
        tol, decay, min_tol: the tolerance schedule (``0 < decay <= 1``).
        damping: added to the Hessian's diagonal (or ``"auto"``, as
            :class:`~hypergradient.Implicit`).
        batched, hvp: as :class:`~hypergradient.Implicit`.
        reset_on: the exits after which the warm start is dropped (a subset of
            ``("negative_curvature", "max_iterations")``).

    Cost: at most ``maxiter + 1`` products per call (``maxiter`` CG iterations and, from a
    warm start, its residual ``b - A x0``; with ``damping="auto"`` also the estimate's),
    plus ``f``'s graph, ``g``'s gradient and the mixed product. State: ``k`` and the last
    solution (``P`` numbers), in :meth:`state_dict`; updated only when a call succeeds.
    """

    name = "hoag"

    def __init__(
        self,
        maxiter: int = 50,
        tol: float = 1e-1,
        decay: float = 0.9,
        min_tol: float = 1e-10,
        damping: float | str | AutoDamping = 0.0,
        *,
        batched: bool | str = "auto",
        hvp: str = "auto",
        reset_on: Sequence[str] = RESETS,
    ):
        self.maxiter = as_int(maxiter, "maxiter", min=1)
        self.tol = as_float(tol, "tol", min=0.0, open_min=True)
        self.decay = as_float(decay, "decay", min=0.0, max=1.0, open_min=True)
        self.min_tol = as_float(min_tol, "min_tol", min=0.0)
        for name, v in (("tol", self.tol), ("min_tol", self.min_tol)):
            if v >= 1.0:  # CG's relative tolerance
                raise ValueError(
                    f"`{name}` must be < 1, got {v:g}: a relative residual tolerance of 1 or "
                    "more is met by x = 0 with no product; use e.g. 0.1."
                )
        self.reset_on = _as_resets(reset_on)
        self.setup(damping, batched, hvp)
        self._k = 0
        self._x: Tensor | None = None

    def current_tol(self) -> float:
        """The relative tolerance of the next call, ``max(tol * decay**k, min_tol)``."""
        return max(self.tol * self.decay**self._k, self.min_tol)

    def config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"maxiter": self.maxiter, "tol": self.tol, "decay": self.decay}
        out |= {"min_tol": self.min_tol, "reset_on": list(self.reset_on)}
        return out | self.common_config()

    def solver_for(self, problem: Problem) -> Solver:
        return CG(self.maxiter, self.current_tol())

    def warm_start(self, inputs: Inputs) -> Tensor | None:
        return warm_vector(self._x, inputs)

    def commit(self, solver: Solver, info: ImplicitInfo) -> None:
        info.stats["tol"] = self.current_tol()
        info.stats["warm_start"] = warm_status(self._x, info)
        status = Status(info.status)
        # a solve limited by the products' precision (bfloat16) is as good as it gets: a
        # safe start, not a partial one
        if status.value in self.reset_on and not info.stats.get("precision_limited"):
            info.stats["warm_start_reset"] = status.value
            self._x = None
        else:
            self._x = info.solution
        self._k += 1

    def own_state(self) -> dict[str, Any]:
        return {"k": self._k, "x": None if self._x is None else self._x.clone()}

    def load_own_state(self, state: Mapping[str, Any]) -> None:
        k = as_int(state["k"], "state['k']", min=0)
        self._k, self._x = k, check_warm_state(state["x"], "HOAG")


def _as_resets(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ArgumentTypeError(
            "`reset_on` must be a list or tuple of exits, e.g. ('negative_curvature',), "
            f"got {value!r}."
        )
    for item in value:
        if item not in RESETS:
            raise ValueError(f"`reset_on` entries must be among {list(RESETS)}, got {item!r}.")
    return tuple(value)
