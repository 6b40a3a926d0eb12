"""One inner learning rate per parameter leaf: ``Problem.lr`` for param groups of several rates.

An inner optimizer whose param groups use different learning rates (a smaller rate for a
pretrained backbone, a frozen group at ``lr=0``) takes the step
``theta' = theta - Lambda grad_theta f`` with ``Lambda`` diagonal: each leaf's entries carry
its group's rate. ``Problem.lr`` may then be a sequence of rates, one per leaf of
``params`` in the order ``params`` flattens (a dict's keys, a tuple's or list's items).
T1T2 differentiates that step exactly (``H^{-1} ~ Lambda``, :class:`LeafRates`); IFT's
default Neumann series caps its step at the smallest positive rate.

An item may also be a tensor of its leaf's shape (at least 1-D): per-entry rates, the
diagonal of ``-d theta' / d g`` of an adaptive step (Adam's, which ``hg.HyperOptimizer``
passes T1T2; :mod:`~hypergradient.hyperoptimizer.step_rates`). They must be finite and may
be negative or 0 (the derivative of Adam's normalized step); IFT refuses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor

from .. import _tree
from .._vocab import ArgumentTypeError, Status, as_float
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


def as_rates(lr: Any) -> float | tuple[Any, ...]:
    """``Problem.lr`` validated: a number > 0, or a sequence of numbers >= 0 (one per
    parameter leaf) with at least one > 0; items that are tensors (at least 1-D) are
    per-entry rates, finite, of any sign (detached; shapes are checked by
    :meth:`LeafRates.bind`).

    Raises:
        ArgumentTypeError: a rate is not a real number (or a non-floating-point tensor).
        ValueError: a rate is negative, NaN or infinite; the sequence is empty or all 0;
            per-entry rates are not finite.
    """
    items = rate_items(lr)
    if items is None:
        return as_float(lr, "lr", min=0.0, open_min=True, hint=_FORMS)
    if not items:
        raise ValueError(
            "`lr` is an empty sequence; pass the inner learning rate, or one rate per leaf "
            "of `params`."
        )
    rates = tuple(_as_rate(r, f"lr[{i}]") for i, r in enumerate(items))
    tensors = [(i, r) for i, r in enumerate(rates) if isinstance(r, Tensor)]
    if tensors:  # per-entry rates: any sign, finite (one host read for all)
        finite = torch.stack([torch.isfinite(r).all().cpu() for _, r in tensors]).tolist()
        if not all(finite):
            name = f"lr[{tensors[finite.index(False)][0]}]"
            raise ValueError(f"`{name}` has non-finite per-entry rates; pass finite ones.")
        return rates
    if not any(r > 0.0 for r in rates):
        raise ValueError(
            f"every rate in `lr` is 0 ({len(rates)} leaves): no parameter moved in the inner "
            "step, so there is nothing to differentiate. Pass the rates the step used."
        )
    return rates


def _as_rate(rate: Any, name: str) -> float | Tensor:
    """One item of ``Problem.lr``: a number >= 0, or per-entry rates (a floating-point
    tensor of at least one dimension, detached; :func:`as_rates` checks it is finite)."""
    if isinstance(rate, Tensor) and rate.dim() >= 1:
        if not rate.is_floating_point():
            raise ArgumentTypeError(
                f"`{name}` is a {rate.dtype} tensor; per-entry rates must be floating point."
            )
        return rate.detach()
    return as_float(rate, name, min=0.0)


_FORMS = (
    " `lr` is the inner learning rate (a number), or one rate per leaf of `params` (a list, "
    "tuple or 1-D tensor, in the order `params` flattens)."
)


def smallest_rate(lr: Any) -> float:
    """The smallest positive rate of a validated ``Problem.lr`` (the number itself)."""
    rates = as_rates(lr)
    if isinstance(rates, float):
        return rates
    if any(isinstance(r, Tensor) for r in rates):
        raise ValueError(
            "`lr` holds per-entry rates (tensors: an adaptive step's derivative, for T1T2); "
            "IFT's Neumann series needs a step: pass IFT(alpha=...) or a number as `lr`."
        )
    return min(r for r in rates if r > 0.0)


def look_ahead_solver(lr: Any) -> Solver:
    """T1T2's ``H^{-1} ~ lr I``: ``Identity(lr)`` for one rate (or equal ones), else
    :class:`LeafRates` (to :meth:`~LeafRates.bind` to the leaves)."""
    rates = as_rates(lr)
    if isinstance(rates, float):
        return Identity(rates)
    if any(isinstance(r, Tensor) for r in rates):
        return LeafRates(rates)
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
        rates: one rate >= 0 per parameter leaf, at least one > 0; or per-entry rates for
            some leaves (tensors of their shapes, any sign).

    Cost: no product; the diagonal (``n`` entries) beside the result.
    """

    def __init__(self, rates: Sequence[float | Tensor]):
        self.rates = cast(tuple[Any, ...], as_rates(tuple(rates)))  # a tuple stays one
        self._scale: Tensor | None = None

    def bind(self, leaves: Sequence[Tensor]) -> LeafRates:
        """Lay the rates out over the parameter ``leaves`` (one rate, or one tensor of the
        leaf's shape, per leaf), in their accumulator dtype."""
        check_rate_count(self.rates, len(leaves))
        device, dtype = leaves[0].device, _tree.accumulator_dtype(leaves)
        if any(isinstance(r, Tensor) for r in self.rates):
            self._scale = torch.cat(
                [_entries(r, t, i, dtype) for i, (r, t) in enumerate(zip(self.rates, leaves))]
            )
            return self
        rates = torch.tensor(self.rates, dtype=dtype, device=device)
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
        rates = [f"<{r.numel()} per-entry>" if isinstance(r, Tensor) else r for r in self.rates]
        return {"rates": rates}


def _entries(rate: float | Tensor, leaf: Tensor, i: int, dtype: torch.dtype) -> Tensor:
    """Leaf ``i``'s rates as a flat vector of ``dtype`` on its device (a number repeated)."""
    if not isinstance(rate, Tensor):
        return torch.full((leaf.numel(),), rate, dtype=dtype, device=leaf.device)
    if rate.shape != leaf.shape:
        raise ValueError(
            f"`lr[{i}]` has shape {tuple(rate.shape)} but its leaf of `params` has shape "
            f"{tuple(leaf.shape)}; per-entry rates take the leaf's shape."
        )
    return rate.reshape(-1).to(device=leaf.device, dtype=dtype)
