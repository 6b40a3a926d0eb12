"""Diagnostics of the implicit methods: :class:`ImplicitInfo` and the solve's warnings."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from .._norms import ROWS_FROM, exact_where_off, read_floats, wide_norm
from .._vocab import HypergradientWarning, Status
from ..solvers import Solver
from .base import Info

__all__ = [
    "FAR_RESIDUAL",
    "GRAD_ROUNDING",
    "NO_PROGRESS",
    "ImplicitInfo",
    "PendingFloor",
    "gradient_floor",
    "warn_solve",
]

#: An Exact solve of half-precision products warns when cond * eps, the first-order bound
#: of its solution's relative error (``stats["error_bound"]``), exceeds this.
ROUNDED_BOUND = 0.1


class _Read:
    """A float field that may be given as a :class:`PendingFloor`, read (one host
    synchronization) the first time the field is: the stationarity check reads it only when
    its cheaper tests are inconclusive (``warn_not_stationary``)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = "_" + name

    def __get__(self, obj: Any, owner: type | None = None) -> float:
        if obj is None:
            return 0.0  # the dataclass default
        value = obj.__dict__.get(self.key, 0.0)
        if isinstance(value, PendingFloor):
            value = obj.__dict__[self.key] = value.read()
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.key] = value


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
        inner_grad_floor: the rounding level of ``inner_grad_norm`` (:func:`gradient_floor`:
            a gradient below it is rounding noise, which the stationarity check of
            :func:`~hypergradient.implicit` does not warn about; 0 when unknown).
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
    inner_grad_floor: float = _Read()  # type: ignore[assignment]  # (a float when read)
    extra_hvps: int = 0
    solution: Tensor | None = field(default=None, repr=False)


#: The multiple of ``eps (||H|| ||theta|| + sqrt(2 ||H|| |f|))`` below which a gradient is
#: rounding (see :func:`gradient_floor`).
GRAD_ROUNDING = 8.0


def gradient_floor(op: Any) -> float:
    """The rounding level of ``grad_theta f`` (``op.grad``) as ``op`` computed it:
    ``GRAD_ROUNDING eps (||H|| ||theta|| + sqrt(2 ||H|| |f|))``.

    At a minimum rounded to the parameters' dtype the computed gradient is not 0: each term
    summed into it is rounded to ``eps`` of its size, and the terms cancel. A regularizer's
    part (``lambda theta``) and the move of rounding ``theta*`` itself are at most ``||H||
    ||theta||``; a data term ``J^T r / N`` (residuals ``r``, their Jacobian ``J``: the
    Gauss-Newton form of a least-squares or cross-entropy loss) at most ``||J|| ||r|| / N
    = sqrt(2 ||H|| f)``, since ``||J||^2 / N ~ ||H||`` and ``||r||^2 / N = 2 f``. ``eps`` is
    the machine epsilon of the least precise dtype the gradient was computed in: the
    parameters' (float32, bfloat16, float16, float64) or the autocast dtype the operator
    was built under. ``||H||`` is the operator's scale, the largest ``||H v|| / ||v||`` of
    its products (:attr:`HessianOperator.scale`, sampled; a lower bound: 0 before any
    product); for a fixed-point map, whose residual ``T(theta) - theta`` subtracts two
    vectors of the size of ``theta``, the floor is ``GRAD_ROUNDING eps ||theta||``.
    Measured at rounded minima (ridge up to 20,000 rows, logistic regression, a tanh MLP;
    float32, bfloat16, float64): the gradient is at most 2.5 times ``eps`` times that scale
    (``tests/test_adv13_solvers_stationarity.py``). One host read.
    """
    return PendingFloor(op).read()


class PendingFloor:
    """:func:`gradient_floor`'s operands, unread: the parameters' norms (taken now: a later
    in-place change of the parameters does not move the floor), the operator's scale
    samples and loss (tensors nothing modifies). :meth:`read` takes the floor (one host
    read); with a leaf large enough for its norm to be read by rows it is taken at once
    (such a norm may have to be read again exactly, from the leaf: ``exact_where_off``)."""

    def __init__(self, op: Any) -> None:
        leaves = getattr(op, "param_leaves", None) or []
        self.parts: list[Tensor] = []
        self.value: float | None = None if leaves else 0.0
        if not leaves:
            return
        self.eps, self.n = _eps(op, leaves), len(leaves)
        self.device = leaves[0].device
        self.wide = wide = torch.float32 if self.device.type == "mps" else torch.float64
        self.parts = [wide_norm(t.detach(), wide) for t in leaves]  # large ones by rows
        self.scaled = getattr(op, "scale_parts", None) is not None
        kept, pairs = op.scale_parts() if self.scaled else ([], [])
        loss = getattr(op, "loss", None)
        self.parts += [*kept, *(t for pair in pairs for t in pair)]
        self.parts += [] if loss is None else [loss.detach()]
        self.kept, self.pairs, self.has_loss = len(kept), len(pairs), loss is not None
        if any(t.numel() >= ROWS_FROM for t in leaves):
            self.value = self._read(leaves)

    def read(self) -> float:
        """The floor (0 for an operator without parameters)."""
        if self.value is None:
            self.value = self._read([])  # (no leaf read by rows)
        return self.value

    def _read(self, leaves: list[Tensor]) -> float:
        wide = self.wide
        values = read_floats(self.parts, self.device, wide)  # on the CPU: each as it is
        exact_where_off(values, enumerate(leaves), wide)
        theta = math.sqrt(sum(v * v for v in values[: self.n]))
        if not self.scaled:
            return GRAD_ROUNDING * self.eps * theta
        h = _largest(values[self.n :], self.kept, self.pairs)
        f = abs(values[-1]) if self.has_loss and math.isfinite(values[-1]) else 0.0
        return GRAD_ROUNDING * self.eps * (h * theta + math.sqrt(2.0 * h * f))


def _eps(op: Any, leaves: list[Tensor]) -> float:
    """The machine epsilon of the least precise dtype: the leaves' or the autocast one."""
    dtypes = {t.dtype for t in leaves}
    autocast = getattr(op, "autocast_dtype", None)
    if isinstance(autocast, torch.dtype):
        dtypes.add(autocast)
    return max(torch.finfo(d).eps for d in dtypes)


def _largest(values: list[float], kept: int, pairs: int) -> float:
    """``||H||``'s estimate from ``values``: ``kept`` maxima, then ``pairs`` sampled
    ``(||H v||, ||v||)``: the largest of the maxima and the ratios (0 for none)."""
    sampled = values[kept : kept + 2 * pairs]
    ratios = [top / bottom for top, bottom in zip(sampled[::2], sampled[1::2]) if bottom > 0]
    return max(values[:kept] + ratios, default=0.0)


#: Relative residual below which a solver stopped at ``maxiter`` does not warn (see
#: ``warn_solve``).
FAR_RESIDUAL = 1e-3

#: A solve stopped at ``maxiter`` with a relative residual at least this made no progress on
#: ``x = 0`` (its start): it always warns.
NO_PROGRESS = 1.0 - 1e-6


def _warned_singular(solver: Solver, status: Status, residual: float | None, bnorm: float) -> bool:
    """Warn (and say so) when Exact's answer leaves part of ``b`` outside ``A``'s range."""
    if status != Status.EXACT or residual is None or not residual > 1e-6 * bnorm > 0:
        return False
    _warn_outside_range(solver, residual / bnorm, 7)
    return True


def _least_squares_residual(
    solver: Solver, residual: float | None, bnorm: float, stats: dict[str, Any]
) -> float | None:
    """The residual a solve is judged by: that of the least-squares problem when a
    CG-family solve deflated the part of ``b`` outside ``A``'s range
    (``stats["null_space"]``), after warning as Exact does when ``residual`` exceeds 1e-6
    ``||b||``; else ``residual``."""
    if not stats.get("null_space"):
        return residual
    if residual is not None and residual > 1e-6 * bnorm:
        _warn_outside_range(solver, residual / bnorm, 7)
    return float(stats["least_squares_residual"]) * bnorm


def _warn_outside_range(solver: Solver, relative: float, stacklevel: int) -> None:
    warnings.warn(
        f"{solver!r}: the Hessian is singular and the outer gradient has a part outside "
        f"its range (relative residual {relative:.3g}): the answer is the minimum-norm "
        "(pseudo-inverse) solution, which takes no hypergradient through the Hessian's null "
        "space (directions the inner loss does not determine). Add damping=... (or raise "
        "it, if damped: the damped Hessian is singular at the dtype's precision) to choose "
        "otherwise, or check that the outer loss uses no parameter the inner loss leaves "
        "free.",
        HypergradientWarning,
        stacklevel=stacklevel,
    )


def warn_solve(
    solver: Solver,
    status: Status,
    iterations: int,
    residual: float | None,
    bnorm: float,
    stats: dict[str, Any] | None = None,
    zero_solution: bool = False,
) -> None:
    """Warn when the solve cannot vouch for its answer: negative curvature (``zero_solution``:
    the answer is ``x = 0``, the start kept as the best iterate), or a stop at
    ``maxiter`` far from the solver's tolerance (a relative residual above 10x the
    tolerance *and* above :data:`FAR_RESIDUAL`: a budget that ends at a residual of 1e-5
    against a tolerance of 1e-6 is a usable answer, not a warning; a stop no better than
    ``x = 0`` always warns). Fixed budgets (a solver without a tolerance, or ``tol=0`` and
    ``atol=0``) warn only when their answer is worse than ``x = 0`` (``||b - A x|| >
    ||b||``: Nystrom on an indefinite Hessian whose negative curvature its sketch missed
    gave 2.3 at an exact saddle, with no warning). A singular Hessian with ``b`` partly
    outside its range warns, as Exact's minimum-norm answer (residual above 1e-6 ``||b||``)
    does, when a CG-family solve deflated that part (``stats["null_space"]``); its stop at
    ``maxiter`` is judged by the residual of the least-squares problem."""
    if _warned_by_stats(solver, status, stats or {}):
        return
    if status == Status.NEGATIVE_CURVATURE:
        used = "The partial solution is used"
        if zero_solution:  # no iterate beat x = 0 (CG keeps its best iterate)
            used = (
                "No iterate improved on x = 0, so x = 0 is used: the hypergradient is the "
                "direct term alone (its implicit part is 0)"
            )
        warnings.warn(
            f"{solver!r} met non-positive curvature p^T H p <= 0 after {iterations} "
            "iteration(s): the Hessian is not positive definite at `params` (not a minimum, "
            f"or singular). {used}; pass damping=... (or damping='auto') to regularize.",
            HypergradientWarning,
            stacklevel=5,
        )
        return
    residual = _least_squares_residual(solver, residual, bnorm, stats or {})
    if _warned_singular(solver, status, residual, bnorm):
        return
    worse = residual is not None and bnorm > 0 and not residual <= bnorm  # NaN: H x overflowed
    if status == Status.FIXED_BUDGET and worse:
        _warn_worse_than_zero(solver, cast(float, residual) / bnorm)
        return
    if status != Status.MAX_ITERATIONS or residual is None:
        return
    if stats and stats.get("precision_limited"):
        _warn_precision(solver, residual / max(bnorm, 1e-300), stats)
        return
    _warn_maxiter(solver, residual / max(bnorm, 1e-300), bnorm)


def _warned_by_stats(solver: Solver, status: Status, stats: dict[str, Any]) -> bool:
    """Warn when the solver's stats qualify its status: an Exact solve of a matrix made of
    finite-difference products, or of half-precision products too ill-conditioned for
    them (``ROUNDED_BOUND``); a negative curvature taken from a cached estimate (IFT's
    Neumann series), which replaces the usual warning (True)."""
    if status == Status.NEGATIVE_CURVATURE and stats.get("indefinite_estimate") == "cached":
        warnings.warn(
            f"{solver!r} reports negative_curvature from its cached curvature estimate, made "
            "on the Hessian of an earlier call (refresh_every): this call's Hessian was not "
            "examined and may be positive definite by now. The series is used as summed; "
            "pass damping=... (or damping='auto') to regularize.",
            HypergradientWarning,
            stacklevel=6,
        )
        return True
    if status == Status.EXACT and stats.get("negative_eigenvalues"):
        lowest = float(stats.get("lambda_min", math.nan))
        warnings.warn(
            f"{solver!r} solved an indefinite Hessian ({stats['negative_eigenvalues']} "
            f"negative eigenvalue(s), the lowest {lowest:.3g}): `params` is a saddle point, "
            "not a minimum of the inner problem, and the answer is the implicit derivative "
            "of that stationary point, which training does not stay at (the iterative "
            f"solvers report negative_curvature). Pass damping above {-lowest:.3g} (or "
            "damping='auto') to regularize, or train the inner problem to a minimum.",
            HypergradientWarning,
            stacklevel=6,
        )  # and on: a singular matrix warns too
    if status == Status.EXACT and stats.get("finite_difference_products"):
        warnings.warn(
            f"{solver!r} solved the Hessian materialized from central differences of "
            f"gradients (hvp='first_order'), accurate to about {stats['product_eps']:.3g} "
            "relative: the answer (and its residual) is exact for that matrix, not for the "
            "Hessian. Use hvp='double' (or float64 parameters) for a reference.",
            HypergradientWarning,
            stacklevel=6,
        )  # and on: a singular matrix warns too
    elif status == Status.EXACT and stats.get("error_bound", 0.0) > ROUNDED_BOUND:
        warnings.warn(
            f"{solver!r} solved the matrix materialized from products that round at eps = "
            f"{stats['product_eps']:.3g} (parameters in bfloat16/float16, or autocast): "
            "the answer is exact for that rounded matrix, not for the true one: its "
            "condition number times eps, the first-order bound of the solution's relative "
            f"error, is {stats['error_bound']:.3g} (stats['error_bound']). Compute the "
            "products in float32 (a float32 copy of the parameters, outside autocast) for a "
            "reference.",
            HypergradientWarning,
            stacklevel=6,
        )
    return False


def _warn_maxiter(solver: Solver, relative: float, bnorm: float) -> None:
    """A stop at ``maxiter``: warn far above the tolerance, or no better than ``x = 0``
    (CG returns its start when every iterate was worse; only the direct term is left,
    whatever the tolerance: at ``tol=0.1`` the threshold ``10 tol = 1`` did not warn)."""
    tol, atol = getattr(solver, "tol", None) or 0.0, getattr(solver, "atol", None) or 0.0
    allowed = max(float(tol), float(atol) / max(bnorm, 1e-300))
    none = relative >= NO_PROGRESS and allowed < NO_PROGRESS
    if not (tol or atol or none):  # tol=0: a fixed budget asked for ("as far as maxiter goes")
        return
    if not (none or relative > max(10 * allowed, FAR_RESIDUAL)):
        return
    what = (
        "no better than x = 0 (only the direct term d_phi g is left)"
        if none
        else f"far above its tolerance {allowed:.3g}"
    )
    warnings.warn(
        f"{solver!r} stopped at maxiter={getattr(solver, 'maxiter', None)} with relative "
        f"residual {relative:.3g}, {what}: the solution (and the hypergradient) is "
        "inaccurate. Raise maxiter, loosen tol, add damping, or precondition (hg.NystromPCG).",
        HypergradientWarning,
        stacklevel=6,
    )


def _warn_precision(solver: Solver, relative: float, stats: dict[str, Any]) -> None:
    """A CG-family solve whose true residual cannot reach the tolerance: the Hessian
    products of a half-precision model round at its epsilon (measured bfloat16: 3e-3 to 4e-3
    relative residual on a well-conditioned logistic regression)."""
    if stats.get("finite_difference_products"):
        why = (
            "products are central differences of gradients (hvp='first_order'), accurate to "
            f"about {stats.get('product_eps', 0):.3g} relative"
        )
        fix = "use double-backward products (hvp='double') or float64 parameters"
    else:
        why = (
            "products (parameters in a lower precision than the solve, e.g. bfloat16, or "
            f"autocast) round at eps = {stats.get('product_eps', 0):.3g}"
        )
        fix = "compute the products in float32 (pass a float32 copy of the parameters)"
    warnings.warn(
        f"{solver!r} cannot reach its tolerance {getattr(solver, 'tol', None)}: the Hessian "
        f"{why}, and the true relative residual ||b - H x|| / ||b|| of the answer is "
        f"{relative:.3g} (status 'max_iterations', stats['precision_limited']). The "
        f"hypergradient is as accurate as the products allow; for a tighter solve {fix}, or "
        "loosen tol to silence this.",
        HypergradientWarning,
        stacklevel=6,
    )


def _warn_worse_than_zero(solver: Solver, relative: float) -> None:
    what = f"relative residual ||b - H x|| / ||b|| = {relative:.3g} > 1, worse than x = 0"
    if not math.isfinite(relative):
        what = f"a residual ||b - H x|| of {relative} (H x overflows: x is far too large)"
    warnings.warn(
        f"{solver!r} returned a solution with {what}: the Hessian is likely indefinite at "
        "`params` (not a minimum) or the approximation too coarse. The hypergradient is "
        "unreliable; use hg.CG() (it reports negative curvature), pass damping=... (or "
        "damping='auto'), or raise the solver's rank / maxiter.",
        HypergradientWarning,
        stacklevel=6,
    )
