"""What every hypergradient method consumes and produces (layer 4's interface).

A method is an object (``hg.Implicit(hg.CG())``, ``hg.T1T2()``, ``hg.Unrolled(truncate=5)``,
...) with one entry point, ``method(problem) -> (hypergradient, info)``:

- :class:`Problem` is the bilevel problem at one point: the inner and outer losses as
  functions of ``(params, hparams)``, the current parameters and hyperparameters, and, for
  trajectory methods, the recorded inner run (:class:`Trajectory`). The functional API
  (``hg.implicit(...)``, ``hg.unrolled(...)``) builds one from its arguments; the
  hyper-optimizer builds one at every hyper-step. Methods never see modules, samplers or
  torch optimizers.
- :class:`Info` is the one diagnostics shape: every method returns an instance of it (or of
  a subclass with method-specific fields); ``HyperStepRecord.info`` holds it.
- :class:`Method` is the base class: ``config()`` (plain data describing every setting, used
  by ``repr``, logs and the distributed consistency fingerprint), ``state_dict()`` /
  ``load_state_dict()`` for methods with state (HOAG's warm start, a solver's generator and
  sketch), which validate first and assign after.

The hypergradient is always taken with respect to ``problem.hparams`` exactly as given (the
hyper-optimizer passes the unconstrained raw leaves), and has their structure, shapes,
dtypes and device.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor

from .._tree import Tree
from .._vocab import ArgumentTypeError, Status, as_bool
from ..optim.functional import FunctionalOptimizer

__all__ = ["Info", "Method", "Problem", "Trajectory"]


@dataclass(frozen=True)
class Trajectory:
    """An inner training run to differentiate through (or along).

    ``steps = len(batches)`` steps of the differentiable ``optimizer`` from ``params0``:
    ``theta_{t+1} = update(theta_t, grad_theta step_loss(theta_t, hparams, batches[t]))``.

    Attributes:
        step_loss: ``f(params, hparams, batch) -> scalar tensor``.
        params0: parameters at the start of the run (tree); a constant of the run.
        optimizer: a differentiable optimizer from :mod:`hypergradient.optim`.
        batches: one batch per step, held by reference: a caller that refills one buffer in
            place must pass copies (the hyper-optimizer records copies).
        state0: the optimizer's buffers at the start (None: fresh, ``optimizer.init``).
        step0: the optimizer's step count at the start (Adam's bias correction).
        settings: optimizer settings computed from the hyperparameters, ``{"lr": fn}``
            with ``fn(hparams) -> scalar tensor`` (a tuned learning rate, momentum, ...).
        rng_states: the random-number state before each step (``len(batches)`` entries, each
            an opaque value from :func:`hypergradient.methods.trajectory.rng_state`), so that
            the replay draws the same dropout masks as the real run; None: the replay's own
            draws are recorded and reused by its reverse pass (the functional API).
        final_params: the real parameters after the run, when known (the hyper-optimizer's
            model); the replay is checked against them.
        rounding: the unit roundoff of steps trained in a precision the replay does not use
            (float16 autocast, replayed in float32), 0 otherwise: the replay check allows
            four units of it.
    """

    step_loss: Callable[[Any, Any, Any], Tensor]
    params0: Tree
    optimizer: FunctionalOptimizer
    batches: Sequence[Any]
    state0: Sequence[Tensor] | None = None
    step0: int = 0
    settings: Mapping[str, Callable[[Any], Tensor]] = field(default_factory=dict)
    rng_states: Sequence[Any] | None = None
    final_params: Tree | None = None
    rounding: float = 0.0

    def __post_init__(self) -> None:
        if not (hasattr(self.batches, "__len__") and hasattr(self.batches, "__getitem__")):
            raise ArgumentTypeError(
                "`batches` must be a sequence with one batch per step (a list or tuple), got "
                f"{type(self.batches).__name__}; pass list(...) of it."
            )

    @property
    def steps(self) -> int:
        """``T``, the number of inner steps (one per batch)."""
        return len(self.batches)


@dataclass(frozen=True)
class Problem:
    """A bilevel problem ``min_phi g(theta*(phi), phi)``, ``theta*(phi) = argmin f(., phi)``
    at one point, as a method sees it.

    Attributes:
        inner_loss: ``f(params, hparams) -> scalar tensor`` (the training objective on the
            hyper-step's training batch).
        outer_loss: ``g(params, hparams) -> scalar tensor`` (the validation objective).
        params: the current inner parameters (tree). For implicit methods, the point where
            the implicit function theorem is applied; for trajectory methods, the end of the
            run (``trajectory.final_params`` when recorded).
        hparams: the hyperparameters (tree); the hypergradient is taken with respect to them.
        lr: the inner optimizer's learning rate at the last step, when known (T1T2's
            look-ahead factor; the default step of ``IFT``'s Neumann series): a number, or
            one rate per leaf of ``params`` in the order ``params`` flattens (param groups
            of several rates; T1T2 differentiates ``theta - Lambda grad f``, IFT steps at
            the smallest positive one; :mod:`~hypergradient.methods.leaf_rates`); for
            T1T2 an item may be a tensor of its leaf's shape, per-entry rates of any sign
            (``-d theta' / d g`` of an Adam step: ``hg.HyperOptimizer`` passes them).
        prev_params: the parameters before the last inner step (T1T2 differentiates that
            step); None: ``params``.
        trajectory: the recorded inner run (required by trajectory methods).
        process_group: a ``torch.distributed`` group for data-parallel use, or None.
        hparams_by_reference: the losses read the ``hparams`` tensors themselves (leaves
            with ``requires_grad=True``, e.g. held by a criterion module) rather than
            through their ``hparams`` argument; implicit methods then differentiate with
            respect to those very tensors (their ``.grad`` is left untouched).
    """

    inner_loss: Callable[[Any, Any], Tensor]
    outer_loss: Callable[[Any, Any], Tensor]
    params: Tree
    hparams: Tree
    lr: float | Sequence[float | Tensor] | None = None
    prev_params: Tree | None = None
    trajectory: Trajectory | None = None
    process_group: Any = None
    hparams_by_reference: bool = False

    def __post_init__(self) -> None:
        if type(self.hparams_by_reference) is not bool:  # 'yes' was read as True
            as_bool(self.hparams_by_reference, "hparams_by_reference")
        if self.trajectory is not None and not isinstance(self.trajectory, Trajectory):
            raise ArgumentTypeError(
                "`trajectory` must be a hg.Trajectory or None, got "
                f"{type(self.trajectory).__name__}."
            )


@dataclass(kw_only=True)
class Info:
    """Diagnostics of one hypergradient: the shape every method returns.

    Attributes:
        method: the method's name (``"implicit"``, ``"t1t2"``, ``"unrolled"``, ...).
        seconds: wall time of the call.
        outer_loss: ``g`` at the point (averaged over ranks in data-parallel use).
        num_hvps: Hessian-vector (or Jacobian-vector) products the hypergradient took,
            everything included (power iterations, sketches); a product taken only for a
            diagnostic (the implicit methods' residual) is counted apart, in
            ``ImplicitInfo.extra_hvps``.
        status: :class:`~hypergradient.Status`; ``status.message`` explains it and
            ``status.ok`` says whether the method vouches for the answer.
        stats: method-specific extras (plain numbers, strings, small tensors).
    """

    method: str = ""
    seconds: float = 0.0
    outer_loss: float = math.nan
    num_hvps: int = 0
    status: Status = Status.FIXED_BUDGET
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def message(self) -> str:
        """What :attr:`status` means and, when it is not ``ok``, the knob to turn."""
        return self.status.message

    def as_dict(self) -> dict[str, Any]:
        """Plain data (numbers, strings, None): for logs, history and checkpoints.

        Bulk fields (declared with ``repr=False``: ``solution``, ``params``,
        ``inner_losses``) and any other tensor or tree are left out, whatever their value,
        so a record restored from a checkpoint has the same keys; the status is its string.
        """
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if not f.repr:
                continue
            value = getattr(self, f.name)
            if isinstance(value, Status):
                out[f.name] = value.value
            elif value is None or isinstance(value, (bool, int, float, str)):
                out[f.name] = value
            elif f.name == "stats":
                out[f.name] = {
                    k: v
                    for k, v in value.items()
                    if v is None or isinstance(v, (bool, int, float, str))
                }
        return out


class Method:
    """Base class of hypergradient methods.

    Subclasses set ``name`` and implement :meth:`__call__`. Class attributes tell drivers
    what a method needs: ``needs_trajectory`` (the hyper-optimizer records the inner steps
    and passes them as ``problem.trajectory``) and ``tunes_optimizer`` (optimizer settings
    such as the learning rate may be hyperparameters).
    """

    name: ClassVar[str] = "method"
    needs_trajectory: ClassVar[bool] = False
    tunes_optimizer: ClassVar[bool] = False

    def __call__(self, problem: Problem) -> tuple[Tree, Info]:
        """The hypergradient of ``problem`` with respect to ``problem.hparams``, and its info."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement __call__(problem) -> (hypergradient, Info) "
            "(a compute(ctx) of the previous release's HyperMethod is not called)."
        )

    def config(self) -> dict[str, Any]:
        """Every setting as plain data (the constructor's arguments, nested solvers' configs)."""
        out: dict[str, Any] = {}
        for k, v in vars(self).items():
            if k.startswith("_"):
                continue
            out[k] = v.config() if hasattr(v, "config") else v
        return out

    def state_dict(self) -> dict[str, Any]:
        """State carried across calls (plain data and tensors); empty for stateless methods."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; validates everything before assigning anything."""
        if state:
            raise ValueError(
                f"{type(self).__name__} has no state, but the checkpoint holds {sorted(state)}; "
                "it was saved from another method."
            )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"
