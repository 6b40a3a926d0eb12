"""hypergradient: gradient-based hyperparameter optimization and bilevel learning for PyTorch.

The functional core computes hypergradients of an outer (validation) loss through the
minimum of an inner (training) loss by implicit differentiation::

    import hypergradient as hg
    hyper = hg.implicit(inner_loss, outer_loss, params, hparams, solver=hg.CG(maxiter=50))

Solvers are interchangeable objects: :class:`Exact`, :class:`CG`, :class:`Neumann`,
:class:`Nystrom`, :class:`NystromPCG`, :class:`Identity`, :class:`FixedPoint`.
"""

from . import distributed, meta, optim
from ._version import __version__ as __version__
from .constraints import Constraint, Interval, Positive
from .hyperoptimizer import HyperOptimizer, HyperStepRecord
from .implicit import (
    HypergradientWarning,
    HypergradInfo,
    NonFiniteHypergradientError,
    cg,
    exact,
    implicit,
    implicit_fixed_point,
    neumann,
    nystrom,
)
from .methods import (
    HOAG,
    IFT,
    T1T2,
    DrMAD,
    ForwardMode,
    HyperMethod,
    Info,
    Method,
    Problem,
    Trajectory,
    Unrolled,
)
from .operators import (
    DampedOperator,
    FixedPointOperator,
    HessianOperator,
    LinearOperator,
    MatrixOperator,
)
from .solvers import (
    CG,
    Exact,
    FixedPoint,
    Identity,
    Neumann,
    Nystrom,
    NystromApproximation,
    NystromPCG,
    Solution,
    Solver,
    estimate_lambda_max,
    nystrom_sketch,
)
from .trajectory import TrajectoryInfo, drmad, forward_mode, unrolled

__all__ = [
    "CG",
    "Constraint",
    "DrMAD",
    "ForwardMode",
    "HOAG",
    "Info",
    "Method",
    "Problem",
    "Trajectory",
    "HyperMethod",
    "HyperOptimizer",
    "HyperStepRecord",
    "IFT",
    "Interval",
    "Positive",
    "T1T2",
    "Unrolled",
    "DampedOperator",
    "Exact",
    "FixedPoint",
    "FixedPointOperator",
    "HessianOperator",
    "HypergradInfo",
    "HypergradientWarning",
    "Identity",
    "LinearOperator",
    "MatrixOperator",
    "Neumann",
    "NonFiniteHypergradientError",
    "Nystrom",
    "NystromApproximation",
    "NystromPCG",
    "Solution",
    "Solver",
    "TrajectoryInfo",
    "cg",
    "distributed",
    "drmad",
    "estimate_lambda_max",
    "exact",
    "forward_mode",
    "implicit",
    "implicit_fixed_point",
    "meta",
    "neumann",
    "nystrom",
    "nystrom_sketch",
    "optim",
    "unrolled",
]
