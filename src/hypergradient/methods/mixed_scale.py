"""The mixed product ``(d_phi grad_theta f)^T x`` on float16 parameters, with ``x`` scaled.

``x`` enters the mixed product in the parameters' dtype. float16's normal range ends at
6.1e-5 and its subnormals at 6e-8, so a solution of small entries (a stiff inner loss and a
small outer one) lost its digits there: ``x ~ 2e-7`` gave a hypergradient 10% off, with an
exact solve and no warning. The product is linear in ``x``: it is taken at ``c x``, with
``c`` a power of two that brings ``max |x|`` into ``[0.5, 1)``, and divided by ``c``
(both exact), when a parameter is float16 and ``max |x| < 2^-8``; otherwise as it is.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..solvers.extremes import max_abs

__all__ = ["mixed_parts"]

#: Below this ``max |x|``, ``x`` is scaled before a float16 mixed product.
SMALL = 2.0**-8


def mixed_parts(op: Any, x: Tensor) -> list[Tensor | None]:
    """``op.mixed(x)``, taken at a scaled ``x`` on float16 parameters (see the module)."""
    leaves = getattr(op, "param_leaves", None) or []
    if x.dtype == torch.float16 or not any(t.dtype == torch.float16 for t in leaves):
        return op.mixed(x)
    top = max_abs(x)
    if not 0.0 < top < SMALL:  # (0, NaN and Inf as they are: the checks that follow name them)
        return op.mixed(x)
    c = 2.0 ** -math.frexp(top)[1]  # top * c in [0.5, 1)
    return [None if m is None else m / c for m in op.mixed(x * c)]
