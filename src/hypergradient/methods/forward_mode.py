"""Forward mode (RTHO): tangents of the trajectory, one per hyperparameter.

Franceschi et al. (2017), "Forward and Reverse Gradient-Based Hyperparameter
Optimization", ICML.

The tangents of each step's gradient come from one batched double-backward pass in plain
``torch.autograd`` (faster than ``torch.func.jvp`` of the gradient vmapped over the
directions, and with the product modes' fallback for kernels without double backward);
the optimizer update's tangents, for SGD with no tuned setting (a linear update), by the
update itself applied to the tangents; else by forward-mode AD
(``torch.autograd.forward_ad``, one direction at a time) for up to :data:`DUAL_MAX`
hyperparameters, else by ``torch.func.jvp`` vmapped over the directions, whose first
transform imports ``torch._dynamo`` (~2 s, once per process; the reverse-mode methods
never do).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from .. import _tree
from .._tree import Tree
from .._vocab import as_bool, as_optional_int
from ..optim.functional import SGD, FunctionalOptimizer
from ._checks import check_trees, unused_leaves
from .base import Problem
from .forward_sources import LinearGains
from .forward_tangents import GradientTangents, batching_key
from .growth import TangentWatch
from .replay import Run, rng_state, set_rng_state
from .source_watch import SourceWatch
from .traj_modes import as_mode, is_double_backward_error
from .trajectory import (
    Sweep,
    TrajectoryInfo,
    TrajectoryMethod,
    check_forward,
    forward_sweep,
    functional_problem,
    functional_result,
    outer_gradients,
)

__all__ = ["ForwardMode", "forward_mode"]


#: Up to this many hyperparameters, the update's tangents are pushed one direction at a
#: time with ``torch.autograd.forward_ad`` (elementwise forward derivatives in C++); above,
#: by ``torch.func.jvp`` vmapped over the directions. On a 200k-parameter MLP with one
#: hyperparameter the vmapped jvp cost about a third of each step (its batching rules
#: decompose the elementwise update into Python-level primitives).
DUAL_MAX = 8


def _push_dual(run: Run, primal: tuple[Any, Any, Any], tangent: tuple[Any, ...], t: int) -> Any:
    """The tangents of ``update(p, s, g, h)`` along each of the ``m`` directions of
    ``(tp, ts, tg, th)`` (stacked on dim 0), by forward-mode AD, one direction at a time."""
    tp, ts, tg, th = tangent
    m = th[0].shape[0]
    out_p: list[list[Tensor]] = [[] for _ in tp]
    out_s: list[list[Tensor]] = [[] for _ in ts]
    with fwAD.dual_level():
        for j in range(m):
            duals = [
                tuple(fwAD.make_dual(x, d[j]) for x, d in zip(xs, ds))
                for xs, ds in zip((*primal, run.h), tangent)
            ]
            dual_p, dual_s, dual_g, dual_h = duals
            new_p, new_s = run.update_h(dual_p, dual_s, dual_g, dual_h, t)
            for acc, outs, like in ((out_p, new_p, primal[0]), (out_s, new_s, primal[1])):
                for lst, x, ref in zip(acc, outs, like):
                    d = fwAD.unpack_dual(x).tangent
                    lst.append(torch.zeros_like(ref) if d is None else d)
    return tuple(torch.stack(v) for v in out_p), tuple(torch.stack(v) for v in out_s)


def linear_update(run: Run) -> bool:
    """Whether the update is linear in ``(params, state, gradient)`` and independent of the
    hyperparameters: :class:`~hypergradient.optim.SGD` (any momentum, dampening, weight
    decay, Nesterov) with no setting tuned. Its tangents are then the update applied to
    the tangents (:func:`_push_linear`)."""
    return type(run.optimizer) is SGD and not run.setting_index and not run.setting_fns


def _push_linear(run: Run, primal: tuple[Any, Any, Any], tangent: tuple[Any, ...], t: int) -> Any:
    """As :func:`_push_dual` for a :func:`linear_update`: ``J (dp, ds, dg) = update(dp, ds,
    dg)`` for all ``m`` directions at once (broadcast over the leading axis), exactly.

    Forward-mode AD of the same update costs ~20x more on CPU: each product with a plain
    number gets a zero tangent whose arithmetic takes torch's slow reference path."""
    tp, ts, tg, _ = tangent
    with torch.no_grad():
        return run.update(tp, ts, tg, run.settings, t)


def _push_vmapped(run: Run, primal: tuple[Any, Any, Any], tangent: tuple[Any, ...], t: int) -> Any:
    """As :func:`_push_dual`, by ``torch.func.jvp`` vmapped over the ``m`` directions."""

    def push(dp: Any, ds: Any, dg: Any, dh: Any) -> Any:
        def update(pp: Any, ss: Any, gg: Any, hh: Any) -> Any:
            return run.update_h(pp, ss, gg, hh, t)

        return torch.func.jvp(update, (*primal, run.h), (dp, ds, dg, dh))[1]

    return torch.func.vmap(push, randomness="same")(*tangent)


def _fused_step(
    run: Run, tangents: GradientTangents, p: Any, t: int, tp: Any, th: Any
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], Tensor] | None:
    """Step ``t``'s gradient tangents and its gradient from one graph, or None.

    While double backward works on this run, the gradient that the tangents' graph holds
    is the step's gradient: one gradient per step saved. The graph's evaluation is the
    step's first (it records the step's random numbers); should it fail, the step is redone
    the separate way from the same random state, which checks the graph again (a
    ``@once_differentiable`` node) and falls back as ``hvp`` allows. Without a process
    group only (the separate path averages over the ranks).
    """
    if run.group is not None or tangents.mode != "double":
        return None
    before = rng_state(run.device)
    try:
        with run.first_pass(t):
            tg = tangents.double(p, t, tp, th)
    except RuntimeError as error:
        if not is_double_backward_error(error):
            raise
        set_rng_state(before, run.device)  # the separate path draws what the failed pass drew
        tangents.checked = False  # and inspects the graph it builds again
        return None
    g, loss = tangents.primal
    run.skips.note(t, tangents.seen)  # torch skips a .grad None
    return tuple(tg), tuple(g), loss


def _tangents(p: tuple[Tensor, ...], m: int, probe: bool) -> tuple[Tensor, ...]:
    """The parameters' initial tangents: ``m`` zero rows (``dtheta_0 / dphi``), then, with
    ``probe``, the probe's: a fixed random unit vector (its own generator: the global one
    is untouched)."""
    zeros = [torch.zeros((m, *x.shape), dtype=x.dtype, device=x.device) for x in p]
    if not probe:
        return tuple(zeros)
    gen = torch.Generator().manual_seed(0)
    u = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in p]
    n = torch.linalg.vector_norm(torch.cat([v.reshape(-1) for v in u])) if u else 1.0
    rows = [(v / n).to(x.device, x.dtype)[None] for x, v in zip(p, u)]
    return tuple(torch.cat([z, r]) for z, r in zip(zeros, rows))


def _step_tangents(
    run: Run, tangents: GradientTangents, p: Any, t: int, tp: Any, th: Any, sources: bool
) -> tuple[Any, Tensor, Any, Any]:
    """Step ``t``'s gradient, loss, gradient tangents and (with ``sources``) the tangents'
    sources ``H_tp e_k`` (:attr:`GradientTangents.source`), averaged over the ranks."""
    fused = _fused_step(run, tangents, p, t, tp, th)
    if fused is not None:
        tg, g, loss = fused
        return g, loss, tg, tuple(tangents.source)
    with torch.no_grad(), run.first_pass(t):  # the primal draws from the global RNG
        g, loss = run.mean_grad(p, t)

    def local() -> list[Tensor]:  # under the step's draws
        out = tangents(p, t, tp, th)
        return [*out, *tangents.source] if sources else out

    both = run.reduce(local, [*tp, *tp] if sources else tp)
    return g, loss, both[: len(tp)], both[len(tp) :]


def _sources_of(
    run: Run, push: Any, gains: LinearGains | None, primal: Any, tangent: Any, t: int
) -> tuple[Any, Tensor | None]:
    """The step's sources for :class:`SourceWatch`: ``B_t = dPhi_t/dphi``, the update's
    tangent along ``(0, 0, H_tp e_k, e_k)``, by one more push; for plain SGD, ``S_t =
    H_tp e_k`` with the update's gain on each leaf (:mod:`.forward_sources`)."""
    if gains is not None:
        return tangent[2], gains(t, primal[2], primal[1])
    return push(run, primal, tangent, t)[0], None


def _observe(meter: SourceWatch | TangentWatch, m: int, b: Any, tp: Any, ts: Any) -> None:
    """Record the step's sources ``b = (B_t or S_t, gains)`` and tangents ``Z_{t+1}``
    (:class:`SourceWatch`), or the probe's row ``m`` (:class:`TangentWatch`, which scales
    it back to norm 1)."""
    if isinstance(meter, TangentWatch):
        meter.push([x[m] for x in tp], [x[m] for x in ts])
    else:
        meter.record(b[0], b[1], tp)


def _propagate(run: Run, tangents: GradientTangents, watch: str | None) -> tuple[Any, ...]:
    """Run the steps with tangents ``Z_t = ds_t/dphi`` and the watch (``"sources"``:
    :class:`SourceWatch`; ``"probe"``: one more tangent, :class:`TangentWatch`; None);
    returns ``(theta_T, Z_T, losses, the watch's growth)`` (growth None without a watch)."""
    m = run.hspec.size
    probe, sources = watch == "probe", watch == "sources"
    dtype = _tree.common_dtype(list(run.h))
    rows = m + 1 if probe else m
    eye = torch.eye(rows, m, dtype=dtype, device=run.device)  # the probe's row: no source
    th = tuple(x.to(h.dtype) for x, h in zip(_tree.split(eye, run.hspec), run.h))
    p, s = run.p0, run.init_state()
    tp = _tangents(p, m, probe)
    ts = tuple(torch.zeros((rows, *x.shape), dtype=x.dtype, device=x.device) for x in s)
    zero = (tp, ts)  # the sources' tangents of the state: none (never written in place)
    tangents.sources = sources
    meter = TangentWatch() if probe else SourceWatch()
    gains = LinearGains.of(run) if sources else None
    losses = []
    linear = _push_linear if linear_update(run) else None
    push = linear or (_push_dual if m <= DUAL_MAX else _push_vmapped)
    for t in range(run.steps):
        g, loss, tg, source = _step_tangents(run, tangents, p, t, tp, th, sources)
        b = _sources_of(run, push, gains, (p, s, g), (*zero, source, th), t) if sources else ()
        tp, ts = push(run, (p, s, g), (tp, ts, tg, th), t)
        if watch:
            _observe(meter, m, b, tp, ts)
        with torch.no_grad():
            p, s = run.update(p, s, g, run.settings, t)
        losses.append(loss.detach().reshape(()))
    check_forward(run, losses, p)
    return p, tuple(x[:m] for x in tp), losses, meter.growth() if watch else None


def _watch(run: Run, watch: bool, hvp: str) -> str | None:
    """The instability watch of a sweep: ``"sources"`` for :class:`~hypergradient.optim.SGD`
    (an update linear in ``(params, state, gradient)`` whose coefficients are constants of
    the window) with double backward, else ``"probe"`` (None when ``watch`` is False)."""
    if not watch:
        return None
    return "sources" if type(run.optimizer) is SGD and hvp != "first_order" else "probe"


#: How many batch-shape keys a ForwardMode remembers as checked (the oldest go first).
CHECKED_KEYS = 64


class ForwardMode(TrajectoryMethod):
    """Forward mode through the recorded inner steps (Franceschi et al., 2017).

    Propagates ``Z_t = d s_t / d phi`` (one tangent per hyperparameter) alongside the run
    and returns ``d_phi g + (d theta_T / d phi)^T grad_theta g``. Equal to
    :class:`~hypergradient.Unrolled` up to rounding. The instability Unrolled measures by its
    adjoint's growth, forward mode measures (:mod:`~hypergradient.methods.growth`) for
    :class:`~hypergradient.optim.SGD` from its own tangents: the largest ratio of a
    hyperparameter's tangent ``||Z_{t+1}||`` to the sum of its sources ``||B_s||`` so far
    (``B_s = dPhi_s/dphi``, the update's tangent of ``H_tp e_k``: the vector-Jacobian
    products of ``grad_phi f`` alone, a penalty's or a loss weight's graph, taken apart
    from the tangents' batched pass and added to it, then the update's gain on each leaf
    for plain SGD, :mod:`~hypergradient.methods.forward_sources`, or one more push of the
    update with tuned settings), a lower bound of the growth of the products of step
    Jacobians along the directions the hypergradient is made of; for other updates (Adam)
    and
    ``hvp="first_order"``, by one more tangent, a probe with no hyperparameter's source
    (``dPhi_t/ds_t`` applied to a fixed random unit vector at every step). Either is
    ``info.stats["tangent_growth"]`` (``info.stats["watch"]``: ``"sources"`` or
    ``"probe"``), and a chaotic run (a millionfold growth) or one starting to diverge is
    reported as Unrolled reports it (``status == "diverged"``, a warning, and
    ``on_divergence="skip"`` skips it). The sources' ratio does not see a growth along
    directions no source reaches (parameters that no hyperparameter steers: the
    hypergradient does not depend on them). The tangents of each step's gradient,
    ``H_tt Z_t + H_tp``, are ``m`` vector-Jacobian products of the gradient's graph taken
    in one batched backward pass (:mod:`~hypergradient.methods.forward_tangents`); the
    optimizer update's tangents by the update itself (SGD with no tuned setting: it is
    linear) or forward-mode AD.

    Args:
        chunk_size: directions pushed together (bounds memory); None: all ``m``.
        hvp: how the gradient's tangents are computed: ``"auto"`` (default: double
            backward, falling back with one :class:`~hypergradient.HypergradientWarning` on
            kernels without it, e.g. fused attention), ``"double"``, ``"double_math"``
            (math attention kernel, no cuDNN) or ``"first_order"`` (central differences of
            gradients, any kernel). The mode used is ``info.stats["hvp"]``.
        watch: check the run's instability (default): the sources' ratio for SGD, the
            probe tangent otherwise; False saves its cost, and the run's instability is
            then not checked (``stats["tangent_growth"]`` and ``stats["watch"]`` are None).

    Memory: ``m`` tangents of the state (``m + 1`` with the probe), independent of ``T``,
    plus one step's graph. Cost per step: one gradient, the graph of the gradient and ``m``
    batched vector-Jacobian products (measured ``1.5 + 1.1 m`` gradients on a
    200k-parameter MLP without a watch). The sources' watch moves the products of
    ``grad_phi f`` out of the batched pass (no more work for a penalty: at most a
    first-order backward pass per hyperparameter for a loss weight; after a fallback of
    ``hvp="auto"`` to first order, 2 gradients per hyperparameter) and reads norms: about
    1.5 training steps per 10-step window on the MNIST MLP of
    ``benchmarks/hyperstep_cost.py`` (m = 1, CPU time, in-process A/B), 15 fewer than the
    probe; on tiny models with many hyperparameters its separate batched pass costs more
    than the probe's row (logistic regression, m = 30: about +10%). The probe adds one
    direction (+35% for SGD with momentum and ``m = 2`` on a 16k-parameter MLP, +80% for
    Adam, whose update's tangents are pushed one direction at a time; first order:
    ``1 + 2 (m + 1)``), so it suits few hyperparameters (learning rates, momentum, a handful of loss
    weights); the first sweep for given shapes of leaves and batches also checks its batched
    pass against a looped product (one more, until every output was reached: some of torch's
    batching rules are silently wrong) and remembers the shapes it held for. No state that
    changes a result.
    """

    name = "forward_mode"

    def __init__(self, chunk_size: int | None = None, hvp: str = "auto", watch: bool = True):
        self.chunk_size = as_optional_int(chunk_size, "chunk_size", min=1)
        self.hvp = as_mode(hvp)
        self.watch = as_bool(watch, "watch")
        self._batching_ok: dict[Any, None] = {}  # batching_key()s whose batched pass was
        # checked: the last CHECKED_KEYS (batches of a new shape each window grew it forever)

    def __call__(self, problem: Problem) -> tuple[Tree, TrajectoryInfo]:
        if isinstance(problem, Problem) and problem.hparams_by_reference:
            raise ValueError(
                "ForwardMode pushes tangents through the steps with torch.func: the losses "
                "must read the hyperparameters through their `hparams` argument "
                "(hparams_by_reference is for the implicit methods, Unrolled and DrMAD)."
            )
        return super().__call__(problem)

    def sweep(self, run: Run, outer_loss: Callable[[Any, Any], Tensor]) -> Sweep:
        m = run.hspec.size
        if m == 0:  # nothing to propagate: only the (empty) direct term
            p, _, _, losses = forward_sweep(run, lambda t: False, run.steps)
            _, gh, value = outer_gradients(run, outer_loss, p)
            return Sweep(list(gh), p, losses, value, run.steps, 0, 1, {"products": 0})
        key = batching_key(run)
        tangents = GradientTangents(run, self.hvp, self.chunk_size, key in self._batching_ok)
        watch = _watch(run, self.watch, self.hvp)
        p, tp, losses, growth = _propagate(run, tangents, watch)
        if tangents.vmap_checked and key is not None:
            self._batching_ok[key] = None
            if len(self._batching_ok) > CHECKED_KEYS:
                del self._batching_ok[next(iter(self._batching_ok))]
        direct = [False] * len(run.h)
        gp, gh, value = outer_gradients(run, outer_loss, p, direct)
        dtype = _tree.common_dtype(list(run.h))
        total = torch.zeros(m, dtype=dtype, device=run.device)
        for z, g in zip(tp, gp):
            total = total + z.reshape(m, -1).to(dtype) @ g.reshape(-1).to(dtype)
        flat = _tree.cat(list(gh), run.hspec, dtype, run.device) + total
        hyper = _tree.split(flat, run.hspec, [h.dtype for h in run.h])
        products = (m + int(watch == "probe")) * run.steps
        stats = {"products": products, **tangents.report(), "tangent_growth": growth}
        stats["watch"] = watch
        if tangents.mode != "first_order" and not run.setting_fns:  # else: cannot tell
            settings = set(run.setting_index.values())
            used = [
                d or u or i in settings for i, (d, u) in enumerate(zip(direct, tangents.used_h))
            ]
            unused = unused_leaves(run.hspec.paths, run.h, used)
            stats |= {"unused_hparams": unused} if unused else {}
        return Sweep(list(hyper), p, losses, value, run.steps, 0, 1, stats)


def forward_mode(
    inner_loss: Callable[..., Tensor],
    outer_loss: Callable[[Any, Any], Tensor],
    params0: Tree,
    hparams: Tree,
    steps: int,
    optimizer: FunctionalOptimizer,
    *,
    batches: Iterable[Any] | None = None,
    chunk_size: int | None = None,
    hvp: str = "auto",
    watch: bool = True,
    return_info: bool = False,
    process_group: Any = None,
) -> Any:
    """Forward-mode (RTHO) hypergradient through ``steps`` optimizer steps.

    Arguments and returns as :func:`~hypergradient.unrolled`, with ``chunk_size``, ``hvp`` and
    ``watch`` as :class:`ForwardMode`; builds a :class:`Problem` and calls :class:`ForwardMode`. No
    trajectory is stored: memory is independent of ``steps``.
    """
    method = ForwardMode(chunk_size, hvp, watch)  # settings checked before any batch is taken
    as_bool(return_info, "return_info")
    check_trees(params0, hparams, "params0")
    problem = functional_problem(
        inner_loss, outer_loss, params0, hparams, steps, optimizer, batches, process_group
    )
    return functional_result(method(problem), return_info)
