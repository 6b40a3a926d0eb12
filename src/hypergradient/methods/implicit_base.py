"""The call of every method built on the implicit formula (Implicit/IFT, HOAG, T1T2).

:class:`ImplicitMethod` owns the sequence every such call follows, so no subclass can
forget a step: validate the problem, run the distributed consistency check (values and
the whole configuration), compute the formula, and on failure restore the solver's state
(its generator, a cached sketch) and the damping estimate, so a call that raises changes
nothing. Subclasses say which solver (:meth:`~ImplicitMethod.solver_for`), at which points
(:meth:`~ImplicitMethod.points`), with which warm start, and what to keep afterwards
(:meth:`~ImplicitMethod.commit`).

Settings every implicit method shares: ``damping`` (a number, ``"auto"`` or an
:class:`~hypergradient.solvers.AutoDamping`), ``hvp`` (the product mode of
:mod:`hypergradient.operators.modes`; in ``"auto"`` the mode found on the first call is
kept for the later ones, so the failed double-backward attempt is made once) and
``batched``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .. import _tree
from .._tree import Tree
from .._vocab import ArgumentTypeError, as_choice, as_float
from ..operators import MODES, HessianOperator
from ..solvers import AutoDamping, Solver
from ..solvers.extremes import nonzero
from ._checks import (
    BATCHED,
    Inputs,
    all_finite,
    check_inputs,
    check_no_alias,
    check_problem,
    consistent_start,
    fingerprint_config,
)
from .base import Method, Problem
from .formula import ImplicitInfo, implicit_hypergradient
from .leaf_rates import check_rate_count

__all__ = [
    "ImplicitMethod",
    "as_damping",
    "as_hvp",
    "as_solver",
    "check_state_keys",
    "check_warm_state",
    "damping_config",
    "solver_config",
    "warm_status",
    "warm_vector",
]


def as_solver(solver: Any, name: str = "solver") -> Solver:
    """``solver`` if it is a :class:`~hypergradient.Solver`."""
    if not isinstance(solver, Solver):
        raise ArgumentTypeError(
            f"`{name}` must be a hypergradient solver such as hg.CG(), got {type(solver).__name__}."
        )
    return solver


def as_damping(value: Any, name: str = "damping") -> float | AutoDamping:
    """A number >= 0, or an :class:`AutoDamping` (``"auto"`` makes a default one)."""
    if isinstance(value, AutoDamping):
        return value
    if isinstance(value, str):
        as_choice(value, name, ("auto",))
        return AutoDamping()
    return as_float(value, name, min=0.0, hint=" Or pass damping='auto'.")


def as_hvp(value: Any, name: str = "hvp") -> str:
    """A product mode: ``"auto"``, ``"double"``, ``"double_math"`` or ``"first_order"``."""
    return as_choice(value, name, MODES)


def damping_config(damping: float | AutoDamping) -> float | dict[str, Any]:
    """The damping as plain data."""
    if isinstance(damping, AutoDamping):
        return {"type": "AutoDamping", **damping.config()}
    return damping


def solver_config(solver: Solver | None) -> dict[str, Any] | None:
    """The solver's type and settings as plain data (None for a per-call default)."""
    if solver is None:
        return None
    cfg = {
        k: (v if v is None or isinstance(v, (bool, int, float, str)) else repr(v))
        for k, v in solver.config().items()
    }
    return {"type": type(solver).__name__, **cfg}


def check_state_keys(
    state: Any, expected: set[str], who: str, optional: set[str] | frozenset[str] = frozenset()
) -> Mapping[str, Any]:
    """``state`` if it is a mapping with the keys ``expected`` (and maybe some ``optional``)."""
    if not isinstance(state, Mapping):
        raise ArgumentTypeError(f"{who}.load_state_dict takes a dict, got {type(state).__name__}.")
    missing = sorted(expected - set(state))
    extra = sorted(set(state) - expected - set(optional))
    if missing or extra:
        raise ValueError(
            f"{who}'s checkpoint does not match: missing keys {missing}, unexpected keys "
            f"{extra}; it was saved from another method or solver."
        )
    return state


def warm_status(kept: Tensor | None, info: ImplicitInfo) -> str:
    """``info.stats["warm_start"]``: ``"dropped"`` (the solver refused it), ``"used"``, or
    ``"none"``: no kept solution, one of another size (the model changed) or zero, which
    never reached the solver (it said "used" for both)."""
    if info.stats.get("warm_start_dropped"):
        return "dropped"
    x = info.solution
    if kept is None or x is None or kept.numel() != x.numel() or not nonzero(kept):
        return "none"
    return "used"


def warm_vector(x: Tensor | None, inputs: Inputs) -> Tensor | None:
    """A kept solution as the next call's start: None if there is none or the model
    changed size; else in the parameters' accumulator dtype and device."""
    if x is None or x.numel() != inputs.param_spec.size:
        return None
    p = inputs.param_leaves
    return x.to(dtype=_tree.accumulator_dtype(p), device=p[0].device)


def check_warm_state(x: Any, who: str) -> Tensor | None:
    """A warm start read from a checkpoint: None, or a finite 1-D float tensor (copied)."""
    if x is None:
        return None
    if not isinstance(x, Tensor) or x.dim() != 1 or not x.is_floating_point():
        raise ArgumentTypeError(
            f"{who}'s checkpoint holds a warm start `x` that is not a 1-D floating-point "
            f"tensor ({type(x).__name__}); it was saved from another method."
        )
    if not all_finite([x]):
        raise ValueError(f"{who}'s checkpoint holds a warm start with NaN or Inf.")
    return x.detach().clone()


def _check_found_mode(value: Any, who: str) -> tuple[str, str | None] | None:
    """The ``"hvp"`` entry of a checkpoint: ``{"mode": ..., "reason": ...}``."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) != {"mode", "reason"}:
        raise ValueError(
            f"{who}'s checkpoint: `hvp` must be {{'mode': ..., 'reason': ...}}, got {value!r}."
        )
    mode = as_choice(value["mode"], "state['hvp']['mode']", MODES[1:])
    reason = value["reason"]
    if reason is not None and not isinstance(reason, str):
        raise ValueError(f"{who}'s checkpoint: `hvp['reason']` must be a string or None.")
    return mode, reason


def _check_randomized_solver(solver: Solver, group: Any) -> None:
    """A randomized solver without a recorded seed cannot be vouched equal across ranks."""
    if group is None:
        return
    cfg = solver.config()
    if "seed" in cfg and cfg["seed"] is None and not solver.state_dict():
        raise ValueError(
            f"{type(solver).__name__} draws a random sketch; with `process_group` every rank "
            "must draw the same one: pass seed=... (the same on every rank)."
        )


@dataclass
class _Prepared:
    inputs: Inputs
    solver: Solver
    outer_at: list[Tensor] | None
    x0: Tensor | None


class ImplicitMethod(Method):
    """Base class of the methods that evaluate the implicit formula.

    Attributes every subclass sets (through :meth:`setup`): ``damping`` (a float >= 0 or
    an :class:`~hypergradient.solvers.AutoDamping`), ``batched`` (True, False or "auto")
    and ``hvp`` (the requested product mode).
    """

    damping: float | AutoDamping = 0.0
    batched: bool | str = "auto"
    hvp: str = "auto"
    residual = True  # compute ||b - A x|| when the solver does not report it
    _found: tuple[str, str | None] | None = None  # the mode "auto" settled on, and why

    def setup(self, damping: Any = 0.0, batched: Any = "auto", hvp: Any = "auto") -> None:
        """Validate and store the shared settings."""
        self.damping = as_damping(damping)
        self.batched = as_choice(batched, "batched", BATCHED)
        self.hvp = as_hvp(hvp)
        self._found = None

    # -- hooks ------------------------------------------------------------------------
    def solver_for(self, problem: Problem) -> Solver:
        """The solver of this call."""
        raise NotImplementedError

    def points(self, problem: Problem) -> tuple[Tree, Tree | None]:
        """Where the operator is built, and where ``g``'s gradient is taken (None: there)."""
        return problem.params, None

    def warm_start(self, inputs: Inputs) -> Tensor | None:
        """The solver's starting point when the call gives none."""
        return None

    def commit(self, solver: Solver, info: ImplicitInfo) -> None:
        """Keep what the next call needs (called only after a successful call)."""

    def own_state(self) -> dict[str, Any]:
        """The subclass's part of :meth:`state_dict`."""
        return {}

    def load_own_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`own_state` (keys checked); validate before assigning."""

    def kept_solver(self) -> Solver | None:
        """The solver object kept across calls (its state is rolled back on failure)."""
        return None

    # -- state --------------------------------------------------------------------------
    def product_mode(self) -> str:
        """The mode of the next call: the one ``"auto"`` found, else the requested one."""
        return self._found[0] if self._found is not None else self.hvp

    def common_config(self) -> dict[str, Any]:
        """The settings every implicit method has: damping, batched, hvp (plain data)."""
        return {"damping": damping_config(self.damping), "batched": self.batched, "hvp": self.hvp}

    def state_dict(self) -> dict[str, Any]:
        """The subclass's state, the damping estimate (``"damping"``, with
        ``damping="auto"``) and the product mode "auto" settled on (``"hvp"``, once found)."""
        out = dict(self.own_state())
        if isinstance(self.damping, AutoDamping):
            out["damping"] = self.damping.state_dict()
        if self._found is not None:
            out["hvp"] = {"mode": self._found[0], "reason": self._found[1]}
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        who = type(self).__name__
        own = set(self.own_state())
        auto = isinstance(self.damping, AutoDamping)
        state = check_state_keys(state, own | ({"damping"} if auto else set()), who, {"hvp"})
        found = _check_found_mode(state.get("hvp"), who)
        snap = self._snapshot()
        try:
            if auto:
                self.damping.load_state_dict(state["damping"])  # type: ignore[union-attr]
            self.load_own_state({k: state[k] for k in own})
        except BaseException:
            self._restore(snap)
            raise
        self._found = found

    def _snapshot(self) -> tuple[Any, Any]:
        solver = self.kept_solver()
        damping = self.damping.snapshot() if isinstance(self.damping, AutoDamping) else None
        return (None if solver is None else solver.snapshot(), damping)

    def _restore(self, snap: tuple[Any, Any]) -> None:
        solver = self.kept_solver()
        if solver is not None and snap[0] is not None:
            solver.restore(snap[0])
        if isinstance(self.damping, AutoDamping) and snap[1] is not None:
            self.damping.restore(snap[1])

    # -- the call ---------------------------------------------------------------------
    def _prepare(self, problem: Problem, x0: Any) -> _Prepared:
        solver = self.solver_for(problem)
        at, after = self.points(problem)
        inputs = check_inputs(at, problem.hparams, "params")
        check_rate_count(problem.lr, len(inputs.param_leaves))
        outer_at = None
        if after is not None:
            outer_at, spec = _tree.flatten(after, "params")
            problem_text = _tree.mismatch(spec, "params", inputs.param_spec, "params")
            if problem_text is not None:
                raise ValueError(f"`params` and `prev_params` differ: {problem_text}.")
            check_no_alias(inputs.hparam_leaves, inputs.hparam_spec, outer_at, "params")
            if not all_finite(outer_at):
                check_inputs(after, problem.hparams, "params")  # names the leaf
        _check_randomized_solver(solver, problem.process_group)
        p = inputs.param_leaves
        if x0 is None:
            flat = self.warm_start(inputs)
        else:
            dtype = _tree.accumulator_dtype(p)
            flat = _tree.as_flat(x0, inputs.param_spec, "x0", dtype, p[0].device)
        return _Prepared(inputs, solver, outer_at, flat)

    def _checks(self, prep: _Prepared) -> list[tuple[list[Tensor], str]]:
        name = "`params`" if prep.outer_at is None else "`prev_params`"
        pairs = [(prep.inputs.hparam_leaves, "`hparams`"), (prep.inputs.param_leaves, name)]
        if prep.outer_at is not None:
            pairs.append((prep.outer_at, "`params`"))
        return pairs

    def _note_mode(self, info: ImplicitInfo) -> None:
        """Keep the mode "auto" settled on; report the reason on the later calls too."""
        mode = info.stats.get("hvp")
        if self._found is not None:
            info.stats["hvp_fallback"] = self._found[1]
        elif self.hvp == "auto" and mode not in (None, "double"):
            self._found = (mode, info.stats.get("hvp_fallback"))

    def __call__(self, problem: Problem, *, x0: Tree | Tensor | None = None) -> tuple[Tree, Any]:
        """The hypergradient of ``problem`` and an :class:`ImplicitInfo`.

        ``x0``: a warm start for the solve (a tree like ``params`` or a flat vector), used
        instead of the method's own.
        """
        started = time.perf_counter()
        problem = check_problem(problem, type(self).__name__)
        group = problem.process_group
        prep = consistent_start(
            lambda: self._prepare(problem, x0),
            group,
            self._checks,
            lambda: fingerprint_config(
                self, lr=problem.lr, by_reference=bool(problem.hparams_by_reference)
            ),
        )
        mode = self.product_mode()
        inputs = prep.inputs

        def build() -> HessianOperator:
            return HessianOperator.from_leaves(
                problem.inner_loss,
                (inputs.param_leaves, inputs.param_spec),
                (inputs.hparam_leaves, inputs.hparam_spec),
                batched=self.batched,
                hparams_by_reference=bool(problem.hparams_by_reference),
                mode=mode,
            )

        snap = self._snapshot()
        if self.kept_solver() is not prep.solver:
            snap = (prep.solver.snapshot(), snap[1])
        try:
            result, info = implicit_hypergradient(
                build,
                problem.outer_loss,
                prep.inputs,
                prep.solver,
                method=self.name,
                damping=self.damping,
                x0=prep.x0,
                outer_at=prep.outer_at,
                by_reference=bool(problem.hparams_by_reference),
                group=group,
                residual=self.residual,
                started=started,
            )
        except BaseException:
            # a failed call leaves the solver's generator and sketch, and the damping, as
            # they were
            if snap[0] is not None:
                prep.solver.restore(snap[0])
            if isinstance(self.damping, AutoDamping) and snap[1] is not None:
                self.damping.restore(snap[1])
            raise
        self._note_mode(info)
        self.commit(prep.solver, info)
        return result, info
