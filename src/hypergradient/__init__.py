"""hypergradient: gradient-based hyperparameter optimization and bilevel learning for PyTorch.

The functional core computes hypergradients of an outer (validation) loss through the
minimum of an inner (training) loss by implicit differentiation::

    import hypergradient as hg
    hyper = hg.implicit(inner_loss, outer_loss, params, hparams, solver=hg.CG(maxiter=50))

Solvers are interchangeable objects: :class:`Exact`, :class:`CG`, :class:`Neumann`,
:class:`Nystrom`, :class:`NystromPCG`, :class:`RecycledCG`, :class:`Identity`,
:class:`FixedPoint`.
"""

from . import distributed, meta, methods, optim
from ._version import __version__ as __version__
from ._vocab import (
    ArgumentTypeError,
    HypergradientWarning,
    NonFiniteHypergradientError,
    RankFailedError,
    Status,
)
from .constraints import (
    Constraint,
    HyperparameterDomainError,
    Interval,
    Positive,
    Unconstrained,
)
from .hyperoptimizer import HyperOptimizer, HyperStepRecord
from .methods import (
    HOAG,
    IFT,
    METHODS,
    T1T2,
    DrMAD,
    ForwardMode,
    HypergradInfo,
    Implicit,
    ImplicitInfo,
    Info,
    Method,
    Problem,
    Trajectory,
    TrajectoryInfo,
    Unrolled,
    cg,
    drmad,
    exact,
    forward_mode,
    implicit,
    implicit_fixed_point,
    neumann,
    nystrom,
    unrolled,
)
from .operators import (
    DampedOperator,
    FixedPointOperator,
    HessianOperator,
    LinearOperator,
    MatrixOperator,
)
from .operators.modes import NonSmoothLossError
from .solvers import (
    CG,
    DampingEstimate,
    Exact,
    FixedPoint,
    Identity,
    Neumann,
    Nystrom,
    NystromApproximation,
    NystromPCG,
    RecycledCG,
    Solution,
    Solver,
    auto_damping,
    estimate_lambda_max,
    nystrom_sketch,
)

__all__ = [
    "ArgumentTypeError",
    "CG",
    "Constraint",
    "DampedOperator",
    "DampingEstimate",
    "DrMAD",
    "Exact",
    "FixedPoint",
    "FixedPointOperator",
    "ForwardMode",
    "HOAG",
    "HessianOperator",
    "HyperOptimizer",
    "HyperparameterDomainError",
    "HyperStepRecord",
    "HypergradInfo",
    "HypergradientWarning",
    "IFT",
    "Identity",
    "Implicit",
    "ImplicitInfo",
    "Info",
    "Interval",
    "LinearOperator",
    "METHODS",
    "MatrixOperator",
    "Method",
    "Neumann",
    "NonFiniteHypergradientError",
    "NonSmoothLossError",
    "Nystrom",
    "NystromApproximation",
    "NystromPCG",
    "Positive",
    "Problem",
    "RankFailedError",
    "RecycledCG",
    "Solution",
    "Solver",
    "Status",
    "T1T2",
    "Trajectory",
    "TrajectoryInfo",
    "Unconstrained",
    "Unrolled",
    "auto_damping",
    "cg",
    "distributed",
    "drmad",
    "estimate_lambda_max",
    "exact",
    "forward_mode",
    "implicit",
    "implicit_fixed_point",
    "meta",
    "methods",
    "neumann",
    "nystrom",
    "nystrom_sketch",
    "optim",
    "unrolled",
]


_DEPRECATED = {
    "HyperMethod": ("Method", "hg.HyperMethod is deprecated; use hg.Method."),
    "HyperContext": (
        "Problem",
        "hg.HyperContext is deprecated; methods take a hg.Problem "
        "(method(problem) -> (hypergradient, info)).",
    ),
}


def __getattr__(name: str) -> object:
    """Deprecated names (one release): a ``DeprecationWarning``, then the new object."""
    if name in _DEPRECATED:
        import warnings

        target, message = _DEPRECATED[name]
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        return globals()[target]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
