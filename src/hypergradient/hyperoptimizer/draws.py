"""Whether T1T2's replay of the step is the step: its random draws and its gradient.

T1T2 differentiates the step just taken, with its random draws (dropout masks, a noise
augmentation inside ``train_loss``): it replays ``train_loss`` from the random-number state
the step's forward pass drew from. ``hopt.train_loss`` and ``begin_step`` capture that state;
a loop that computes its own loss leaves the driver the state at the end of the previous
step, which is the step's only if nothing drew random numbers in between (a DataLoader's
random augmentation or shuffling, ``torch.manual_seed`` in the loop). When it is not, the
replay differentiates another draw: a probe's hypergradient of a noise scale came out
-0.18 for an exact 0.033. So, when the state is that guess and the replayed forward pass
draws, a replayed gradient whose direction differs from the step's ``.grad`` skips the
hyper-step (:func:`other_draws`).

No recorded state replays draws from elsewhere (numpy, ``random``, a private
``torch.Generator``: a mixup coefficient from ``np.random.beta``): T1T2 replayed other
noise (0.031 for an exact 0.113; -0.103 for 0.118). So the first T1T2 hyper-step evaluates
``train_loss`` twice from one state (two forward passes, once per hyper-optimizer): values
that differ skip the hyper-step with a warning (and the check is repeated at the next).

Nor is every step's gradient the one T1T2 differentiates, ``train_loss``'s at the step's
start: a loss scaled or summed with a term the driver does not know, gradients accumulated
without averaging, replaced or clipped (``clip_grad_norm_``, whose step ``c g`` has the
derivative ``c (I - g g^T / ||g||^2) dg/dphi``: a probe's hypergradient came out 660 times
the clipped step's). Every T1T2 hyper-step on the step's batch compares the step's
``.grad`` with the replayed gradient (:mod:`.step_grads`: a forward pass T1T2 reuses and
a backward pass, or none when the step's own backward pass answers, :mod:`.step_tap`;
which also serves :func:`other_draws`; under a process group one all-reduce): the same to
rounding, nothing is said; ``c`` times it, with the factor applied inside autograd (a
scaled loss, micro-batches summed), the rates T1T2 differentiates are multiplied by ``c``
(exact; ``info.stats["step_grad_scale"]``); otherwise (:func:`changed_gradient`) the
hyper-step warns (``on_divergence="warn"``: the hypergradient is applied) or is skipped
(``"skip"``).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .. import _tree, distributed
from .._vocab import HypergradientWarning
from ..methods import T1T2
from ..methods.rng import replay_rng, rng_state, same_state
from ..operators.buffers import keep_buffers
from . import step_grads, step_share
from .precision import autocast_as
from .step_grads import Comparison

if TYPE_CHECKING:  # pragma: no cover
    from .driver import HyperOptimizer

__all__ = [
    "changed_gradient",
    "foreign_draws",
    "note_scale",
    "off_step",
    "other_draws",
    "step_gradient",
]


def off_step(hopt: HyperOptimizer, batch: Any, saved: Any, skip: Callable[..., bool]) -> bool:
    """Skip (``skip(hopt, saved, why)``: True) T1T2's hyper-step whose replay is not the
    step (:func:`foreign_draws`, :func:`other_draws`); account for a step on a constant
    multiple of the replayed gradient (``hopt.loop.grad_scale``); warn about any other
    gradient (:func:`changed_gradient`), and skip it too with ``on_divergence="skip"``."""
    hopt.loop.grad_scale = 1.0
    before = saved.params_before
    other = foreign_draws(hopt, batch, before)
    if other is not None:
        return skip(hopt, saved, other)
    found = step_gradient(hopt, batch, before)
    if found is None:
        return False
    other = other_draws(hopt, found)
    if other is not None:
        return skip(hopt, saved, other)
    changed = changed_gradient(hopt, found)
    if not distributed.any_rank(changed is not None, hopt.process_group, hopt.view.device):
        return False
    changed = changed or "the step's gradient on another rank is not train_loss's gradient."
    if hopt.on_divergence == "skip":
        return skip(hopt, saved, f"{changed} (on_divergence='skip').")
    warnings.warn(
        f"Step {hopt.loop.count}: {changed} Its hypergradient is applied "
        "(on_divergence='warn'; 'skip' skips it).",
        HypergradientWarning,
        stacklevel=5,
    )
    return False


def foreign_draws(hopt: HyperOptimizer, batch: Any, before: list[Any]) -> str | None:
    """Why T1T2 cannot replay ``train_loss`` (it gave two values from one random-number
    state: it draws from a generator other than torch's), or None; once it gave the same
    value twice (``loop.replayable``), None without evaluating it. Only for T1T2, on the
    step's ``batch``, without a process group."""
    loop, view = hopt.loop, hopt.view
    if not isinstance(hopt.method, T1T2) or hopt.process_group is not None or batch is None:
        return None
    if getattr(loop, "replayable", False):
        return None
    state = loop.step_rng if loop.step_rng is not None else rng_state(view.device)
    values = []
    for _ in range(2):
        _, loss, _ = _replay(hopt, batch, before, state)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return None  # the method names the problem
        values.append(float(loss.detach()))
    a, b = values
    if not (math.isfinite(a) and math.isfinite(b)):
        return None  # the non-finite checks answer
    if a == b or abs(a - b) <= 1e-5 * max(abs(a), abs(b)):  # GPU atomics: rounding
        loop.replayable = True
        return None
    return (
        f"train_loss gave {a:.6g} and then {b:.6g} from the same torch random-number state "
        "at the step's start: it draws random numbers from another generator (numpy, "
        "Python's random, a torch.Generator of its own), which T1T2's replay of the step "
        "cannot reproduce, so its hypergradient would be another draw's. Draw them from "
        "torch's default generator (torch.rand, torch.distributions), or use a trajectory "
        "method (their replay is checked against the run)."
    )


def step_gradient(hopt: HyperOptimizer, batch: Any, before: list[Any]) -> Comparison | None:
    """The step's ``.grad`` against ``train_loss``'s replayed gradient at the step's start
    ``before`` on the step's ``batch`` (:func:`.step_grads.compare`), for T1T2; None
    without a batch of the step (on any rank) or anything to compare."""
    if not isinstance(hopt.method, T1T2):
        return None
    group, view = hopt.process_group, hopt.view
    if distributed.any_rank(batch is None, group, view.device):
        return None
    state = hopt.loop.step_rng if hopt.loop.step_rng is not None else rng_state(view.device)
    if not step_share.shareable(hopt):
        return step_grads.compare(hopt, lambda: _replay(hopt, batch, before, state))

    def shared() -> tuple[list[torch.Tensor], Any, bool]:  # T1T2 reuses this forward pass
        raw, spec = _tree.flatten(hopt.hyperparameters.detached_raw(), "hparams")
        raw = [t.requires_grad_(True) for t in raw]
        leaves, loss, drew = _replay(hopt, batch, before, state, _tree.unflatten(spec, raw))
        step_share.share(hopt, leaves, raw, loss)
        return leaves, loss, drew

    return step_grads.compare(hopt, shared, batch)


def other_draws(hopt: HyperOptimizer, found: Comparison) -> str | None:
    """Why T1T2's replay of the step is not the step (None when it is, or cannot tell).

    Only for a step whose random-number state is the guess (the loop's own loss), without
    a process group (``.grad`` is then the ranks' average), whose replayed ``train_loss``
    drew random numbers and points elsewhere than the step's ``.grad`` (``found``; a
    rescaled gradient keeps its direction: :func:`changed_gradient` reports it)."""
    loop = hopt.loop
    guessed = getattr(loop, "step_rng_guessed", False)
    if hopt.process_group is not None or not guessed or loop.step_rng is None or not found.drew:
        return None
    if found.direction <= step_grads.tolerance(hopt):
        return None
    return (
        f"T1T2 replays the step's train_loss from the random-number state at the end of the "
        f"previous step (the loop computed its own loss), and that replay draws random numbers "
        f"but its gradient points {found.direction:.3g} away (unit vectors) from the .grad the "
        "step used: something drew random numbers between the steps (a DataLoader's random "
        "augmentation or shuffling, a seed set in the loop), or the loop changed the "
        "gradients' direction (clip_grad_value_, accumulation over micro-batches), "
        "so its hypergradient would be another step's. Compute the loss with "
        "hopt.train_loss(batch) (it records the state the step draws from)."
    )


def changed_gradient(hopt: HyperOptimizer, found: Comparison) -> str | None:
    """Why the step's gradient is not one T1T2 differentiates (None when it is
    ``train_loss``'s gradient at the step's start to :func:`.step_grads.tolerance`, or a
    constant multiple ``c`` of it, which sets ``hopt.loop.grad_scale = c``).

    The multiple is taken as constant when it was applied inside autograd
    (:func:`.step_grads.provenance` ``"clean"``: a scaled loss, summed micro-batches) and
    the plain ``.grad`` was compared (not foreach Nesterov's), without a process group; a
    factor applied to ``.grad`` after ``backward()`` may be clipping's, which depends on the
    hyperparameters."""
    tol, loop = step_grads.tolerance(hopt), hopt.loop
    if found.distance <= tol:
        return None
    scaled = found.direction <= tol and found.plain and 0.0 < found.scale < math.inf
    source = loop.provenance or step_grads.provenance(hopt)
    if scaled and source == "clean" and hopt.process_group is None:
        loop.grad_scale = found.scale
        return None
    why = (
        "the step's gradient is not train_loss's gradient at the step's start: its norm is "
        f"{found.ratio:.4g} times the replayed gradient's and it is {found.distance:.3g} "
        "(relative) away from it"
    )
    if scaled:
        where = (
            "averaged over a process group (T1T2 takes no factor there)"
            if hopt.process_group is not None
            else "changed after backward()"
            if source == "edited"
            else "not watched"
        )
        return (
            f"{why}, in its direction, and the gradients were {where}: a factor applied to "
            ".grad (p.grad = c * p.grad, clip_grad_norm_, gradient hooks) may be clipping's, "
            "which depends on the hyperparameters and whose derivative T1T2 does not take. "
            "Scale the loss itself ((c * loss).backward(): T1T2 then differentiates c times "
            "the step, exactly), or use hg.IFT() (it differentiates at the current weights)."
        )
    return (
        f"{why} (gradient clipping such as clip_grad_norm_ or clip_grad_value_, a loss "
        "other than train_loss or a term it does not hold, gradients accumulated over "
        "micro-batches other than step()'s batch or without zero_grad()). T1T2 "
        "differentiates the step on train_loss's own gradient, so its hypergradient is not "
        "this step's. Step on train_loss's gradient (put every term of the loss in "
        "train_loss), or use hg.IFT() (it differentiates at the current weights)."
    )


def note_scale(hopt: HyperOptimizer, info: Any) -> None:
    """Record in ``info.stats["step_grad_scale"]`` the factor ``c`` of a step on ``c``
    times ``train_loss``'s gradient, which T1T2's rates took (nothing when it is 1)."""
    if hopt.loop.grad_scale != 1.0 and isinstance(getattr(info, "stats", None), dict):
        info.stats["step_grad_scale"] = hopt.loop.grad_scale


def _replay(
    hopt: HyperOptimizer, batch: Any, before: list[Any], state: Any, raw: Any = None
) -> tuple[list[torch.Tensor], Any, bool]:
    """``train_loss`` on ``batch`` at fresh leaves of ``before``, replayed from the
    random-number ``state`` with gradients enabled (a loss may differentiate inside: a
    penalty): the leaves, the loss and whether the forward pass drew random numbers.
    ``raw``: the raw hyperparameters to evaluate at (default: detached), given for the
    evaluation T1T2 reuses, which leaves the modules' buffers alone as T1T2's own does."""
    view = hopt.view
    leaves = [b.detach().requires_grad_(True) for b in before]
    loss_fn = view.at_batch(hopt.train_loss_fn, hopt.hyperparameters.transform, batch)
    amp = autocast_as(hopt.loop.step_amp, view.device)  # as the step (:mod:`.precision`)
    keep = keep_buffers() if raw is not None else contextlib.nullcontext()
    raw = hopt.hyperparameters.detached_raw() if raw is None else raw
    with torch.enable_grad(), replay_rng(state, view.device), amp, keep:
        loss = loss_fn(view.tree(leaves), raw)
        drew = not same_state(state, rng_state(view.device))
    return leaves, loss, drew
