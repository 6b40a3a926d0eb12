"""One inner learning rate per parameter leaf: ``Problem.lr`` for param groups of several rates.

An inner optimizer whose param groups use different learning rates (a smaller rate for a
pretrained backbone, a frozen group at ``lr=0``) takes the step
``theta' = theta - Lambda grad_theta f`` with ``Lambda`` diagonal: each leaf's entries carry
its group's rate. ``Problem.lr`` may then be a sequence of rates, one per leaf of
``params`` in the order ``params`` flattens (a dict's keys, a tuple's or list's items).
T1T2 differentiates that step exactly (``H^{-1} ~ Lambda``, :class:`LeafRates`); IFT's
default Neumann series caps its step at the smallest positive rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor

from .. import _tree
from .._vocab import Status, as_float
from ..operators import LinearOperator
from ..solvers import Identity, Solution, Solver
from ..solvers.base import require_finite_solution

__all__ = [
    "LeafRates",
    "as_rates",
    "check_rate_count",
    "look_ahead_solver",
    "rate_items",
    "smallest_rate",
]


def rate_items(lr: Any) -> tuple[Any, ...] | None:
    """The items of a ``Problem.lr`` that gives one rate per leaf (a list, tuple or other
    sequence, a 1-D tensor or array), unvalidated; None for anything else (a number)."""
    if getattr(lr, "ndim", 0) == 1 and hasattr(lr, "tolist"):  # a tensor or array of rates
        return tuple(lr.tolist())
    if isinstance(lr, Sequence) and not isinstance(lr, (str, bytes)):
        return tuple(lr)
    return None


def as_rates(lr: Any) -> float | tuple[float, ...]:
    """``Problem.lr`` validated: a number > 0, or a sequence of numbers >= 0 (one per
    parameter leaf) with at least one > 0.

    Raises:
        ArgumentTypeError: a rate is not a real number.
        ValueError: a rate is negative, NaN or infinite; the sequence is empty or all 0.
    """
    items = rate_items(lr)
    if items is None:
        return as_float(lr, "lr", min=0.0, open_min=True, hint=_FORMS)
    if not items:
        raise ValueError(
            "`lr` is an empty sequence; pass the inner learning rate, or one rate per leaf "
            "of `params`."
        )
    rates = tuple(as_float(r, f"lr[{i}]", min=0.0) for i, r in enumerate(items))
    if not any(r > 0.0 for r in rates):
        raise ValueError(
            f"every rate in `lr` is 0 ({len(rates)} leaves): no parameter moved in the inner "
            "step, so there is nothing to differentiate. Pass the rates the step used."
        )
    return rates


_FORMS = (
    " `lr` is the inner learning rate (a number), or one rate per leaf of `params` (a list, "
    "tuple or 1-D tensor, in the order `params` flattens)."
)


def smallest_rate(lr: Any) -> float:
    """The smallest positive rate of a validated ``Problem.lr`` (the number itself)."""
    rates = as_rates(lr)
    if isinstance(rates, float):
        return rates
    return min(r for r in rates if r > 0.0)


def look_ahead_solver(lr: Any) -> Solver:
    """T1T2's ``H^{-1} ~ lr I``: ``Identity(lr)`` for one rate (or equal ones), else
    :class:`LeafRates` (to :meth:`~LeafRates.bind` to the leaves)."""
    rates = as_rates(lr)
    if isinstance(rates, float):
        return Identity(rates)
    return Identity(rates[0]) if len(set(rates)) == 1 else LeafRates(rates)


def check_rate_count(lr: Any, leaves: int) -> None:
    """Raise unless a sequence ``lr`` has one rate per parameter leaf (a number: nothing)."""
    items = rate_items(lr)
    if items is not None and len(items) != leaves:
        raise ValueError(
            f"`lr` gives {len(items)} learning rates but `params` has {leaves} leaves; pass one "
            "rate per leaf, in the order `params` flattens (a dict's keys, a sequence's "
            "items), or a single number."
        )


class LeafRates(Solver):
    """``A^{-1} ~ Lambda``, the diagonal of per-leaf learning rates: no products.

    T1T2's look-ahead ``H^{-1} ~ lr I`` for an inner step whose param groups use several
    rates (``Problem.lr`` a sequence). :meth:`bind` lays the diagonal out over the leaves
    once their sizes are known.

    Args:
        rates: one rate >= 0 per parameter leaf, at least one > 0.

    Cost: no product; the diagonal (``n`` entries) beside the result.
    """

    def __init__(self, rates: Sequence[float]):
        self.rates = cast(tuple[float, ...], as_rates(tuple(rates)))  # a tuple stays one
        self._scale: Tensor | None = None

    def bind(self, leaves: Sequence[Tensor]) -> LeafRates:
        """Lay the rates out over the parameter ``leaves`` (one rate per leaf), in their
        accumulator dtype."""
        check_rate_count(self.rates, len(leaves))
        device = leaves[0].device
        rates = torch.tensor(self.rates, dtype=_tree.accumulator_dtype(leaves), device=device)
        sizes = torch.tensor([t.numel() for t in leaves], device=device)
        self._scale = torch.repeat_interleave(rates, sizes)
        return self

    @property
    def diagonal(self) -> Tensor:
        """The rates laid out over the entries (after :meth:`bind`)."""
        if self._scale is None:
            raise ValueError("LeafRates: call bind(leaves) with the parameter leaves first.")
        return self._scale

    def solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> Solution:
        self.validate(op, b, x0)
        scale = self.diagonal
        if scale.numel() != b.numel():
            raise ValueError(
                f"LeafRates.solve: the rates are laid out over {scale.numel()} entries and the "
                f"system has {b.numel()}; bind(leaves) with this system's parameter leaves."
            )
        x = (scale if scale.dtype == b.dtype else scale.to(b.dtype)) * b
        require_finite_solution(x)
        return Solution(x, 0, None, None, Status.FIXED_BUDGET, 0)

    def config(self) -> dict[str, Any]:
        return {"rates": list(self.rates)}
