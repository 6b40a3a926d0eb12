"""The gradient T1T2's step used, against the one T1T2 differentiates.

T1T2 differentiates the step ``theta' = theta - R g`` on ``train_loss``'s gradient ``g`` at
the step's start. The step's ``.grad`` may be another one: a loss scaled or summed with a
term the driver does not know (``(2 * loss).backward()``, ``loss + reg``), gradients
accumulated over micro-batches without averaging, replaced (``p.grad = c * p.grad``) or
clipped (``clip_grad_norm_``, also under a process group). No cheap signal tells all of
these apart from a healthy step (a regularizer added to the loss leaves every counter and
hook as a plain ``backward()`` does), so at every T1T2 hyper-step :func:`compare` replays
``train_loss`` on the step's batch at the step's start, with the step's random draws and
autocast state, and measures the step's ``.grad`` ``s`` against the replayed gradient
``r``: the distance ``||s - r|| / ||r||``, the distance between their directions and the
factor ``c = <s, r> / ||r||^2``. The replay's forward pass is the one T1T2's look-ahead
takes first: without autocast or a process group it is handed over (:mod:`.step_share`,
:mod:`~hypergradient.methods.t1t2_shared`), and when the step's loss came from one
``hopt.train_loss(batch)`` call ``r`` is read off the step's own backward pass
(:mod:`.step_tap`, which answers only when the replay is that forward pass and the check
accepts; else the replay's backward pass decides). A healthy loop with ``hopt.train_loss``
then pays no pass for the check (MNIST-sized MLP, hyperparameters first: 12 matrix
products per step with a hyper-step instead of 17, the step's 5 included); a loop that
computes its own loss one backward pass (under autocast or a process group a forward and a
backward pass, about a training step, and one all-reduce of ``r`` under a process group, as
``.grad`` is the ranks' average).

Within :func:`tolerance` (``1e-4``; under autocast or with low-precision parameters four
units of their rounding: bfloat16 accumulation over micro-batches measured 2.6e-3, float32
9e-8, a single float32 or bfloat16 pass 0) the step is the one differentiated. A step in
``r``'s direction with another norm used ``c g``: ``d theta' / d phi`` is ``c`` times
T1T2's, which accounts for it exactly (its rates times ``c``) when the factor was applied
inside autograd (:func:`provenance` ``"clean"``: every ``.grad`` was last written by a
backward pass and no tensor hook on a parameter could rescale it: a scaled loss, summed
micro-batches); a factor applied afterwards may be clipping's, which depends on ``phi``
(its derivative has a projection term T1T2 does not take), so the caller warns or skips.
Not told apart: a factor inside the graph that depends on ``phi`` through a detached
value (``(loss / loss.detach()).backward()``) is taken as the constant it was declared.

:func:`watch` notes, with post-accumulate-grad hooks on the trained parameters, which
tensor each ``.grad`` is and its version counter after each accumulation: hooks are
registered only for a step that ends with a T1T2 hyper-step (at construction or load, at
the end of the step before it, by ``hopt.train_loss``), kept while the next step ends
with one too, and removed with a hyper-optimizer that is dropped.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import _tree, distributed
from ..methods import T1T2
from ..operators.modes import is_double_backward_error
from . import step_share, step_tap
from .precision import loss_scale
from .step_checks import ends_window

if TYPE_CHECKING:  # pragma: no cover
    from .driver import HyperOptimizer

__all__ = [
    "MISMATCH",
    "Comparison",
    "accepts",
    "closing",
    "compare",
    "provenance",
    "rewatch",
    "scaled_rates",
    "tolerance",
    "unwatch",
    "watch",
    "watched",
]

#: The relative distance below which the step's gradient is the replayed one (recomputing
#: a gradient with the same draws agrees to rounding); :func:`tolerance` widens it for
#: low-precision arithmetic.
MISMATCH = 1e-4


def closing(hopt: HyperOptimizer) -> bool:
    """T1T2, and the step under way ends with a hyper-step: the only steps whose ``.grad``
    is watched and compared."""
    return isinstance(hopt.method, T1T2) and ends_window(hopt)


class _Watch:
    """A hyper-optimizer's hooks and what they saw (kept off the loop state, which a
    rolled-back step replaces: its hooks would stay registered)."""

    def __init__(self, hopt: HyperOptimizer):
        self.seen: dict[int, tuple[Any, int]] = {}
        seen = self.seen

        def note(p: Tensor) -> None:
            if p.grad is not None:
                seen[id(p)] = (weakref.ref(p.grad), p.grad._version)

        params = [p for p in hopt.view.params if p.requires_grad]
        self.handles = [p.register_post_accumulate_grad_hook(note) for p in params]
        # a hyper-optimizer dropped while watching leaves no hook behind
        self.done = weakref.finalize(hopt, _remove, self.handles)

    def close(self) -> None:
        self.done()


def _remove(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()


_WATCHES: weakref.WeakKeyDictionary[Any, _Watch] = weakref.WeakKeyDictionary()


def watch(hopt: HyperOptimizer) -> None:
    """For a :func:`closing` step: register the hooks that note each trained parameter's
    ``.grad`` (the tensor and its version counter) after every accumulation into it; for
    another step, remove them."""
    if not closing(hopt):
        unwatch(hopt)  # (registered for a step that no longer closes: inner_steps changed)
    elif hopt not in _WATCHES:
        _WATCHES[hopt] = _Watch(hopt)


def rewatch(hopt: HyperOptimizer) -> None:
    """A step's end: forget what the hooks saw; keep them when the next step is
    :func:`closing` too (``inner_steps=1`` registers them once), else remove them."""
    hopt.loop.provenance = None
    step_share.drop(hopt)  # a replay no hyper-step took (skipped)
    step_tap.forget(hopt)
    found = _WATCHES.get(hopt)
    if found is not None:
        found.seen.clear()
    watch(hopt)


def unwatch(hopt: HyperOptimizer) -> None:
    """Remove :func:`watch`'s hooks and forget what they saw."""
    found = _WATCHES.pop(hopt, None)
    if found is not None:
        found.close()


def watched(hopt: HyperOptimizer) -> bool:
    """Whether the hooks of :func:`watch` are registered."""
    return hopt in _WATCHES


def provenance(hopt: HyperOptimizer) -> str:
    """Who wrote the step's ``.grad`` (read just before the optimizer's step, which may
    write into it: foreach SGD with Nesterov): ``"clean"``, each ``.grad`` the tensor a
    backward pass last wrote, unchanged since, with no tensor hook on a trained parameter;
    ``"edited"``, changed or replaced after (clipping, ``p.grad = c * p.grad``) or hooked;
    ``"unknown"``, not watched."""
    found = _WATCHES.get(hopt)
    if found is None:
        return "unknown"
    seen = found.seen
    for p in hopt.view.params:
        g = p.grad
        if g is None:
            continue
        ref, version = seen.get(id(p), (None, -1))
        if ref is None or ref() is not g or version != g._version or p._backward_hooks:
            return "edited"
    return "clean"


@dataclass
class Comparison:
    """The step's gradient ``s`` against the replayed ``r`` (relative to ``||r||``)."""

    distance: float  # ||s - r|| / ||r||
    direction: float  # || s / ||s|| - r / ||r|| ||
    scale: float  # <s, r> / ||r||^2
    ratio: float  # ||s|| / ||r||
    drew: bool  # the replayed forward pass drew random numbers
    plain: bool  # r is train_loss's gradient itself (not foreach Nesterov's g + mu buf)


def compare(
    hopt: HyperOptimizer, replay: Callable[[], tuple], batch: Any = None
) -> Comparison | None:
    """The step's ``.grad`` against ``train_loss``'s gradient at the step's start
    (``replay() -> (leaves, loss, drew)`` evaluates it there, with the step's draws, on the
    step's ``batch``); None when there is nothing to compare (no ``.grad`` at all, a loss
    the method names, a non-finite value the non-finite checks answer). The gradient is
    the replay's backward pass, or the step's own backward pass read by :mod:`.step_tap`
    when the replay is the tapped forward pass and the comparison is one :func:`accepts`
    takes (else the replay's backward pass decides). The sums are taken leaf by leaf,
    accumulated in the device's wide dtype (no flat or wide copy), read in one
    synchronization. Under a process group
    every rank calls it: the replayed gradients are averaged in one all-reduce (a rank
    whose replay raises makes every rank raise, :func:`~hypergradient.distributed.guarded`)."""
    view = hopt.view
    wide = _tree.wide_dtype(view.device)
    params = list(view.params)
    held: list[Any] = []  # the replay's leaves and loss, and whether the tap answered
    step_share.drop(hopt)  # (one a failed hyper-step left)

    def local() -> list[Any]:  # the flags (valid, drew) as a tensor for the all-reduce
        leaves, loss, drew = replay()
        valid = isinstance(loss, Tensor) and loss.numel() == 1 and loss.requires_grad
        flags: Any = [1.0, float(drew)] if valid else [0.0, 0.0]
        if group is not None:
            flags = torch.tensor(flags, dtype=wide, device=view.device)
        if not valid:
            return [*(torch.zeros_like(p) for p in params), flags]
        tapped = step_tap.gradient(hopt, batch, leaves, loss) if step_share.offered(hopt) else None
        held.extend((leaves, loss, tapped))
        return [*(tapped[0] if tapped is not None else _replayed(hopt, leaves, loss)), flags]

    group = hopt.process_group
    if group is None:  # (no tensor for the flags: nothing to reduce)
        *r, flags = local()
    else:
        like = [*params, torch.empty(2, dtype=wide, device=view.device)]
        *r, flags = distributed.guarded(local, like, group, "T1T2's step gradient")
    valid, drew = flags.tolist() if isinstance(flags, Tensor) else flags
    if valid < 1.0:
        return None  # on some rank: the method names the problem
    tapped = held[2] if held else None
    if tapped is not None and tapped[1] == 1.0 and _sent_as_is(params, r):
        return Comparison(0.0, 0.0, 1.0, 1.0, drew > 0, True)  # .grad is what loss sent
    found = _measure(hopt, r, drew > 0)
    if tapped is not None and (found is None or not accepts(hopt, found)):
        found = _measure(hopt, _replayed(hopt, held[0], held[1]), drew > 0)
    return found


def _sent_as_is(params: list[Tensor], sent: list[Tensor]) -> bool:
    """Whether each parameter's ``.grad`` is bitwise what the tapped pass sent it (as
    AccumulateGrad sums it): the step's gradient is then ``train_loss``'s, nothing added,
    scaled or clipped, and :func:`_measure` would find it at distance 0 (a non-finite
    gradient is left to it: NaN differs from itself; an all-zero one passes the check
    either way)."""
    pairs: list[tuple[Tensor, Tensor]] = []
    for p, t in zip(params, sent):
        g = p.grad
        if g is None or g.is_sparse or g.shape != t.shape or g.dtype != t.dtype:
            return False
        pairs.append((g, t))
    if params[0].device.type == "cpu":
        return all(torch.equal(g, t) for g, t in pairs)
    return not bool(torch.stack([torch.ne(g, t).any() for g, t in pairs]).any())  # one sync


def _replayed(hopt: HyperOptimizer, leaves: list[Tensor], loss: Tensor) -> list[Tensor]:
    """The replayed loss's gradient in ``leaves`` (its graph kept for T1T2 when shared). A
    float16 step's backward pass ran on the GradScaler's scaled loss: so does the
    replay's (unscaled, its float16 gradients underflow), then it is unscaled."""
    scale = loss_scale(hopt.loop)
    scaled = loss * scale if scale != 1.0 else loss
    kept = step_share.offered(hopt)  # T1T2 differentiates the replay's graph again
    try:
        found = torch.autograd.grad(scaled, leaves, allow_unused=True, retain_graph=kept)
    except RuntimeError as err:  # a compiled model's backward keeps no graph ("donated
        if not (kept and is_double_backward_error(err)):  # buffers"): it crashed T1T2 at
            raise  # every hyper-step; the look-ahead now evaluates its own (and falls back)
        step_share.drop(hopt)
        found = torch.autograd.grad(scaled, leaves, allow_unused=True)
    grads = [torch.zeros_like(p) if f is None else _dense(f) for p, f in zip(leaves, found)]
    return grads if scale == 1.0 else [g / scale for g in grads]


def accepts(hopt: HyperOptimizer, found: Comparison) -> bool:
    """Whether the check lets the step pass (:func:`.draws.changed_gradient` returns None):
    the replayed gradient to :func:`tolerance`, or a constant multiple of it applied
    inside autograd, without a process group."""
    tol = tolerance(hopt)
    if found.distance <= tol:
        return True
    scaled = found.direction <= tol and found.plain and 0.0 < found.scale < math.inf
    clean = (hopt.loop.provenance or provenance(hopt)) == "clean"
    return scaled and clean and hopt.process_group is None


def _untouched(p: Tensor, seen: dict[int, tuple[Any, int]]) -> bool:
    """Whether ``p.grad`` is the tensor the last accumulation into it left, unwritten since."""
    ref, version = seen.get(id(p), (None, -1))
    return ref is not None and ref() is p.grad and p.grad is not None and p.grad._version == version


def _measure(hopt: HyperOptimizer, r: list[Tensor], drew: bool) -> Comparison | None:
    """The step's ``.grad`` against the gradient ``r`` (and the candidates it gives)."""
    view = hopt.view
    wide = _tree.wide_dtype(view.device)
    params = list(view.params)
    cands = _candidates(hopt, r)
    sums = []  # per leaf and candidate: ||s||^2, ||c||^2, <s, c>, ||s - c||^2
    for p, *leaf in zip(params, *cands):
        g = torch.zeros((), dtype=p.dtype, device=p.device) if p.grad is None else _dense(p.grad)
        g = _at_least_single(g)
        for c in leaf:
            c = _at_least_single(c.to(g.dtype))
            diff = g - c  # (exact where they agree: Sterbenz)
            sums += [_dot(g, g, wide), _dot(c, c, wide), _dot(g, c, wide), _dot(diff, diff, wide)]
    read = torch.stack([v.to(view.device) for v in sums]).reshape(len(params), len(cands), 4)
    totals = read.sum(0).tolist()
    best = None
    for i, (ss, cc, sc, dd) in enumerate(totals):
        if not all(map(math.isfinite, (ss, cc, sc, dd))) or ss == 0.0:
            return None  # non-finite: those checks answer; no gradient: nothing was stepped
        if cc == 0.0:
            return Comparison(math.inf, math.inf, math.inf, math.inf, drew, True)
        ns, nc = math.sqrt(ss), math.sqrt(cc)
        direction = math.sqrt(max(0.0, 2.0 - 2.0 * sc / (ns * nc)))
        found = Comparison(math.sqrt(dd) / nc, direction, sc / cc, ns / nc, drew, i == 0)
        if best is None or found.distance < best.distance:
            best = found
    return best


def _at_least_single(t: Tensor) -> Tensor:
    """``t`` in float32 when it is in a lower precision (bfloat16, float16), else itself."""
    return t.float() if t.is_floating_point() and t.element_size() < 4 else t


def _dot(a: Tensor, b: Tensor, wide: torch.dtype) -> Tensor:
    """``<a, b>`` summed in ``wide`` (the products in ``a``'s dtype: no wide copy of a leaf,
    one temporary; float32 products round at 6e-8 relative, far below the tolerance)."""
    return torch.sum(a * b, dtype=wide)


def _dense(g: Tensor) -> Tensor:
    """``g`` detached and dense (a sparse gradient: an embedding's)."""
    g = g.detach()
    return g.to_dense() if g.is_sparse else g


def tolerance(hopt: HyperOptimizer) -> float:
    """The relative distance a healthy step's gradient stays within: :data:`MISMATCH`, or
    four units of the rounding of the lowest precision the step computed in (its autocast
    dtype, its parameters' dtype): bfloat16 0.031, float16 0.0039."""
    dtypes = [d for _, d in hopt.loop.step_amp or ()]
    dtypes += [p.dtype for p in hopt.view.params if p.is_floating_point()]
    eps = max((torch.finfo(d).eps for d in dtypes), default=0.0)
    return max(MISMATCH, 4 * eps)


def scaled_rates(lr: Any, scale: float) -> Any:
    """``Problem.lr`` for a step on ``scale`` times ``train_loss``'s gradient: every rate
    (a number, or one per leaf, numbers or tensors) times ``scale``."""
    if scale == 1.0:
        return lr
    if isinstance(lr, tuple):
        return tuple(r * scale for r in lr)
    return lr * scale


def _candidates(hopt: HyperOptimizer, replay: list[Tensor]) -> list[list[Tensor]]:
    """What the step's ``.grad`` may read after the step, per leaf, for the replayed gradient
    ``replay``: itself, and for ``torch.optim.SGD`` with Nesterov and no weight decay,
    ``replay + momentum * buf`` (its foreach implementation, the default on CUDA, adds the
    new buffer to ``.grad`` in place) for a leaf whose ``.grad`` may have been written
    since the backward pass: not the tensor :func:`watch` saw last, at its version then
    (the single-tensor implementation, the CPU's, leaves it: a loss scaled by 2 read as
    foreach's ``.grad``, and its exact scale was refused, the hypergradient half the
    step's)."""
    optimizer = hopt.inner_optimizer
    if type(optimizer) is not torch.optim.SGD:
        return [replay]
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    found = _WATCHES.get(hopt)
    seen = {} if found is None else found.seen
    added, nesterov = [], False
    for p, r in zip(hopt.view.params, replay):
        g = group_of.get(id(p), {})
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        used = g.get("nesterov", False) and not g.get("weight_decay") and buf is not None
        used = used and p.grad is not None and not _untouched(p, seen)
        nesterov |= bool(used)
        added.append(r + float(g["momentum"]) * buf.detach().to(r.dtype) if used else r)
    return [replay, added] if nesterov else [replay]
