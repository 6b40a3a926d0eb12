"""What every solver shares: :class:`Solution`, the :class:`Solver` base, and its checks.

A solver approximates ``x = A^{-1} b`` for the operator ``A`` of implicit differentiation
(the inner Hessian, or ``I - J^T`` for a fixed point) seen through a
:class:`~hypergradient.operators.LinearOperator`. The helpers here are used by every
solver module: the system check (shapes, symmetry, finite ``b`` and ``x0``), the
finiteness check of products, norms that cannot overflow, and the validation of
``state_dict`` checkpoints (keys, generator states, tensors).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import _tree, _vocab
from .._norms import ROWS_FROM, read_exactly, wide_norm
from .._vocab import ArgumentTypeError, Status
from ..operators import LinearOperator
from ..operators.base import check_operand, same_device

_same_device = same_device  # (its name here before it moved to operators.base)

__all__ = [
    "PRODUCT",
    "RHS",
    "RandomizedSolver",
    "Solution",
    "Solver",
    "check_generator_state",
    "check_keys",
    "check_tensor",
    "convergence_rate",
    "generator_state",
    "non_default",
    "require_finite_product",
    "require_finite_solution",
    "safe_norm",
]

#: How messages name the right-hand side and the operator's products.
RHS = "b (the gradient of the outer loss)"
PRODUCT = "a Hessian-vector product"
_PRODUCT_FIX = (
    "The operator (the Hessian of inner_loss at `params`, or I - J^T for a fixed point) "
    "produced NaN or Inf: check inner_loss at `params` (the training batch, the parameters, "
    "the loss scale)."
)


@dataclass
class Solution:
    """Result of a linear solve.

    Attributes:
        value: the approximate solution ``x`` (1-D, the dtype of ``b``).
        num_hvps: operator products used, everything included (power iterations, sketches).
        residual_norm: ``||b - A x||`` when the solver knows it at no extra cost, else None.
        converged: True/False for solvers with a stopping criterion, None for fixed budgets.
        status: a :class:`~hypergradient._vocab.Status` (a ``str`` enum: ``status ==
            "converged"`` holds).
        iterations: iterations performed.
        stats: solver-specific extras (e.g. Neumann's ``alpha``, Nystrom's eigenvalues).
        message: what the status means and, when it is not ``ok``, the knob to turn
            (defaults to ``status.message``).
    """

    value: Tensor
    num_hvps: int
    residual_norm: float | None
    converged: bool | None
    status: Status
    iterations: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    message: str = ""

    def __post_init__(self) -> None:
        if type(self.status) is not Status:
            self.status = Status(self.status)
        if not self.message:
            self.message = self.status.message


class Solver:
    """Base class. Subclasses implement ``solve(operator, b, x0=None) -> Solution``.

    Every solver validates its constructor's arguments through ``_vocab``, describes its
    settings with :meth:`config` (plain data), and, when it keeps state across solves (a
    generator, a cached sketch), implements :meth:`state_dict` / :meth:`load_state_dict`.
    """

    requires_symmetric = False

    def solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> Solution:
        """Approximate ``A^{-1} b`` (warm-started from ``x0`` when given)."""
        raise NotImplementedError

    def validate(self, op: LinearOperator, b: Tensor, x0: Tensor | None) -> float:
        """Check the system before any product: types, shapes, symmetry, finite ``b``/``x0``.

        Returns ``||b||`` (as :func:`safe_norm`): its finiteness is the check of ``b`` in
        the usual case (one host synchronization).

        Raises:
            ArgumentTypeError: ``op`` is not a LinearOperator, ``b``/``x0`` not tensors, or
                ``b`` not of the operator's dtype.
            ValueError: wrong shapes or devices, or a non-symmetric operator for a symmetric
                solver.
            NonFiniteHypergradientError: ``b`` or ``x0`` holds NaN or Inf.
        """
        if not isinstance(op, LinearOperator):
            raise ArgumentTypeError(f"`op` must be a LinearOperator, got {type(op).__name__}.")
        check_operand("b", b, op)
        if x0 is not None:
            check_operand("x0", x0, op)
        if self.requires_symmetric and not op.symmetric:
            raise ValueError(
                f"{type(self).__name__} needs a symmetric operator, and this one is not "
                "(a fixed-point map's I - J^T). Use hg.FixedPoint(), hg.Exact() or hg.Neumann()."
            )
        bnorm = _read_norm(b, _tree.wide_dtype(b.device))
        if not 0.0 < bnorm < math.inf:  # NaN or Inf in b, or a norm that over/underflows
            _vocab.require_finite(
                [b], [RHS], "the right-hand side", "Check outer_loss at `params` and its gradient."
            )
            bnorm = safe_norm(b)
        if x0 is not None:
            _vocab.require_finite(
                [x0], ["x0"], "the warm start", "Pass a finite warm start, or x0=None."
            )
        return bnorm

    def config(self) -> dict[str, Any]:
        """Every setting as plain data (for repr, logs and distributed consistency checks)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def state_dict(self) -> dict[str, Any]:
        """State carried across solves (a generator's state, a cached sketch); {} if none."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; validates everything before assigning anything."""
        check_keys(state, (), self)

    def snapshot(self) -> Any:
        """An opaque copy of the state, for :meth:`restore` after a failed call (rollback).

        Default: :meth:`state_dict`. Solvers whose state is large and replaced rather than
        modified in place (a sketch) override it with a cheaper one.
        """
        return self.state_dict()

    def restore(self, snapshot: Any) -> None:
        """Return to the state of :meth:`snapshot`."""
        if snapshot:
            self.load_state_dict(snapshot)

    def __repr__(self) -> str:
        config = self.config()
        key = _repr_key(self, config)  # every info reads the text: kept per configuration
        text = None if key is None else _REPRS.get(key)
        if text is None:
            args = ", ".join(f"{k}={v!r}" for k, v in config.items())
            text = f"{type(self).__name__}({args})"
            if key is not None and len(_REPRS) < 256:
                _REPRS[key] = text
        return text


#: ``repr`` texts of solver configurations (type and settings), at most 256.
_REPRS: dict[Any, str] = {}
_PLAIN = (int, bool, str, type(None))


def _repr_key(solver: Solver, config: dict[str, Any]) -> tuple[Any, ...] | None:
    """A key that determines ``repr(solver)``: its type and each setting with its type (floats
    by their exact hex text, so that 0.0 and -0.0 differ); None if a setting is not a plain
    number, string or None (its text could change while the object stays equal)."""
    parts = []
    for k, v in config.items():
        kind = type(v)
        if kind is float:
            v = v.hex()
        elif kind not in _PLAIN:
            return None
        parts.append((k, kind, v))
    return (type(solver), tuple(parts))


class RandomizedSolver(Solver):
    """A solver that draws random vectors (start vectors, sketches) from its own generator.

    ``seed`` and ``generator`` have one meaning for every randomized solver
    (``_vocab.as_generator``): a seed makes a new generator; a ``torch.Generator`` is used
    as given (``torch.default_generator`` draws from torch's global stream, as the seed
    libraries do); with neither, a new generator is seeded from torch's global generator at
    construction, so ``torch.manual_seed`` makes runs reproducible. The generator's state is
    in :meth:`state_dict`, so a checkpointed solver resumes bit for bit.
    """

    seed: int | None

    def init_generator(self, seed: Any, generator: Any, needed: bool = True) -> None:
        """Validate ``seed``/``generator``; own a generator (if ``needed`` or one was given)."""
        self.seed = None if seed is None else _vocab.as_int(seed, "seed", min=0)
        explicit = seed is not None or generator is not None
        self._rng: torch.Generator | None = (
            _vocab.as_generator(self.seed, generator) if (needed or explicit) else None
        )

    @property
    def generator(self) -> torch.Generator | None:
        """The generator the solver draws from (None if it draws nothing)."""
        return self._rng

    def state_dict(self) -> dict[str, Any]:
        return {"generator": generator_state(self._rng)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_keys(state, ("generator",), self)
        check_generator_state(state["generator"], self._rng, "generator", self)
        self.set_generator_state(state["generator"])

    def set_generator_state(self, value: Tensor | None) -> None:
        """Assign a generator state checked by :func:`check_generator_state`."""
        if value is not None and self._rng is not None:
            self._rng.set_state(value.clone())


# ----------------------------------------------------------------------------- numerics


def safe_norm(v: Tensor, wide: torch.dtype | None = None) -> float:
    """``||v||_2`` as a Python float that neither overflows nor underflows.

    Accumulates in ``wide`` (default :func:`_tree.wide_dtype`: float64, float32 on MPS;
    a loop passes it once); if that still overflows or underflows (float64 entries beyond
    1e154 or below 1e-154), rescales by ``max |v_i|`` first.
    """
    wide = _tree.wide_dtype(v.device) if wide is None else wide
    value = _read_norm(v, wide)
    if _exact_from(wide) * math.sqrt(v.numel()) <= value < float("inf"):
        return value
    # zero, not finite, or so small that squares of its entries are subnormal in ``wide``
    # (1e-160 in float64 read 2e-5 off, 1e-162 22 % off): rescaled by its largest entry
    top = float(v.abs().max()) if v.numel() else 0.0
    if top == 0.0 or top != top or top == float("inf"):
        return value if top == 0.0 else top
    return top * float(torch.linalg.vector_norm((v / top).to(wide)))


def _read_norm(v: Tensor, wide: torch.dtype) -> float:
    """``float(vector_norm(v, dtype=wide))``, a large float32 ``v`` read by float32 rows
    (:func:`~hypergradient._norms.wide_norm`) where that is as good."""
    value = float(wide_norm(v, wide))
    if v.numel() >= ROWS_FROM and read_exactly(value, v, wide):
        return float(torch.linalg.vector_norm(v, dtype=wide))
    return value


@functools.cache
def _exact_from(wide: torch.dtype) -> float:
    """Norms at least ``sqrt(n)`` times this are read exactly in ``wide`` (no subnormal
    squares): ``sqrt(tiny / eps)``, 1e-146 in float64."""
    info = torch.finfo(wide)
    return math.sqrt(info.tiny / info.eps)


def require_finite_product(w: Tensor) -> None:
    """Raise :class:`NonFiniteHypergradientError` if a product ``w = A v`` has NaN or Inf."""
    _vocab.require_finite([w], [PRODUCT], "", _PRODUCT_FIX)


def require_finite_solution(x: Tensor) -> None:
    """Raise :class:`NonFiniteHypergradientError` if the solution overflowed its dtype."""
    _vocab.require_finite(
        [x],
        [f"the solution x (in {x.dtype})"],
        "",
        "A^{-1} b is beyond the range of the dtype: add damping, or rescale the losses.",
    )


def convergence_rate(sol: Solution) -> float | None:
    """``-log(final / start) / iterations``: the solve's convergence rate per iteration.

    ``final`` is the relative residual it returned and ``start`` that of its starting point
    (1 for ``x = 0``; a warm start's own, ``stats["start_residual"]``), so that a warm start
    does not count as progress of the iterations. None for a solve without iterations.
    """
    if not sol.iterations:
        return None
    final = max(sol.stats.get("relative_residual", 1.0), 1e-300)
    start = max(sol.stats.get("start_residual", 1.0), 1e-300)
    return -math.log(final / start) / sol.iterations


# ----------------------------------------------------------------------------- checkpoints


def check_keys(state: Any, expected: tuple[str, ...], owner: Any) -> None:
    """``state`` is a mapping with exactly the ``expected`` keys, else ValueError naming them."""
    name = type(owner).__name__
    if not isinstance(state, Mapping):
        raise ArgumentTypeError(
            f"{name}.load_state_dict expects a dict from {name}.state_dict(), "
            f"got {type(state).__name__}."
        )
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{name}.load_state_dict: the checkpoint does not match {name}.state_dict(): "
            f"missing keys {missing}, unexpected keys {extra}. Was it saved from another solver?"
        )


def generator_state(generator: torch.Generator | None) -> Tensor | None:
    """The generator's state as a uint8 tensor (a copy), or None.

    None for no generator and for torch's global generator (``torch.default_generator``),
    whose state the user checkpoints with ``torch.get_rng_state()``.
    """
    if generator is None or generator is torch.default_generator:
        return None
    return generator.get_state().clone()


def check_generator_state(
    value: Any, generator: torch.Generator | None, key: str, owner: Any
) -> None:
    """``value`` can be loaded into ``generator`` (see :func:`generator_state`)."""
    name = type(owner).__name__
    current = generator_state(generator)
    if current is None or value is None:
        if (current is None) != (value is None):
            has = "has its own generator" if current is not None else "has none"
            raise ValueError(
                f"{name}.load_state_dict: `{key}` is {'None' if value is None else 'a state'} "
                f"but this solver {has} (seed/generator differ from the saved solver's)."
            )
        return
    check_tensor(value, key, owner, dtype=torch.uint8, shape=tuple(current.shape))


def check_tensor(
    value: Any,
    key: str,
    owner: Any,
    *,
    dtype: torch.dtype | None = None,
    shape: tuple[int | None, ...] | None = None,
    floating: bool = False,
) -> Tensor:
    """``value`` is a tensor of the given dtype and shape (``None`` matches any size)."""
    name = type(owner).__name__
    if not isinstance(value, Tensor):
        raise ValueError(
            f"{name}.load_state_dict: `{key}` must be a tensor, got {type(value).__name__}."
        )
    if dtype is not None and value.dtype != dtype:
        raise ValueError(f"{name}.load_state_dict: `{key}` must be {dtype}, got {value.dtype}.")
    if floating and not value.is_floating_point():
        raise ValueError(
            f"{name}.load_state_dict: `{key}` must be floating point, got {value.dtype}."
        )
    if shape is not None and (
        value.dim() != len(shape)
        or any(s is not None and s != d for s, d in zip(shape, value.shape))
    ):
        want = tuple("*" if s is None else s for s in shape)
        raise ValueError(
            f"{name}.load_state_dict: `{key}` must have shape {want}, got {tuple(value.shape)}."
        )
    if floating and not _vocab.is_finite(value):
        raise ValueError(f"{name}.load_state_dict: `{key}` holds NaN or Inf.")
    return value


def non_default(**settings: tuple[Any, Any]) -> list[str]:
    """The names, as ``"`name`"``, of the ``settings`` (``name=(value, default)``) whose
    value is not their default: the arguments a configuration would silently ignore."""
    return [f"`{k}`" for k, (v, d) in settings.items() if v is not d and v != d]
