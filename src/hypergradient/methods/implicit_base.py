"""The call of every method built on the implicit formula (Implicit/IFT, HOAG, T1T2).

:class:`ImplicitMethod` owns the sequence every such call follows, so no subclass can
forget a step: validate the problem, run the distributed consistency check (values and
the whole configuration), compute the formula, and on failure restore the solver's state
(its generator, a cached sketch), so a call that raises changes nothing. Subclasses say
which solver (:meth:`~ImplicitMethod.solver_for`), at which points
(:meth:`~ImplicitMethod.points`), with which warm start, and what to keep afterwards
(:meth:`~ImplicitMethod.commit`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .. import _tree
from .._tree import Tree
from .._vocab import ArgumentTypeError
from ..operators import HessianOperator
from ..solvers import Solver
from ._checks import (
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

__all__ = ["ImplicitMethod", "as_solver", "check_state_keys", "solver_config"]


def as_solver(solver: Any, name: str = "solver") -> Solver:
    """``solver`` if it is a :class:`~hypergradient.Solver`."""
    if not isinstance(solver, Solver):
        raise ArgumentTypeError(
            f"`{name}` must be a hypergradient solver such as hg.CG(), got {type(solver).__name__}."
        )
    return solver


def solver_config(solver: Solver | None) -> dict[str, Any] | None:
    """The solver's type and settings as plain data (None for a per-call default)."""
    if solver is None:
        return None
    cfg = {
        k: (v if v is None or isinstance(v, (bool, int, float, str)) else repr(v))
        for k, v in solver.config().items()
    }
    return {"type": type(solver).__name__, **cfg}


def check_state_keys(state: Any, expected: set[str], who: str) -> Mapping[str, Any]:
    """``state`` if it is a mapping with exactly the keys ``expected``."""
    if not isinstance(state, Mapping):
        raise ArgumentTypeError(f"{who}.load_state_dict takes a dict, got {type(state).__name__}.")
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise ValueError(
            f"{who}'s checkpoint does not match: missing keys {missing}, unexpected keys "
            f"{extra}; it was saved from another method or solver."
        )
    return state


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

    Attributes every subclass sets: ``damping`` (float >= 0) and ``batched`` (how batched
    products run: True, False or "auto").
    """

    damping: float = 0.0
    batched: bool | str = "auto"
    residual = True  # compute ||b - A x|| when the solver does not report it

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

    # -- the call ---------------------------------------------------------------------
    def _prepare(self, problem: Problem, x0: Any) -> _Prepared:
        solver = self.solver_for(problem)
        at, after = self.points(problem)
        inputs = check_inputs(at, problem.hparams, "params")
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
        at, _ = self.points(problem)

        def build() -> HessianOperator:
            return HessianOperator(
                problem.inner_loss,
                at,
                problem.hparams,
                batched=self.batched,
                hparams_by_reference=bool(problem.hparams_by_reference),
            )

        saved = prep.solver.state_dict()
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
            if saved:  # a failed call leaves the solver's generator and sketch as they were
                prep.solver.load_state_dict(saved)
            raise
        self.commit(prep.solver, info)
        return result, info
