"""Diagnostics of the implicit methods: :class:`ImplicitInfo`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import Tensor

from .base import Info

__all__ = ["ImplicitInfo"]


@dataclass(kw_only=True)
class ImplicitInfo(Info):
    """Diagnostics of an implicit hypergradient (Implicit, IFT, HOAG, T1T2).

    Attributes (besides :class:`~hypergradient.Info`'s):
        residual_norm: ``||b - A x||`` of the linear solve (computed with one extra product,
            counted in ``extra_hvps``, when the solver does not know it; None when not
            asked for, as in T1T2).
        relative_residual: ``residual_norm / ||b||``.
        converged: whether the solver met its tolerance (None for fixed budgets).
        iterations: solver iterations.
        solver: ``repr`` of the solver.
        inner_loss: ``f`` at ``params``.
        inner_grad_norm: ``||grad_theta f||`` at ``params`` (fixed points:
            ``||T(theta) - theta||``); large values mean ``params`` is not an inner optimum
            and the implicit formula does not apply there.
        outer_grad_norm: ``||grad_theta g||`` (the right-hand side ``b``), the scale
            ``inner_grad_norm`` is compared with.
        extra_hvps: products spent on diagnostics.
        solution: the flat solution ``x ~ A^{-1} grad_theta g`` (warm starts: ``x0=``).

    ``stats`` holds the solver's extras and ``"damping"`` (the damping used: with
    ``damping="auto"`` also ``"damping_estimated"``, ``"damping_hvps"``, ``"lambda_max"``,
    ``"lambda_min"``), ``"hvp"`` (the product mode used) and ``"hvp_fallback"`` (why
    ``hvp="auto"`` left double backward, or None).
    """

    residual_norm: float | None = None
    relative_residual: float | None = None
    converged: bool | None = None
    iterations: int = 0
    solver: str = ""
    inner_loss: float = math.nan
    inner_grad_norm: float = math.nan
    outer_grad_norm: float = math.nan
    extra_hvps: int = 0
    solution: Tensor | None = field(default=None, repr=False)
