"""The checks of a step's call that raise before anything changes: a hyper-step under
``torch.inference_mode()``, a missing batch, a T1T2 hyper-step or a trajectory method's
step after a step without gradients, a stateful method object that another hyper-optimizer
called since this one's last hyper-step."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
from torch import Tensor

from .. import distributed
from .._vocab import HypergradientWarning
from ..methods import T1T2
from ..solvers.extremes import nonzero

if TYPE_CHECKING:  # pragma: no cover
    from .driver import HyperOptimizer

__all__ = [
    "check_batch",
    "check_gradients",
    "check_method_owner",
    "checked_end",
    "checked_step",
    "due",
    "ends_window",
    "shared",
]

T = TypeVar("T")


def checked_step(hopt: HyperOptimizer, batch: Any, closure: Callable[[], Tensor] | None) -> bool:
    """``step()``'s checks before anything changes (:func:`check_batch`, :func:`due`,
    :func:`check_gradients` when a hyper-step is due), :func:`shared` by the ranks;
    whether a hyper-step is due."""
    hyper = not hopt.stopped and not (hopt.loop.count + 1) % hopt.inner_steps
    return shared(hopt, hyper, lambda: _checked(hopt, batch, closure))


def checked_end(hopt: HyperOptimizer, batch: Any, hyper: bool) -> None:
    """``end_step()``'s :func:`check_batch`, :func:`shared` by the ranks (``hyper``: the
    announced step ends with a hyper-step)."""
    shared(hopt, hyper, lambda: check_batch(hopt, batch))


def shared(hopt: HyperOptimizer, hyper: bool, checks: Callable[[], T]) -> T:
    """``checks()``; under a process group, at a hyper-step's step, every rank then joins
    one check: a rank whose call is refused (no batch, no gradients) raises its error and
    the others :class:`~hypergradient.RankFailedError`, together, before anything changes
    (they waited for it in the hyper-step's first collective, or met its next backward's
    all-reduce there: a gloo abort)."""
    group = hopt.process_group
    if group is None or not hyper:
        return checks()
    out, error = None, None
    try:
        out = checks()
    except ValueError as exc:
        error = exc
    distributed.check_consistent([], group, "the step's inputs", error=error)
    return cast(T, out)


def _checked(hopt: HyperOptimizer, batch: Any, closure: Callable[[], Tensor] | None) -> bool:
    check_batch(hopt, batch)
    every = hopt.method.needs_trajectory and not hopt.stopped  # each window step is replayed
    if every:
        check_gradients(hopt, closure)
    if not due(hopt):
        return False
    if not every:
        check_gradients(hopt, closure)
    return True


def due(hopt: HyperOptimizer) -> bool:
    """Whether the next inner step ends with a hyper-step.

    Raises:
        ValueError: it does, under ``torch.inference_mode()`` (whose tensors autograd
            cannot differentiate: every hypergradient would be zero), before anything
            changes.
    """
    if not ends_window(hopt):
        return False
    if torch.is_inference_mode_enabled():
        raise ValueError(
            "This step takes a hyper-step, which needs autograd, but it runs under "
            "torch.inference_mode(); call hopt.step() outside it (torch.no_grad() is fine)."
        )
    check_method_owner(hopt)
    return True


#: Each hyper-optimizer's number (given at its first hyper-step), written on its method.
_NUMBERS = itertools.count(1)
#: The attribute of a method holding the number of the hyper-optimizer that last used it.
STAMP = "_hyperoptimizer"


def check_method_owner(hopt: HyperOptimizer) -> None:
    """Refuse a hyper-step whose method object another hyper-optimizer used since this
    one's last hyper-step, when the method keeps state (a non-empty ``state_dict()``: a
    warm start, a sketch, a step estimate): that state is now the other run's. Two
    hyper-optimizers stepping in turn with one object is the case this can tell; a run
    that starts after another ended (the trials of a study) is not refused, since
    nothing says the first will not step again (documented in ``docs/which-method.md``).
    Then stamp the method with this hyper-optimizer's number.

    Raises:
        ValueError: the method was used by another hyper-optimizer in between.
    """
    method, mine = hopt.method, hopt.__dict__.get(STAMP)
    last = getattr(method, STAMP, None)
    if mine is None:
        mine = hopt.__dict__[STAMP] = next(_NUMBERS)
    elif last is not None and last != mine and method.state_dict():
        name = type(method).__name__
        raise ValueError(
            f"This HyperOptimizer's method object ({name}) was used by another "
            "HyperOptimizer since this one's last hyper-step, and it keeps state across "
            f"hyper-steps ({', '.join(map(str, method.state_dict()))}): that state is now "
            "the other run's. Give each HyperOptimizer its own method object (build "
            f"hg.{name}(...) per run, or pass copy.deepcopy(method)); nothing was changed."
        )
    try:
        setattr(method, STAMP, mine)
    except (AttributeError, TypeError):  # a user's method with __slots__: not checked
        pass


def ends_window(hopt: HyperOptimizer) -> bool:
    """Whether the step under way ends with a hyper-step (:func:`due` without its check)."""
    return not hopt.stopped and (hopt.loop.count + 1) % hopt.inner_steps == 0


def check_batch(hopt: HyperOptimizer, batch: Any) -> None:
    """A step's batch is required by trajectory methods, and without ``train_data``."""
    trajectory = hopt.method.needs_trajectory
    if batch is None and (trajectory or hopt.train_sampler is None):
        if trajectory:
            raise ValueError(
                f"step() needs the training `batch` at every step: {hopt.method.name} replays "
                "the inner steps on copies of their batches (train_data= does not replace them)."
            )
        raise ValueError("step() needs the training `batch` (hyper-steps do) or train_data=....")


def check_gradients(hopt: HyperOptimizer, closure: Callable[[], Tensor] | None) -> None:
    """Refuse a T1T2 hyper-step, or any step of a trajectory method, whose trained
    parameters hold no gradient.

    Without ``backward()`` (or after a misplaced ``zero_grad()``) the torch optimizer skips
    every parameter (or, after ``zero_grad(set_to_none=False)``, steps on zero gradients):
    the weights do not take the gradient step, while T1T2 differentiates the step
    ``theta - lr * grad`` as if it had been taken and a trajectory method replays it (a
    hypergradient of steps that did not happen: a probe's Unrolled window of 4 with one
    such step applied -22.7 where the run trained gives -17.6, with only a replay warning).
    Checked before anything changes; a ``closure`` computes the gradients itself.

    Raises:
        ValueError: the step has no gradients, and T1T2's due hyper-step or a trajectory
            method's replay would differentiate it.
    """
    trajectory = hopt.method.needs_trajectory
    if closure is not None or not (trajectory or isinstance(hopt.method, T1T2)):
        return
    grads = (p.grad for p in hopt.view.params if p.grad is not None)
    if any(nonzero(g._values() if g.is_sparse else g) for g in grads):
        return  # (zeros: zero_grad(set_to_none=False) and no backward())
    what = (
        f"{hopt.method.name} would replay it in its window"
        if trajectory
        else "this step's T1T2 hyper-step would differentiate it"
    )
    raise ValueError(
        "step() found no gradient on any trained parameter (None or zeros: no backward() since "
        f"zero_grad()), so the optimizer takes no gradient step, and {what} as if it had been "
        "taken. Call backward() "
        "on the training loss before step(), or pass closure=...; nothing was changed."
    )


def warn_backward_hooks(hopt: HyperOptimizer) -> None:
    """Warn, once per hyper-optimizer, about a module backward hook in the model
    (``register_full_backward_hook`` / ``register_full_backward_pre_hook``): it rewrites
    every gradient through the module, the validation gradient and the Hessian products a
    hypergradient is made of included (a hook halving ``grad_input`` halved T1T2's,
    Unrolled's and ForwardMode's hypergradients, with no word; a tensor hook on a parameter
    was already seen by T1T2's step check and the replays)."""
    module = hopt.view.module
    if getattr(hopt, "_warned_hooks", False) or module is None:  # (a tree of tensors)
        return
    hooked = [
        name or type(m).__name__
        for name, m in module.named_modules()
        if m._backward_hooks or m._backward_pre_hooks
    ]
    if hooked:
        hopt._warned_hooks = True  # type: ignore[attr-defined]
        warnings.warn(
            f"The model has backward hooks on {hooked[:3]} ({len(hooked)} module(s)): they "
            "run in every backward pass through those modules, also in the validation "
            "gradient and the second derivatives a hypergradient is made of, which they "
            "were not written for, so the hypergradient is not that of the training run. "
            "Apply the change in train_loss instead (or to .grad between backward() and "
            "step(), which T1T2 checks), or remove the hooks.",
            HypergradientWarning,
            stacklevel=5,
        )
