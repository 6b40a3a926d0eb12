"""Interchangeable solvers for the linear system ``A x = b`` of implicit differentiation.

``A`` is the inner Hessian (or ``I - J^T`` for a fixed point), seen only through a
:class:`~hypergradient.operators.LinearOperator`; ``b`` is the gradient of the outer loss
with respect to the parameters. Every solver is a small object with one method,
``solve(operator, b, x0=None) -> Solution``, so any of them fits ``hg.implicit(solver=...)``
and the hyper-optimizer. Every solver describes its settings with ``config()``; those with
state (a generator, a cached sketch) have ``state_dict()`` / ``load_state_dict()``.

=================  ============================================  ====================
solver             approximation of ``A^{-1} b``                 products
=================  ============================================  ====================
``Exact``          dense matrix, symmetric eigen/LU solve         n (the dimension)
``CG``             conjugate gradient (optionally preconditioned) <= maxiter
``Neumann``        ``alpha sum_{j<=k} (I - alpha A)^j b``          k (+ power iters)
``Nystrom``        ``(A_nys + rho I)^{-1} b``, rank-r sketch       r
``NystromPCG``     CG preconditioned by a Nystrom sketch           r (per refresh) + it
``RecycledCG``     CG preconditioned by Ritz pairs of past solves  it (recycling is free)
``Identity``       ``scale * b`` (one-step / T1-T2)               0
``FixedPoint``     ``x <- x + omega (b - A x)`` (Richardson)       <= maxiter
=================  ============================================  ====================

One module per family: ``base`` (Solution, Solver, shared checks), ``exact``, ``cg``,
``neumann``, ``sketch``, ``nystrom``, ``recycle``, ``simple`` (Identity, FixedPoint), ``spectrum``
(power iteration and Lanczos estimates of extreme eigenvalues), ``damping``
(``auto_damping``: a damping chosen from a curvature estimate; ``AutoDamping``: the same,
cached across the calls of a method, ``damping="auto"``).
"""

from __future__ import annotations

from .base import RandomizedSolver, Solution, Solver
from .cg import CG
from .damping import AutoDamping, DampingEstimate, auto_damping, damped_solve
from .exact import Exact
from .neumann import Neumann
from .nystrom import Nystrom, NystromPCG
from .recycle import RecycledCG
from .simple import FixedPoint, Identity
from .sketch import NystromApproximation, nystrom_sketch
from .spectrum import SpectrumEstimate, estimate_lambda_max, lanczos_extremes

__all__ = [
    "AutoDamping",
    "CG",
    "DampingEstimate",
    "Exact",
    "FixedPoint",
    "Identity",
    "Neumann",
    "Nystrom",
    "NystromApproximation",
    "NystromPCG",
    "RandomizedSolver",
    "RecycledCG",
    "Solution",
    "Solver",
    "SpectrumEstimate",
    "auto_damping",
    "damped_solve",
    "estimate_lambda_max",
    "lanczos_extremes",
    "nystrom_sketch",
]
