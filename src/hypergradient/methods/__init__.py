"""Hypergradient methods: one object per method, ``method(problem) -> (hypergradient, info)``.

A method turns a :class:`Problem` (the losses, the current parameters and hyperparameters,
and for trajectory methods the recorded inner run) into a hypergradient and an
:class:`Info`. The same objects serve the functional API (``hg.implicit``,
``hg.unrolled``, ...) and ``HyperOptimizer(method=...)``. Implicit methods use the
current parameters only; trajectory methods replay the recorded inner steps.

=================  =========================================================  ==========
method             hypergradient                                              paper
=================  =========================================================  ==========
``T1T2()``         one-step look-ahead: ``d_phi g - lr (d_phi grad f)^T grad g`` Luketina 2016
``Implicit(s)``    implicit, ``H^{-1}`` by any solver (default CG)            Bengio 2000
``IFT(s)``         the same; Neumann series, alpha = min(lr, 1 / lambda_max)  Lorraine 2020
``HOAG(...)``      implicit, CG to a decreasing tolerance, warm-started        Pedregosa 2016
``Unrolled(K)``    reverse mode through the last K inner steps                 Shaban 2019
``ForwardMode()``  forward mode through the inner steps                        Franceschi 2017
``DrMAD()``        reverse mode along the straight line of the inner steps     Fu 2016
=================  =========================================================  ==========

Adding a method: one file with a :class:`Method` subclass (and its functional form), one
row in :data:`METHODS`, one row in the tests' registry.
"""

from __future__ import annotations

from .._vocab import HypergradientWarning, NonFiniteHypergradientError
from .base import Info, Method, Problem, Trajectory
from .drmad import DrMAD, drmad
from .formula import ImplicitInfo, implicit_hypergradient
from .forward_mode import ForwardMode, forward_mode
from .hoag import HOAG
from .implicit import (
    IFT,
    HypergradInfo,
    Implicit,
    cg,
    exact,
    implicit,
    implicit_fixed_point,
    neumann,
    nystrom,
)
from .implicit_base import ImplicitMethod
from .replay import replay_rng, rng_state
from .t1t2 import T1T2
from .trajectory import TrajectoryInfo, TrajectoryMethod
from .unrolled import Unrolled, unrolled

__all__ = [
    "METHODS",
    "DrMAD",
    "ForwardMode",
    "HOAG",
    "HypergradInfo",
    "HypergradientWarning",
    "IFT",
    "Implicit",
    "ImplicitInfo",
    "ImplicitMethod",
    "Info",
    "Method",
    "NonFiniteHypergradientError",
    "Problem",
    "T1T2",
    "Trajectory",
    "TrajectoryInfo",
    "TrajectoryMethod",
    "Unrolled",
    "cg",
    "drmad",
    "exact",
    "forward_mode",
    "implicit",
    "implicit_fixed_point",
    "implicit_hypergradient",
    "neumann",
    "nystrom",
    "replay_rng",
    "rng_state",
    "unrolled",
]

#: The registry: every method class by its ``name`` (``IFT`` under ``"ift"``).
METHODS: dict[str, type[Method]] = {
    "t1t2": T1T2,
    "implicit": Implicit,
    "ift": IFT,
    "hoag": HOAG,
    "unrolled": Unrolled,
    "forward_mode": ForwardMode,
    "drmad": DrMAD,
}


def __getattr__(name: str) -> type[Method]:  # deprecated names, kept for one release
    import warnings

    if name == "HyperMethod":
        warnings.warn(
            "hg.methods.HyperMethod is deprecated; use hg.Method.", DeprecationWarning, stacklevel=2
        )
        return Method
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
