"""The implicit method objects: :class:`Implicit` (any solver) and :class:`IFT` (the
hyper-optimizer's default, a Neumann series with a safe step).

Bengio (2000); Lorraine et al. (2020), AISTATS. The functional forms are in
:mod:`hypergradient.methods.implicit`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .._vocab import Status, as_bool, as_float, as_int
from ..solvers import CG, AutoDamping, Neumann, Solver
from ..solvers.base import non_default
from ._checks import Inputs
from .base import Problem
from .formula import ImplicitInfo
from .implicit_base import (
    ImplicitMethod,
    as_solver,
    check_warm_state,
    solver_config,
    warm_status,
    warm_vector,
)
from .leaf_rates import smallest_rate

__all__ = ["IFT", "Implicit"]


class Implicit(ImplicitMethod):
    """Implicit differentiation at the current parameters, ``H^{-1}`` by any solver.

    .. math::

        \\frac{dg}{d\\phi} = \\partial_\\phi g - \\partial^2_{\\phi\\theta} f \\,
        (H + \\lambda I)^{-1} \\nabla_\\theta g

    Args:
        solver: any :mod:`hypergradient.solvers` solver (default ``hg.CG()``).
        damping: ``lambda`` added to the Hessian's diagonal; ``"auto"`` (or an
            :class:`~hypergradient.solvers.AutoDamping`): chosen from a Lanczos estimate of
            the extreme eigenvalues, cached across calls (biased: see ``AutoDamping``).
        batched: how batched products (Nystrom, Exact) run: one vmapped backward (True), a
            loop (False), or "auto" (the faster, timed on the first batch).
        hvp: the product mode (:mod:`hypergradient.operators.modes`): ``"auto"`` (double
            backward; on torch's "not implemented" error, the math attention kernels, then
            first-order products; the mode found is kept for the later calls),
            ``"double"``, ``"double_math"`` or ``"first_order"`` (central differences of
            gradients: no double backward, no retained graph, 2 gradients per product).
            ``info.stats["hvp"]`` is the mode used.
        warm_start: start each solve from the previous call's solution (reuse across
            hyper-steps: consecutive hyper-steps solve nearly the same system). Safe: the
            solution is kept only after a converged or ``maxiter`` exit (never after
            negative curvature or divergence), a start worse than ``x = 0`` is dropped by
            the CG family, ``Neumann`` and ``FixedPoint``, and a model of another size
            starts from 0. ``info.stats["warm_start"]``:
            ``"used"``, ``"dropped"`` or ``"none"``. The kept solution (``P`` numbers) is in
            :meth:`state_dict`.
        residual: compute ``||b - A x||`` with one more product when the solver does not
            report it (fixed budgets); False: ``info.residual_norm`` is None instead, and
            an answer worse than ``x = 0`` is not warned about.

    Cost: ``f`` with a double-backward graph, ``g`` with its gradient, the solver's
    products (each about one gradient), one mixed product, and one product for the
    residual when the solver does not report it (``residual=True``). Memory: ``f``'s
    double-backward graph plus the solver's vectors. State: the solver's (a generator, a
    cached sketch), the damping estimate, the product mode found, in :meth:`state_dict`.
    """

    name = "implicit"
    keep = False  # warm_start
    _x: Tensor | None = None

    def __init__(
        self,
        solver: Solver | None = None,
        damping: float | str | AutoDamping = 0.0,
        *,
        batched: bool | str = "auto",
        hvp: str = "auto",
        warm_start: bool = False,
        residual: bool = True,
    ):
        self.solver = CG() if solver is None else as_solver(solver)
        self.setup(damping, batched, hvp)
        self.keep = as_bool(warm_start, "warm_start")
        self.residual = as_bool(residual, "residual")
        self._x: Tensor | None = None

    def solver_for(self, problem: Problem) -> Solver:
        return self.solver

    def kept_solver(self) -> Solver | None:
        return self.solver

    def config(self) -> dict[str, Any]:
        out = {"solver": solver_config(self.solver), **self.common_config()}
        out |= {"warm_start": True} if self.keep else {}
        return out | ({"residual": False} if not self.residual else {})

    def warm_start(self, inputs: Inputs) -> Tensor | None:
        return warm_vector(self._x, inputs) if self.keep else None

    def commit(self, solver: Solver, info: ImplicitInfo) -> None:
        if not self.keep:
            return
        info.stats["warm_start"] = warm_status(self._x, info)
        safe = Status(info.status) in (Status.CONVERGED, Status.MAX_ITERATIONS)
        self._x = info.solution if safe and info.solution is not None else None

    def own_state(self) -> dict[str, Any]:
        """The solver's state (generator, cached sketch) under ``"solver"`` and, with
        ``warm_start=True``, the kept solution under ``"x"``; {} if none."""
        state = self.solver.state_dict()
        out: dict[str, Any] = {"solver": state} if state else {}
        if self.keep:
            out["x"] = None if self._x is None else self._x.clone()
        return out

    def load_own_state(self, state: Mapping[str, Any]) -> None:
        x = check_warm_state(state["x"], type(self).__name__) if self.keep else None
        if "solver" in state:
            self.solver.load_state_dict(dict(state["solver"]))
        self._x = x


class IFT(Implicit):
    """:class:`Implicit` with the hyper-optimizer's default: a Neumann series (Lorraine
    et al., 2020, AISTATS) with a step that is safe for the run it is in.

    The paper steps the series by the inner learning rate, ``alpha = lr``; the series
    diverges when ``lr lambda_max > 2``, which happens in healthy runs (momentum SGD is
    stable up to ``lr lambda_max ~ 3.8``). The default therefore takes
    ``alpha = min(lr, 1 / (s lambda_est))`` with ``lambda_est`` from a short Lanczos run
    (``power_iters`` products, refreshed every ``refresh_every`` hyper-steps and at once if
    the series diverges; ``s`` the safety factor of :class:`~hypergradient.Neumann`):
    the paper's step whenever it is provably safe, a safe one otherwise.

    Args:
        solver: any solver; default the Neumann series above (kept across calls: its
            estimate, generator and counter are in :meth:`state_dict`).
        damping, batched, hvp, warm_start, residual: as :class:`Implicit` (a solution is
            kept after a converged or ``maxiter`` exit: the default series, a fixed budget
            without ``tol``, keeps none; ``stats["warm_start"]`` then says ``"none"``).
        maxiter: products of the default Neumann series (it sums ``maxiter + 1`` terms).
        alpha: None (default): the safe step above; a number: that fixed step (no
            estimate; the divergence check still stops the series); ``"auto"``:
            ``1 / (s lambda_est)`` without the ``lr`` cap.
        power_iters, refresh_every: the estimate's products and how often it is renewed.
        seed: the estimate's random start (None: from torch's global generator).

    ``maxiter``, ``alpha``, ``power_iters``, ``refresh_every`` and ``seed`` configure the
    default series only: with a ``solver`` a value other than their default raises a
    ``ValueError`` (set them on that solver instead).

    Cost: ``maxiter`` products, plus ``power_iters`` every ``refresh_every`` calls.
    """

    def __init__(
        self,
        solver: Solver | None = None,
        damping: float | str | AutoDamping = 0.0,
        *,
        batched: bool | str = "auto",
        hvp: str = "auto",
        maxiter: int = 10,
        alpha: float | str | None = None,
        power_iters: int = 10,
        refresh_every: int = 10,
        seed: int | None = None,
        warm_start: bool = False,
        residual: bool = True,
    ):
        self.setup(damping, batched, hvp)
        self.keep = as_bool(warm_start, "warm_start")
        self.residual = as_bool(residual, "residual")
        self._x = None
        self.maxiter = as_int(maxiter, "maxiter", min=1)
        if alpha is not None and alpha != "auto":
            alpha = as_float(alpha, "alpha", min=0.0, open_min=True)
        self.alpha = alpha
        self.power_iters = as_int(power_iters, "power_iters", min=1)
        self.refresh_every = as_int(refresh_every, "refresh_every", min=1)
        self.default = solver is None
        estimate = non_default(  # the settings of the step's estimate
            power_iters=(power_iters, 10), refresh_every=(refresh_every, 10), seed=(seed, None)
        )
        if solver is not None:
            self.solver = as_solver(solver)
            named = non_default(maxiter=(maxiter, 10), alpha=(alpha, None)) + estimate
            if named:  # they configure the default series only: never silently dropped
                raise ValueError(
                    f"IFT({self.solver!r}, ...) does not use {', '.join(named)}: they "
                    "configure IFT's default Neumann series. Set them on the solver you "
                    "pass (e.g. hg.CG(maxiter=...), hg.Neumann(maxiter, alpha)), or pass "
                    "no solver."
                )
        else:  # the estimate's settings only where the step is estimated
            if isinstance(alpha, float) and estimate:
                raise ValueError(
                    f"IFT(alpha={alpha:g}) does not use {', '.join(estimate)}: they configure "
                    "the estimate of the step (alpha None or 'auto'). Drop them or alpha."
                )
            self.solver = (
                Neumann(self.maxiter, alpha)
                if isinstance(alpha, float)
                else Neumann(
                    self.maxiter,
                    "auto",
                    power_iters=self.power_iters,
                    refresh_every=self.refresh_every,
                    seed=seed,
                )
            )

    def solver_for(self, problem: Problem) -> Solver:
        if self.default and self.alpha is None:
            if problem.lr is None:
                raise ValueError(
                    "IFT's default Neumann solver caps its step at the inner learning rate: "
                    "pass Problem(lr=...), or IFT(alpha=...), or a solver (IFT(hg.CG()))."
                )
            lr = smallest_rate(problem.lr)  # param groups of several rates: the smallest
            self.solver.alpha_max = lr  # type: ignore[attr-defined]
        return self.solver

    def config(self) -> dict[str, Any]:
        out = {**super().config(), "maxiter": self.maxiter, "alpha": self.alpha}
        out.update(power_iters=self.power_iters, refresh_every=self.refresh_every)
        return out
