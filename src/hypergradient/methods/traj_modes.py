"""How a trajectory method's reverse step gets its second-order products.

The reverse step needs ``H_t u`` and ``(d_phi grad_theta f_t)^T u`` for the cotangent
``u`` of the step's gradient. The modes have the names of the operators' product modes:

=================  ===========================================================  ==========
mode               products                                                     gradients
=================  ===========================================================  ==========
``"double"``       backward through the graph of ``grad f`` (double backward)   ~3
``"double_math"``  the same, the graph built with the math attention kernel     ~3
                   and without cuDNN (fused kernels without double backward)
``"first_order"``  ``(grad f(theta + e u) - grad f(theta - e u)) / 2e`` with    4
                   respect to ``theta`` and ``phi``: no double backward (and
                   ``grad f(theta)``, the kink check's centre)
``"auto"``         ``"double"``; on torch's "derivative ... is not implemented"  as chosen
                   error, ``"double_math"``, then ``"first_order"`` (one warning)
=================  ===========================================================  ==========

(Gradients counted per reverse step, the recomputation of ``grad f`` included.) Every
evaluation of the loss in a step, the central differences' two included, draws the step's
recorded random numbers, so dropout uses the same masks as the step it differentiates.
"""

from __future__ import annotations

from .._vocab import as_choice
from ..operators.modes import (
    MODES,
    central_difference,
    first_order_step,
    is_double_backward_error,
    math_kernels,
)
from ..operators.modes import delayed_error_in as has_error_node

__all__ = [
    "MODES",
    "as_mode",
    "central_difference",
    "first_order_step",
    "has_error_node",
    "is_double_backward_error",
    "math_kernels",
]


def as_mode(value: object) -> str:
    """``value`` if it is one of :data:`MODES` (``ValueError`` naming them otherwise)."""
    return as_choice(value, "hvp", MODES)
