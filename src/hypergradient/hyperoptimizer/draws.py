"""Whether T1T2's replay of the step drew the random numbers the step drew.

T1T2 differentiates the step just taken, with its random draws (dropout masks, a noise
augmentation inside ``train_loss``): it replays ``train_loss`` from the random-number state
the step's forward pass drew from. ``hopt.train_loss`` and ``begin_step`` capture that state;
a loop that computes its own loss leaves the driver the state at the end of the previous
step, which is the step's only if nothing drew random numbers in between (a DataLoader's
random augmentation or shuffling, ``torch.manual_seed`` in the loop). When it is not, the
replay differentiates another draw: a probe's hypergradient of a noise scale came out
-0.18 for an exact 0.033. So, when the state is that guess and the replayed forward pass
draws, the direction of its gradient at the step's start is compared with that of the
``.grad`` the step used (one forward pass per such hyper-step, and a backward pass when it
draws).

No recorded state replays draws from elsewhere (numpy, ``random``, a private
``torch.Generator``: a mixup coefficient from ``np.random.beta``): T1T2 replayed other
noise (0.031 for an exact 0.113; -0.103 for 0.118). So the first T1T2 hyper-step evaluates
``train_loss`` twice from one state (two forward passes, once per hyper-optimizer): values
that differ skip the hyper-step with a warning (and the check is repeated at the next).

Nor is a gradient the loop changed between ``backward()`` and ``step()`` the one T1T2
differentiates (:func:`changed_gradient`): ``clip_grad_norm_`` steps with ``c g``, whose
derivative in ``phi`` is ``c (I - g g^T / ||g||^2) dg/dphi``, not ``dg/dphi`` (a probe's
hypergradient came out 660 times the clipped step's). A ``.grad`` changed in place after
``backward()`` (its version counter moved since the post-accumulate-grad hooks
``hopt.train_loss`` registers saw it: clipping, ``clip_grad_value_``, scaling; with the
loop's own loss, since it was created, which also counts autograd's own accumulation; read
just before the optimizer's step by ``step()``, after it for a step taken outside) is
compared with the replayed gradient of ``train_loss`` at the step's start (one forward and
backward pass; foreach SGD with Nesterov, which adds its buffer to ``.grad`` in place, is
recognized); one that differs warns (``on_divergence="warn"``: the hypergradient is
applied) or skips the hyper-step (``"skip"``). A gradient the loop replaced by a new tensor
(``p.grad = c * p.grad``) is not checked.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .. import _tree
from .._vocab import HypergradientWarning
from ..methods import T1T2
from ..methods.rng import replay_rng, rng_state, same_state
from .precision import autocast_as, loss_scale
from .step_checks import ends_window

if TYPE_CHECKING:  # pragma: no cover
    from .driver import HyperOptimizer

__all__ = [
    "MISMATCH",
    "changed_gradient",
    "closing",
    "foreign_draws",
    "not_the_step",
    "off_step",
    "other_draws",
    "touched",
    "unwatch",
    "watch_grads",
]

#: Distance between the directions (unit vectors) of the replayed and the step's gradient
#: above which the replay is another draw's (recomputing a gradient with the same draws
#: agrees to rounding; a gradient rescaled by ``clip_grad_norm_`` keeps its direction).
MISMATCH = 1e-4


def off_step(hopt: HyperOptimizer, batch: Any, saved: Any, skip: Callable[..., bool]) -> bool:
    """Skip (``skip(hopt, saved, why)``: True) T1T2's hyper-step whose replay is not the
    step (:func:`not_the_step`); warn about a gradient the loop changed
    (:func:`changed_gradient`), and skip it too with ``on_divergence="skip"``."""
    before = saved.params_before
    other = not_the_step(hopt, batch, before)
    if other is not None:
        return skip(hopt, saved, other)
    changed = changed_gradient(hopt, batch, before)
    if changed is None:
        return False
    if hopt.on_divergence == "skip":
        return skip(hopt, saved, f"{changed} (on_divergence='skip').")
    warnings.warn(
        f"Step {hopt.loop.count}: {changed} Its hypergradient is applied "
        "(on_divergence='warn'; 'skip' skips it).",
        HypergradientWarning,
        stacklevel=5,
    )
    return False


def not_the_step(hopt: HyperOptimizer, batch: Any, before: list[Any]) -> str | None:
    """Why T1T2's replay of the step would not be the step (:func:`foreign_draws`, then
    :func:`other_draws`), or None."""
    return foreign_draws(hopt, batch, before) or other_draws(hopt, batch, before)


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


def other_draws(hopt: HyperOptimizer, batch: Any, before: list[Any]) -> str | None:
    """Why T1T2's replay of the step is not the step (None when it is, or cannot tell).

    Checked only for T1T2, without a process group (``.grad`` is then the ranks' average),
    for a step whose random-number state is the guess (the loop's own loss) and whose
    replayed ``train_loss`` on ``batch`` at the step's start ``before`` draws random
    numbers."""
    loop = hopt.loop
    guessed = getattr(loop, "step_rng_guessed", False)
    if not isinstance(hopt.method, T1T2) or hopt.process_group is not None or not guessed:
        return None
    if batch is None or loop.step_rng is None:
        return None
    error = _replay_error(hopt, batch, before)
    if error is None or error <= MISMATCH:
        return None
    return (
        f"T1T2 replays the step's train_loss from the random-number state at the end of the "
        f"previous step (the loop computed its own loss), and that replay draws random numbers "
        f"but its gradient points {error:.3g} away (unit vectors) from the .grad the step used: "
        "something drew random numbers between the steps (a DataLoader's random augmentation "
        "or shuffling, a seed set in the loop), or the loop changed the gradients' direction "
        "(clip_grad_value_, accumulation over micro-batches), "
        "so its hypergradient would be another step's. Compute the loss with "
        "hopt.train_loss(batch) (it records the state the step draws from)."
    )


def changed_gradient(hopt: HyperOptimizer, batch: Any, before: list[Any]) -> str | None:
    """Why the step's ``.grad`` is not ``train_loss``'s gradient at the step's start (None
    when it is to :data:`MISMATCH`, relative, or it was not changed in place, or cannot be
    compared: not T1T2, a process group, no batch of the step).

    Compared only when a ``.grad`` was changed in place after it was created (its version
    counter is not 0): ``clip_grad_norm_``, ``clip_grad_value_``, accumulation; a gradient
    of one backward pass is the replay's (bar other draws, :func:`other_draws`)."""
    if not _changed_in_place(hopt, batch):
        return None
    loop, view = hopt.loop, hopt.view
    state = loop.step_rng if loop.step_rng is not None else rng_state(view.device)
    leaves, loss, _ = _replay(hopt, batch, before, state)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        return None  # the method names the problem
    step, replay = _both(hopt, leaves, loss)
    ns, nr = float(step.norm()), float(replay.norm())
    if not (math.isfinite(ns) and math.isfinite(nr)) or nr == 0.0:
        return None  # the non-finite checks, or the method's zero-gradient warning, answer
    error = min(float((step - r).norm()) for r in _candidates(hopt, replay)) / nr
    if error <= MISMATCH:
        return None
    return (
        f"the step's gradient is not train_loss's gradient at the step's start: its norm is "
        f"{ns / nr:.4g} times the replayed gradient's and it is {error:.3g} (relative) away "
        "from it (gradient clipping such as clip_grad_norm_ or clip_grad_value_, a loss "
        "other than train_loss or scaled otherwise, gradients accumulated without "
        "averaging). T1T2 differentiates the step on train_loss's own gradient, so its "
        "hypergradient is not this step's (clipped by c < 1, about 1/c too large, and "
        "without the clipping's own derivative). Step on train_loss's gradient, or use "
        "hg.IFT() (it differentiates at the current weights)."
    )


def watch_grads(hopt: HyperOptimizer) -> None:
    """For T1T2, after ``hopt.train_loss``'s forward pass: note each trained parameter's
    ``.grad`` version counter after every accumulation into it (post-accumulate-grad hooks,
    registered once per step and removed by :func:`unwatch`), so that :func:`touched`
    tells a gradient the loop changed after ``backward()`` from one that autograd wrote in
    place (a parameter used twice, accumulation over micro-batches)."""
    loop = hopt.loop
    if not closing(hopt) or getattr(loop, "grad_hooks", None) is not None:
        return
    seen: dict[int, int] = {}

    def note(p: torch.Tensor) -> None:
        if p.grad is not None:
            seen[id(p)] = p.grad._version

    params = [p for p in hopt.view.params if p.requires_grad]
    loop.grad_seen = seen
    loop.grad_hooks = [p.register_post_accumulate_grad_hook(note) for p in params]


def closing(hopt: HyperOptimizer) -> bool:
    """T1T2, and the step under way ends with a hyper-step: the only steps whose ``.grad``
    is compared (other steps register no hook and read no version counter)."""
    return isinstance(hopt.method, T1T2) and ends_window(hopt)


def unwatch(hopt: HyperOptimizer) -> None:
    """A step's end: remove :func:`watch_grads`'s hooks and forget what they saw."""
    loop = hopt.loop
    for handle in getattr(loop, "grad_hooks", None) or ():
        handle.remove()
    loop.grad_hooks = loop.grad_seen = loop.touched = None


def touched(hopt: HyperOptimizer) -> bool | None:
    """For T1T2, whether a trained parameter's ``.grad`` was changed in place after its
    ``backward()``: its version counter moved since :func:`watch_grads`'s hooks saw it
    (without them, since it was created: a parameter the loss uses twice then counts as
    changed, costing a comparison but no warning). Read just before the optimizer's step
    by ``step()`` (the step itself may write into ``.grad``: foreach SGD with Nesterov).
    None for other methods."""
    if not isinstance(hopt.method, T1T2):
        return None
    seen = getattr(hopt.loop, "grad_seen", None)
    grads = [(id(p), p.grad) for p in hopt.view.params if p.grad is not None]
    if seen is None:
        return any(g._version != 0 for _, g in grads)
    return any(seen.get(i) != g._version for i, g in grads)


def _changed_in_place(hopt: HyperOptimizer, batch: Any) -> bool:
    """T1T2, without a process group, with the step's batch, and a ``.grad`` changed in
    place: :func:`touched` before the step when ``step()`` read it, else after it."""
    if not isinstance(hopt.method, T1T2) or hopt.process_group is not None or batch is None:
        return False
    before = getattr(hopt.loop, "touched", None)
    return bool(touched(hopt)) if before is None else before


def _both(hopt: HyperOptimizer, leaves: list[Any], loss: Any) -> tuple[Any, Any]:
    """The step's ``.grad`` and the gradient of the replayed ``loss`` in ``leaves``, flat
    in the device's wide dtype, over the trained parameters that hold a ``.grad``."""
    view, scale = hopt.view, loss_scale(hopt.loop)  # a float16 step's GradScaler scale
    used = [(leaf, p.grad) for leaf, p in zip(leaves, view.params) if p.grad is not None]
    found = torch.autograd.grad(loss * scale, [leaf for leaf, _ in used], allow_unused=True)
    wide = _tree.wide_dtype(view.device)
    step = [_flat(g, wide) for _, g in used]
    replay = [
        torch.zeros_like(a) if f is None else _flat(f, wide) / scale for a, f in zip(step, found)
    ]
    return torch.cat(step), torch.cat(replay)


def _candidates(hopt: HyperOptimizer, replay: torch.Tensor) -> list[torch.Tensor]:
    """What the step's ``.grad`` may read after the step for the replayed gradient
    ``replay``: itself, and for ``torch.optim.SGD`` with Nesterov and no weight decay,
    ``replay + momentum * buf`` (its foreach implementation, the default on CUDA, adds the
    new buffer to ``.grad`` in place)."""
    optimizer = hopt.inner_optimizer
    if type(optimizer) is not torch.optim.SGD:
        return [replay]
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    parts, nesterov = [], False
    for p in hopt.view.params:
        if p.grad is None:
            continue
        g = group_of.get(id(p), {})
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        used = g.get("nesterov", False) and not g.get("weight_decay") and buf is not None
        nesterov |= bool(used)
        zero = torch.zeros(p.grad.numel(), dtype=replay.dtype, device=replay.device)
        parts.append(_flat(buf, replay.dtype) * float(g["momentum"]) if used else zero)
    if not nesterov:
        return [replay]
    return [replay, replay + torch.cat([t.to(replay.device) for t in parts])]


def _replay_error(hopt: HyperOptimizer, batch: Any, before: list[Any]) -> float | None:
    """The distance between the directions of the replayed gradient and the step's
    ``.grad`` (None when the replayed forward pass draws no random numbers)."""
    leaves, loss, drew = _replay(hopt, batch, before, hopt.loop.step_rng)
    if not drew:
        return None
    a, replay = _both(hopt, leaves, loss)
    return min(_direction_error(a, b) for b in _candidates(hopt, replay))


def _direction_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """The distance between the unit vectors of ``a`` and ``b``."""
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 or nb == 0:
        return 0.0 if na == nb else float("inf")
    # the directions' distance: a gradient rescaled by the loop (clip_grad_norm_) is the
    # same draw's (changed_gradient then reports the rescaling)
    return float((a / na - b / nb).norm())


def _replay(
    hopt: HyperOptimizer, batch: Any, before: list[Any], state: Any
) -> tuple[list[torch.Tensor], Any, bool]:
    """``train_loss`` on ``batch`` at fresh leaves of ``before``, replayed from the
    random-number ``state`` with gradients enabled (a loss may differentiate inside: a
    penalty): the leaves, the loss and whether the forward pass drew random numbers."""
    view = hopt.view
    leaves = [b.detach().requires_grad_(True) for b in before]
    loss_fn = view.at_batch(hopt.train_loss_fn, hopt.hyperparameters.transform, batch)
    amp = autocast_as(hopt.loop.step_amp, view.device)  # as the step (:mod:`.precision`)
    with torch.enable_grad(), replay_rng(state, view.device), amp:
        loss = loss_fn(view.tree(leaves), hopt.hyperparameters.detached_raw())
        drew = not same_state(state, rng_state(view.device))
    return leaves, loss, drew


def _flat(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``g`` (dense or sparse, as an embedding's) as a flat dense vector of ``dtype``."""
    g = g.detach()
    return (g.to_dense() if g.is_sparse else g).to(dtype).flatten()
