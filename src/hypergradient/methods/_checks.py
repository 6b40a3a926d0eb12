"""Validation shared by every method: the problem's inputs, checked before any computation.

Every method starts with :func:`check_inputs`, so the same bad input gets the same message
whatever the method: ``hparams=None``, hyperparameters that are parameters, NaN in the
hyperparameters, trees on two devices or on the meta device, a loss of the wrong arity.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .. import _tree
from .._tree import TreeSpec
from .._vocab import (
    ArgumentTypeError,
    HypergradientWarning,
    as_callable,
    first_nonfinite,
    require_finite,
)
from .._vocab import all_finite as vocab_all_finite
from ..distributed import check_consistent, group_size
from ..optim.functional import SGD, Adam, FunctionalOptimizer
from ._arity import check_arity
from .base import Problem

T = TypeVar("T")

#: The values of ``batched`` (how batched Hessian products run).
BATCHED: tuple[bool | str, ...] = (True, False, "auto")

__all__ = [
    "BATCHED",
    "Inputs",
    "all_finite",
    "check_arity",
    "check_inputs",
    "check_no_alias",
    "check_problem",
    "check_state0",
    "check_trees",
    "connected",
    "consistent_start",
    "fingerprint_config",
    "UNUSED_ADVICE",
    "UNUSED_HINTS",
    "unused_leaves",
    "warn_frozen",
    "warn_unused",
]


@dataclass(frozen=True)
class Inputs:
    """Flattened, validated parameters and hyperparameters of a problem."""

    param_leaves: list[Tensor]
    param_spec: TreeSpec
    hparam_leaves: list[Tensor]
    hparam_spec: TreeSpec


#: :func:`all_finite` sums CPU leaves of at most this many entries in all as one copy.
CAT_FINITE = 1 << 16


def all_finite(leaves: Sequence[Tensor | None]) -> bool:
    """:func:`hypergradient._vocab.all_finite`, with several small CPU leaves of 32 or 64
    bits (at most :data:`CAT_FINITE` entries in all) summed as one concatenation: one sum
    and one read instead of one per leaf (half the time on a small model's ten leaves). The
    same answer: a non-finite sum (NaN, Inf or an overflow) is confirmed leaf by leaf."""
    present = [t for t in leaves if t is not None and t.numel()]
    if len(present) > 1 and sum(t.numel() for t in present) <= CAT_FINITE:
        if all(map(_plain_cpu, present)):
            flat = torch.cat([t.detach().reshape(-1) for t in present])
            if math.isfinite(float(flat.sum())):
                return True
    return vocab_all_finite(present)


def _plain_cpu(t: Tensor) -> bool:
    return t.is_cpu and t.layout == torch.strided and t.dtype in (torch.float32, torch.float64)


def check_problem(problem: Any, who: str, inner: bool = True) -> Problem:
    """``problem`` if it is a :class:`Problem` whose losses are callables of
    ``(params, hparams)`` (``inner=False``: ``inner_loss``'s arity is not checked)."""
    if not isinstance(problem, Problem):
        raise ArgumentTypeError(
            f"{who} takes a hg.Problem (hg.methods.Problem), got {type(problem).__name__}; "
            "the functional API (hg.implicit, hg.unrolled, ...) builds one for you."
        )
    for name in ("inner_loss", "outer_loss"):  # the same message for every method
        fn = as_callable(getattr(problem, name), name, "(params, hparams) -> scalar tensor")
        if name == "outer_loss" or inner:  # (a trajectory method reads the step loss instead)
            check_arity(fn, 2, name, "(params, hparams)", _ARITY_HINT)
    return problem


_ARITY_HINT = "It may ignore `hparams`; data go in a closure (the trajectory methods pass \
one batch per step as a third argument of inner_loss with batches=...)."


def _byte_range(t: Tensor) -> tuple[int, int]:
    extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def _storage_key(t: Tensor) -> tuple[Any, int]:
    return ("meta", id(t)) if t.is_meta else (t.device, t.untyped_storage().data_ptr())


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same tensor or views overlapping in memory."""
    if a is b:
        return True
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device or a.device.type == "meta":
        return False
    (a0, a1), (b0, b1) = _byte_range(a), _byte_range(b)
    return a0 < b1 and b0 < a1


def check_inputs(params: Any, hparams: Any, params_name: str = "params") -> Inputs:
    """Flatten and validate ``params`` and ``hparams``.

    Raises:
        ValueError: ``hparams`` is None or empty, a hyperparameter is (a view of) a
            parameter, the two trees are on different devices, or a hyperparameter holds
            NaN/Inf.
        ArgumentTypeError: a leaf is not a floating-point tensor.
    """
    (p_leaves, p_spec), (h_leaves, h_spec) = check_trees(params, hparams, params_name)
    warn_frozen(p_leaves, p_spec, params_name)
    if h_leaves[0].device != p_leaves[0].device:
        raise ValueError(
            f"`hparams` is on {h_leaves[0].device} and `{params_name}` on "
            f"{p_leaves[0].device}; move them to one device (hparams' tensors with "
            f".to({str(p_leaves[0].device)!r}))."
        )
    if p_leaves[0].is_meta:
        raise ValueError(
            f"`{params_name}` and `hparams` are on the meta device (shapes, no values); "
            "materialize them first (module.to_empty(device='cpu'), then load the values)."
        )
    check_no_alias(h_leaves, h_spec, p_leaves, params_name)
    if all_finite([*h_leaves, *p_leaves]):  # one host synchronization in the usual case
        return Inputs(p_leaves, p_spec, h_leaves, h_spec)
    bad = None if all_finite(h_leaves) else first_nonfinite(h_leaves, h_spec.paths)
    if bad is not None:
        raise ValueError(
            f"{bad} contains NaN or Inf; hyperparameters must be finite. Check the outer "
            "optimizer's step (lower its learning rate) or the values passed in."
        )
    if not all_finite(p_leaves):
        require_finite(
            p_leaves,
            p_spec.paths,
            "the parameter",
            "The inner run diverged or was given non-finite values: lower the inner learning "
            "rate, or check the model's parameters.",
        )
    return Inputs(p_leaves, p_spec, h_leaves, h_spec)


def check_trees(
    params: Any, hparams: Any, params_name: str = "params"
) -> tuple[tuple[list[Tensor], TreeSpec], tuple[list[Tensor], TreeSpec]]:
    """The flattened trees, their types checked (:func:`check_inputs`'s first part; the
    functional trajectory API runs it before it takes batches from an iterator)."""
    if hparams is None:
        raise ValueError(
            "`hparams` is None; pass the hyperparameters to differentiate with respect to "
            "(a tensor, or a tuple/list/dict of tensors)."
        )
    flat = []
    for tree, name in ((params, params_name), (hparams, "hparams")):
        leaves, spec = _tree.flatten(tree, name)
        _tree.check_leaves(leaves, spec, name)
        flat.append((leaves, spec))
    return flat[0], flat[1]


def check_no_alias(
    h_leaves: Sequence[Tensor], h_spec: TreeSpec, p_leaves: Sequence[Tensor], params_name: str
) -> None:
    """Raise if a hyperparameter is a parameter (or a view overlapping one)."""
    by_storage: dict[tuple[Any, int], list[Tensor]] = {}
    for p in p_leaves:
        by_storage.setdefault(_storage_key(p), []).append(p)
    for h, path in zip(h_leaves, h_spec.paths):
        if any(_shares_memory(h, p) for p in by_storage.get(_storage_key(h), [])):
            raise ValueError(
                f"{path} of `hparams` is also a leaf of `{params_name}` (or a view of one). The "
                "hypergradient with respect to a parameter is not defined (it would silently "
                "be zero or wrong). To learn an initialization, train an offset: params0 = "
                "zeros and inner_loss(init + delta, ...) with `init` in hparams (hg.meta.MAML "
                "does this)."
            )


def fingerprint_config(method: Any, **extra: Any) -> dict[str, Any]:
    """What ranks must agree on for ``method``: its type, config, state, and ``extra``."""
    return {
        "type": type(method).__name__,
        "config": method.config(),
        "state": method.state_dict(),
        **extra,
    }


def consistent_start(
    prepare: Callable[[], T],
    group: Any,
    checks: Callable[[T], Sequence[tuple[Sequence[Tensor], str]]],
    config: Callable[[], Any],
) -> T:
    """Run ``prepare()`` (local validation), then the consistency check of every rank.

    Without a group, ``prepare()``. With one, the check is the call's first collective: a
    rank whose ``prepare`` raised still joins it (``error=``), so every rank raises at once
    (that rank its own error, the others :class:`~hypergradient.RankFailedError`); then
    the values ``checks(prepared)`` and the configuration ``config()`` are compared.
    """
    if group is None:
        return prepare()
    group_size(group)  # a misconfigured group raises here, on every rank alike
    try:
        prepared, error = prepare(), None
    except Exception as exc:  # noqa: BLE001 - raised by check_consistent after the collective
        prepared, error = None, exc
    pairs = [] if error is not None else list(checks(prepared))  # type: ignore[arg-type]
    values, what = pairs[0] if pairs else ([], "`hparams`")
    check_consistent(
        values,
        group,
        what,
        *pairs[1:],
        config=None if error is not None else config(),
        error=error,
    )
    return prepared  # type: ignore[return-value]


def unused_leaves(
    paths: Sequence[str], leaves: Sequence[Tensor], touched: Sequence[bool]
) -> list[str]:
    """The paths of the non-empty leaves not ``touched`` (no quantity depended on them)."""
    return [p for p, t, used in zip(paths, leaves, touched) if not used and t.numel()]


#: What :func:`warn_unused` tells to check, by the route the hyperparameter could take.
UNUSED_HINTS = {
    "run": "inner_loss, outer_loss or the optimizer's settings use it through their `hparams` "
    "argument (a tensor read by reference needs hparams_by_reference=True)",
    "problem": "inner_loss or outer_loss uses it",
}

#: A driver's own advice for :func:`warn_unused`, set while it calls a method (its losses
#: have other names, and it may not offer ``hparams_by_reference``):
#: ``advice(path, through) -> sentences``; None: "Check that " + :data:`UNUSED_HINTS`.
UNUSED_ADVICE: ContextVar[Callable[[str, str], str] | None] = ContextVar(
    "UNUSED_ADVICE", default=None
)


def warn_unused(paths: Sequence[str], through: str = "run", stacklevel: int = 4) -> None:
    """Warn, per path, that a hyperparameter reaches the outer loss by no path (zero):
    neither directly nor through the inner ``through`` ("run" or "problem")."""
    advice = UNUSED_ADVICE.get()
    for path in paths:
        hint = f"Check that {UNUSED_HINTS[through]}" if advice is None else advice(path, through)
        warnings.warn(
            f"{path} influences the outer loss neither directly nor through the inner "
            f"{through}; its hypergradient is zero. {hint}.",
            HypergradientWarning,
            stacklevel=stacklevel,
        )


def connected(
    gp: Sequence[Tensor | None], gh: Sequence[Tensor | None], direct: list[bool] | None
) -> None:
    """Warn when ``outer_loss``'s gradients are None for every leaf of ``params`` and of
    ``hparams`` (its value has no graph to them); fill ``direct``, if given, with whether
    ``g`` depends on each hyperparameter leaf."""
    if direct is not None:
        direct[:] = [d is not None for d in gh]
    if all(d is None for d in (*gp, *gh)):
        warnings.warn(
            "outer_loss depends on neither `params` nor `hparams`: its value has no autograd "
            "graph to them (computed under torch.no_grad(), e.g. by an evaluation helper "
            "decorated with it, or from detached tensors or .item()), so the hypergradient "
            "is zero. Compute it with gradients enabled, from its arguments.",
            HypergradientWarning,
            stacklevel=6,
        )


def warn_frozen(leaves: Sequence[Tensor], spec: TreeSpec, name: str) -> None:
    """Warn when ``name`` holds frozen ``nn.Parameter``s (``requires_grad=False``).

    Every leaf of ``params`` is a variable of the inner problem (differentiated, and
    trained by trajectory methods); a frozen backbone passed with
    ``dict(model.named_parameters())`` silently changes the problem (measured: a
    hypergradient of the wrong sign, 10x off).
    """
    frozen = [
        p for t, p in zip(leaves, spec.paths) if isinstance(t, nn.Parameter) and not t.requires_grad
    ]
    if frozen:
        more = f" and {len(frozen) - 1} more" if len(frozen) > 1 else ""
        warnings.warn(
            f"{frozen[0]}{more} of `{name}` is a frozen nn.Parameter (requires_grad=False), "
            f"but every leaf of `{name}` is a variable of the inner problem (differentiated, "
            "and trained by trajectory methods). Pass only the trained parameters, e.g. "
            "{k: v for k, v in model.named_parameters() if v.requires_grad} (functional_call "
            "reads the others from the module).",
            HypergradientWarning,
            stacklevel=5,
        )


def check_state0(
    state0: Sequence[Tensor] | None,
    optimizer: FunctionalOptimizer,
    p0: Sequence[Tensor],
    step0: int | None = None,
) -> tuple[Tensor, ...] | None:
    """``state0`` as the optimizer's buffers for ``p0``: shapes checked, finite, in the
    dtype and on the device of the buffers ``optimizer.init(p0)`` makes (a float64
    momentum buffer of a float32 model is converted, as torch keeps it). ``state0`` and
    ``step0`` must agree for SGD and Adam: nonzero buffers at step 0 (SGD restarts its
    momentum, Adam bias-corrects as for a first step) and no buffers after a step (zero
    moments; a dampened momentum buffer that torch would start at the gradient) were
    silently another run."""
    if state0 is None:
        if step0:
            _check_fresh(optimizer, step0)
        return None
    want = optimizer.init(list(p0))
    got = tuple(state0)
    if len(got) != len(want) or any(
        not isinstance(a, Tensor) or a.shape != b.shape for a, b in zip(got, want)
    ):
        raise ValueError(
            f"`state0` must hold the optimizer's {len(want)} buffer(s) with the "
            f"parameters' shapes, got {len(got)}; it belongs to another optimizer."
        )
    for i, t in enumerate(got):
        if not t.is_floating_point():
            raise ArgumentTypeError(
                f"state0[{i}] has dtype {t.dtype}; the optimizer's buffers are floating point."
            )
    out = tuple(t.detach().to(device=b.device, dtype=b.dtype) for t, b in zip(got, want))
    if not all_finite(list(out)):
        require_finite(
            list(out),
            [f"state0[{i}]" for i in range(len(out))],
            "the optimizer's buffer",
            "Pass finite buffers (the inner optimizer's state diverged?).",
        )
    if step0 == 0 and type(optimizer) in (SGD, Adam) and out:
        _check_unstepped(out)
    return out


def _check_fresh(optimizer: FunctionalOptimizer, step0: int) -> None:
    """No buffers after ``step0 > 0`` steps: refused where zeros are not what torch has."""
    fresh = isinstance(optimizer, SGD) and _is_number(optimizer.settings["dampening"], 0)
    if type(optimizer) in (SGD, Adam) and optimizer.buffers and not fresh:
        raise ValueError(
            f"`step0` is {step0} but `state0` is None: a stepped optimizer has buffers "
            "(Adam's moments, SGD's momentum), and zeros in their place replay another "
            "run. Pass them as `state0` (hg.optim.from_torch returns them with the step "
            "count), or step0=0 for a fresh optimizer."
        )


def _check_unstepped(buffers: tuple[Tensor, ...]) -> None:
    """Buffers at step 0 must be the zeros ``init`` makes."""
    if bool(torch.stack([t.ne(0).any() for t in buffers]).any()):
        raise ValueError(
            "`state0` holds nonzero buffers of an optimizer that has stepped, but `step0` "
            "is 0: the first replayed step would restart SGD's momentum from the gradient "
            "or bias-correct Adam's moments as a first step's. Pass `step0`, the "
            "optimizer's step count (hg.optim.from_torch returns it with the buffers)."
        )


def _is_number(value: Any, number: float) -> bool:
    return not isinstance(value, Tensor) and value == number
