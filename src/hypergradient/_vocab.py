"""The shared vocabulary of the package (layer 0: imports only torch and the standard library).

Every public entry point validates its arguments through the functions here, so the same
argument gets the same check and the same message everywhere:

- exceptions and the warning category (:class:`HypergradientWarning`,
  :class:`NonFiniteHypergradientError`, :class:`ArgumentTypeError`,
  :class:`RankFailedError`);
- :class:`Status`, the outcome of a solve or of a hypergradient, a ``str`` enum whose
  members carry their message (``Status.NEGATIVE_CURVATURE.message``);
- argument checks (``as_int``, ``as_float``, ``as_bool``, ``as_choice``, ``as_callable``,
  ``as_generator``): numpy scalars are accepted wherever a Python number is, ``bool`` is
  refused where a number is meant, a wrong type raises :class:`ArgumentTypeError` (both a
  ``TypeError`` and a ``ValueError``) and a value out of range ``ValueError``; messages name
  the argument, what was wrong and the fix;
- finiteness checks that name the first non-finite quantity (:func:`first_nonfinite`,
  :func:`require_finite`).
"""

from __future__ import annotations

import enum
import math
import numbers
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "ArgumentTypeError",
    "HypergradientWarning",
    "NonFiniteHypergradientError",
    "RankFailedError",
    "Status",
    "as_bool",
    "as_callable",
    "as_choice",
    "as_float",
    "as_generator",
    "as_int",
    "as_optional_int",
    "as_real",
    "as_scalar_loss",
    "all_finite",
    "finite_probe",
    "first_nonfinite",
    "require_finite",
]

T = TypeVar("T")


# ----------------------------------------------------------------------------- exceptions


class HypergradientWarning(UserWarning):
    """A hypergradient was computed, but something about it deserves attention."""


class NonFiniteHypergradientError(FloatingPointError):
    """A hypergradient (or a quantity it is computed from) is NaN or Inf, or diverged.

    Attributes:
        quantity: what was found non-finite first (``"the gradient of inner_loss with
            respect to params['w']"``, ``"a Hessian-vector product"``, ...), or None.
    """

    def __init__(self, message: str, quantity: str | None = None):
        super().__init__(message)
        self.quantity = quantity


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (also a ``ValueError``, so either ``except`` catches it)."""


class RankFailedError(RuntimeError):
    """Another rank of the process group failed during a collective hypergradient step."""


# ----------------------------------------------------------------------------- status


class Status(str, enum.Enum):
    """Outcome of a linear solve or of a hypergradient computation.

    A ``str`` enum: ``Status.CONVERGED == "converged"`` holds, so code comparing with the
    strings keeps working. ``status.message`` explains it, ``status.ok`` says whether the
    answer can be vouched for (converged, exact, or a fixed budget by design).
    """

    CONVERGED = "converged"
    EXACT = "exact"
    FIXED_BUDGET = "fixed_budget"
    MAX_ITERATIONS = "max_iterations"
    NEGATIVE_CURVATURE = "negative_curvature"
    DIVERGED = "diverged"
    NONFINITE = "nonfinite"

    @property
    def message(self) -> str:
        """What the status means and, when it is not ``ok``, the knob to turn."""
        return _STATUS_MESSAGES[self]

    @property
    def ok(self) -> bool:
        """True for ``converged``, ``exact`` and ``fixed_budget``: nothing to report."""
        return self in (Status.CONVERGED, Status.EXACT, Status.FIXED_BUDGET)

    def __str__(self) -> str:  # f"{status}" gives the plain value, as for a str
        return self.value


_STATUS_MESSAGES = {
    Status.CONVERGED: "the solver met its tolerance",
    Status.EXACT: "solved exactly (dense factorization)",
    Status.FIXED_BUDGET: "a fixed number of products by design (no tolerance to meet)",
    Status.MAX_ITERATIONS: (
        "the solver stopped at maxiter before meeting its tolerance; raise maxiter, loosen "
        "tol, add damping or use a preconditioner (hg.NystromPCG)"
    ),
    Status.NEGATIVE_CURVATURE: (
        "the operator has non-positive curvature along a search direction (the Hessian is not "
        "positive definite here: not a minimum, or singular); the best iterate is returned; "
        "add damping"
    ),
    Status.DIVERGED: (
        "the iteration diverged (a solver's residual grew, or the loss of the inner run or "
        "adaptation differentiated through); lower the step size (Neumann: alpha < 2 / "
        "lambda_max, or alpha='auto'; a trajectory: the inner learning rate), add damping, or "
        "use hg.CG()"
    ),
    Status.NONFINITE: "a quantity of the computation is NaN or Inf",
}


# ----------------------------------------------------------------------------- arguments


def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def as_int(
    value: Any,
    name: str,
    *,
    min: int | None = None,
    max: int | None = None,
    hint: str = "",
) -> int:
    """``value`` as a Python ``int`` (numpy and 0-d integer tensors accepted, ``bool`` not).

    Raises:
        ArgumentTypeError: not an integer.
        ValueError: outside ``[min, max]``.
    """
    if type(value) is int and (min is None or value >= min) and (max is None or value <= max):
        return value  # the usual case
    return _as_int(value, name, min, max, hint)


def _as_int(value: Any, name: str, min: int | None, max: int | None, hint: str) -> int:
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        raise ArgumentTypeError(f"`{name}` must be an integer, got the bool {value!r}.{hint}")
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex():
            raise ArgumentTypeError(f"`{name}` must be an integer, got {_got(value)}.{hint}")
        value = int(value.item())
    try:
        v = operator.index(value)
    except TypeError:
        raise ArgumentTypeError(
            f"`{name}` must be an integer, got {type(value).__name__} {_got(value)}.{hint}"
        ) from None
    if min is not None and v < min:
        raise ValueError(f"`{name}` must be an integer >= {min}, got {v}.{hint}")
    if max is not None and v > max:
        raise ValueError(f"`{name}` must be an integer <= {max}, got {v}.{hint}")
    return int(v)


def as_optional_int(value: Any, name: str, *, min: int | None = None, hint: str = "") -> int | None:
    """``None`` or :func:`as_int`."""
    return None if value is None else as_int(value, name, min=min, hint=hint)


def as_real(value: Any, name: str, hint: str = "") -> float:
    """``value`` as a Python float if it is a real number (not a bool; NaN and infinities
    kept: a measured value), else raise :class:`ArgumentTypeError`."""
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        raise ArgumentTypeError(f"`{name}` must be a number, got the bool {value!r}.{hint}")
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ArgumentTypeError(
                f"`{name}` must be a real number, got a tensor of shape {tuple(value.shape)}.{hint}"
            )
        value = value.detach().item()
    if not isinstance(value, numbers.Real):
        raise ArgumentTypeError(
            f"`{name}` must be a real number, got {type(value).__name__} {_got(value)}.{hint}"
        )
    return float(value)


def _bounds_text(min: float | None, max: float | None, open_min: bool, open_max: bool) -> str:
    lo = "" if min is None else ("> " if open_min else ">= ") + f"{min:g}"
    hi = "" if max is None else ("< " if open_max else "<= ") + f"{max:g}"
    return " and ".join(b for b in (lo, hi) if b)


def as_float(
    value: Any,
    name: str,
    *,
    min: float | None = None,
    max: float | None = None,
    open_min: bool = False,
    open_max: bool = False,
    finite: bool = True,
    hint: str = "",
) -> float:
    """``value`` as a Python ``float`` (numpy scalars and 0-d tensors accepted, ``bool`` not).

    ``min``/``max`` bound it (exclusive with ``open_min``/``open_max``); NaN is always
    refused and infinities unless ``finite=False``.

    Raises:
        ArgumentTypeError: not a real number.
        ValueError: NaN, infinite, or out of range.
    """
    v = float(value) if type(value) is float or type(value) is int else as_real(value, name, hint)
    if math.isnan(v) or (finite and math.isinf(v)):
        raise ValueError(f"`{name}` must be a finite number, got {v}.{hint}")
    low_bad = min is not None and (v <= min if open_min else v < min)
    high_bad = max is not None and (v >= max if open_max else v > max)
    if low_bad or high_bad:
        bound = _bounds_text(min, max, open_min, open_max)
        raise ValueError(f"`{name}` must be a number {bound}, got {v:g}.{hint}")
    return v


def as_bool(value: Any, name: str) -> bool:
    """``value`` if it is a ``bool`` (numpy bools accepted)."""
    if isinstance(value, bool):
        return value
    if type(value).__name__ in ("bool_", "bool") and type(value).__module__ == "numpy":
        return bool(value.item())  # numpy.bool_ (named numpy.bool in numpy 2)
    raise ArgumentTypeError(f"`{name}` must be True or False, got {_got(value)}.")


def as_choice(value: Any, name: str, choices: Sequence[T]) -> T:
    """``value`` if it is one of ``choices`` (compared with ``==``)."""
    for c in choices:
        if type(value) is type(c) and value == c:
            return c
    options = ", ".join(repr(c) for c in choices)
    raise ValueError(f"`{name}` must be one of {options}; got {_got(value)}.")


def as_callable(value: Any, name: str, signature: str) -> Callable[..., Any]:
    """``value`` if it is callable; the message shows the expected ``signature``."""
    if not callable(value):
        raise ArgumentTypeError(
            f"`{name}` must be a callable {signature}, got {type(value).__name__}."
        )
    return value


def as_generator(
    seed: Any, generator: Any, name: str = "seed", device: torch.device | str = "cpu"
) -> torch.Generator:
    """A ``torch.Generator`` from ``seed`` or ``generator`` (not both).

    With neither, a new generator seeded from torch's global generator, so that
    ``torch.manual_seed`` makes the draws reproducible and the generator's state can be
    saved in a checkpoint.
    """
    if generator is not None:
        if seed is not None:
            raise ValueError(f"Pass either `{name}` or `generator`, not both.")
        if not isinstance(generator, torch.Generator):
            raise ArgumentTypeError(
                f"`generator` must be a torch.Generator, got {type(generator).__name__}."
            )
        return generator
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    else:
        seed = as_int(seed, name, min=0, hint=" Pass a non-negative integer seed.")
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


# ----------------------------------------------------------------------------- finiteness


def finite_probe(t: Tensor) -> Tensor:
    """A 0-d float32 tensor that is finite if every entry of ``t`` is (not conversely).

    The sum of ``t`` (accumulated in float32 for half precision): one vectorized pass
    without allocation, about 25x cheaper on the CPU than ``torch.isfinite(t).all()``,
    which makes several passes and a boolean temporary. A NaN or Inf entry always makes it
    non-finite; a non-finite probe may also mean an overflowing sum of finite entries, so a
    non-finite probe is confirmed by :func:`torch.isfinite` (see :func:`is_finite`).
    """
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=t.device)
    return _sum(t).to(torch.float32)


def _sum(t: Tensor) -> Tensor:
    """The sum of a floating or complex ``t``'s entries (real and imaginary parts), in
    float32 for half precision, else in ``t``'s own precision; no autograd graph (a probe)."""
    if t.requires_grad:
        t = t.detach()
    v = torch.view_as_real(t) if t.is_complex() else t
    return v.sum(dtype=torch.float32) if v.element_size() < 4 else v.sum()


def is_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite (one host sync; see :func:`finite_probe`)."""
    if bool(torch.isfinite(finite_probe(t))):
        return True
    return bool(torch.isfinite(t).all())


def all_finite(leaves: Iterable[Tensor | None]) -> bool:
    """Whether every entry of every leaf is finite, with one host sync in the usual case.

    The leaves' sums (float32 accumulation for half precision, see :func:`finite_probe`)
    are added into one probe, which a NaN or Inf entry always makes non-finite; a
    non-finite probe (which may also be an overflowing sum of finite entries) is confirmed
    leaf by leaf with :func:`torch.isfinite`. Integer and empty leaves are finite. The sums
    of CPU leaves are read and added on the host (reading them costs no synchronization).
    """
    total: Tensor | None = None
    host = 0.0
    present = []
    for t in leaves:
        if t is None or not t.numel() or not (t.is_floating_point() or t.is_complex()):
            continue
        present.append(t)
        probe = _sum(t)
        if t.is_cpu:
            host += float(probe)
        else:
            total = probe if total is None else total + probe.to(total.device)
    if math.isfinite(host) and (total is None or math.isfinite(float(total))):
        return True
    return all(bool(torch.isfinite(t).all()) for t in present)


def first_nonfinite(leaves: Iterable[Tensor | None], names: Iterable[str]) -> str | None:
    """The name of the first leaf with a NaN or Inf entry, or None if all are finite
    (one host sync when they are, see :func:`all_finite`)."""
    pairs = [(t, n) for t, n in zip(leaves, names) if t is not None and t.numel()]
    if all_finite([t for t, _ in pairs]):
        return None
    return next((n for t, n in pairs if not is_finite(t)), None)


def require_finite(
    leaves: Iterable[Tensor | None], names: Iterable[str], what: str, fix: str
) -> None:
    """Raise :class:`NonFiniteHypergradientError` naming the first non-finite leaf.

    The message reads ``"{what} {name} is not finite (NaN or Inf). {fix}"``, e.g.
    ``require_finite(grads, paths, "The gradient of inner_loss with respect to",
    "Check the training batch and inner_loss at params.")``.
    """
    bad = first_nonfinite(leaves, names)
    if bad is not None:
        quantity = f"{what} {bad}".strip()
        raise NonFiniteHypergradientError(
            f"{quantity[0].upper()}{quantity[1:]} is not finite (NaN or Inf). {fix}", quantity
        )


def as_scalar_loss(value: Any, name: str) -> Tensor:
    """``value`` as a 0-d floating-point tensor: what a loss function must return."""
    if not isinstance(value, Tensor):
        raise ArgumentTypeError(
            f"`{name}` must return a scalar tensor, got {type(value).__name__}."
        )
    if value.numel() != 1:
        raise ValueError(
            f"`{name}` must return a scalar tensor, got shape {tuple(value.shape)}; "
            "reduce it with .mean() or .sum()."
        )
    if not value.is_floating_point():
        raise ArgumentTypeError(
            f"`{name}` returned dtype {value.dtype}; it must be floating point."
        )
    return value if value.dim() == 0 else value.reshape(())
