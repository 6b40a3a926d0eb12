"""Linear operators on flat vectors: the Hessian of the inner objective, and friends.

Every solver sees the system matrix only through :class:`LinearOperator`: ``matvec``
(one product), ``matmat`` (a batch of products, for sketches), ``dense`` (for the exact
solver). Operators count their products, which is how every hypergradient reports its
cost.

:class:`HessianOperator` builds the gradient graph of ``f`` once (``create_graph=True``)
and answers each product ``H v`` by one backward pass through that retained graph. On
CPU this costs about one gradient evaluation per product, where recomputing
``jvp(grad(f))`` from scratch costs 3.2-3.8 gradients and ``vjp(grad(f))`` 2.4-2.7
(``benchmarks/hvp_cost.py``, results in ``benchmarks/results/hvp_cost.md``). The same
graph answers the mixed product ``v -> d/dphi <grad_theta f, v>`` that turns the solution of
the linear system into a hypergradient.

Products work with any model: ``mode="auto"`` (default) uses double backward and falls
back, on torch's "derivative ... is not implemented" error (fused attention kernels, cuDNN
RNNs), to the math kernels and then to first-order products (central differences of
gradients, no double backward); see :mod:`hypergradient.operators.modes`.

Modules: ``base`` (LinearOperator, MatrixOperator, DampedOperator), ``graph`` (the
retained-graph machinery and the mode fallback), ``hessian`` (HessianOperator), ``fixed_point``
(FixedPointOperator), ``modes`` (product modes, RNG replay, the first-order step),
``buffers`` (buffer-neutral forward passes), ``recompute`` (activation checkpointing).
"""

from __future__ import annotations

from .base import DampedOperator, LinearOperator, MatrixOperator, WrappingOperator
from .fixed_point import FixedPointOperator
from .hessian import HessianOperator
from .modes import MODES

__all__ = [
    "DampedOperator",
    "FixedPointOperator",
    "HessianOperator",
    "LinearOperator",
    "MODES",
    "MatrixOperator",
    "WrappingOperator",
]
