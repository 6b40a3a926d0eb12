"""Trajectory hypergradients: differentiate through (or along) the inner training run.

The inner run is ``T`` steps of a differentiable optimizer (:mod:`hypergradient.optim`)

    s_{t+1} = Phi_t(s_t, phi),    s_t = (theta_t, optimizer state_t),
    Phi_t: theta <- update(theta, grad_theta f(theta, phi; batch_t), state, settings(phi))

and the hypergradient is that of ``g(theta_T, phi)``. Three ways to get it:

- :func:`unrolled` (reverse mode): ``a_T = dg/ds_T``, then
  ``a_t = a_{t+1} dPhi_t/ds_t`` and ``dg/dphi = d_phi g + sum_t a_{t+1} dPhi_t/dphi``.
  Exact. ``truncate=K`` keeps only the last K terms (Shaban et al., 2019, "Truncated
  Back-propagation for Bilevel Optimization", AISTATS).
- :func:`forward_mode`: propagate ``Z_t = ds_t/dphi`` forward,
  ``Z_{t+1} = dPhi_t/ds_t Z_t + dPhi_t/dphi`` with ``torch.func.jvp``, one tangent per
  hyperparameter (Franceschi et al., 2017, "Forward and Reverse Gradient-Based
  Hyperparameter Optimization", ICML: RTHO). Memory independent of ``T``.
- :func:`drmad`: the reverse recursion evaluated on the straight line
  ``s_t ~ (1 - t/T) s_0 + (t/T) s_T`` instead of the stored trajectory (Fu et al., 2016,
  "DrMAD: Distilling Reverse-Mode Automatic Differentiation for Optimizing
  Hyperparameters of Deep Neural Networks", IJCAI). O(P) memory.

Each reverse step recomputes ``Phi_t`` from the stored state under ``torch.func.vjp``, so
what is stored is states (``P`` numbers plus optimizer buffers per step), never autograd
graphs. The random-number state is saved per step and restored on recomputation, so
dropout and random augmentation inside ``inner_loss`` see the same draws.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import _tree
from ._tree import Tree
from .distributed import all_reduce_mean, check_consistent
from .implicit import HypergradientWarning, NonFiniteHypergradientError
from .operators import _check_scalar
from .optim.functional import FunctionalOptimizer
from .solvers import _positive_int

__all__ = ["TrajectoryInfo", "unrolled", "forward_mode", "drmad"]


@dataclass
class TrajectoryInfo:
    """Diagnostics of a trajectory hypergradient.

    Attributes:
        method: "unrolled", "forward_mode" or "drmad".
        steps: inner steps run.
        reverse_steps: steps the hypergradient differentiates through (``truncate``).
        recomputed_steps: forward steps recomputed by checkpointing.
        stored_states: peak number of inner states kept in memory at once.
        seconds: wall time.
        params: the final parameters ``theta_T`` (detached), with the structure of
            ``params0``: the trained model.
        inner_losses: inner loss at each step (before the update).
        outer_loss: ``g(theta_T, phi)``.
    """

    method: str
    steps: int
    reverse_steps: int
    recomputed_steps: int
    stored_states: int
    seconds: float
    params: Any = field(repr=False)
    inner_losses: list[float] = field(repr=False)
    outer_loss: float = float("nan")


class _RNG:
    """Save and restore the random-number state of the CPU and of one CUDA or MPS device."""

    def __init__(self, device: torch.device):
        self.device = device
        # The accelerator whose generator random ops on `device` draw from (None: CPU only).
        self.accel = device.type if device.type in ("cuda", "mps") else None

    def _get_accel(self) -> Tensor:
        if self.accel == "cuda":
            return torch.cuda.get_rng_state(self.device)
        return torch.mps.get_rng_state()

    def _set_accel(self, state: Tensor) -> None:
        if self.accel == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.mps.set_rng_state(state)

    def get(self) -> tuple[Tensor, Tensor | None]:
        return torch.get_rng_state(), None if self.accel is None else self._get_accel()

    @contextlib.contextmanager
    def replay(self, state: tuple[Tensor, Tensor | None]):
        devices = [self.device] if self.accel == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # restores the CPU (and CUDA) state
            saved = self._get_accel() if self.accel == "mps" else None
            torch.set_rng_state(state[0])
            if state[1] is not None:
                self._set_accel(state[1])
            try:
                yield
            finally:
                if saved is not None:
                    self._set_accel(saved)


@dataclass
class _Resume:
    """Start a run mid-training (used by the hyper-optimizer's trajectory methods).

    ``state0``: optimizer state at the start; ``step0``: the optimizer's step count there;
    ``settings``: optimizer settings computed from the hyperparameters (a tree).
    """

    state0: tuple[Tensor, ...] | None = None
    step0: int = 0
    settings: dict[str, Callable[[Any], Tensor]] = field(default_factory=dict)


class _Run:
    """The inner training run: validated inputs and the pure step function ``Phi_t``."""

    def __init__(
        self,
        inner_loss: Callable[..., Tensor],
        params0: Tree,
        hparams: Tree,
        steps: int,
        optimizer: FunctionalOptimizer,
        batches: Iterable[Any] | None,
        resume: _Resume | None = None,
        outer_loss: Any = None,
        group: Any = None,
    ):
        for name, fn in (("inner_loss", inner_loss), ("outer_loss", outer_loss)):
            if not callable(fn):
                raise TypeError(f"`{name}` must be callable, got {type(fn).__name__}.")
        if not isinstance(optimizer, FunctionalOptimizer):
            raise TypeError(
                "`optimizer` must be a differentiable optimizer from hypergradient.optim "
                f"(hg.optim.sgd(...), hg.optim.adam(...)), got {type(optimizer).__name__}."
            )
        self.steps = _positive_int(steps, "steps")
        p_leaves, self.pspec = _tree.flatten(params0, "params0")
        _tree.check_leaves(p_leaves, self.pspec, "params0")
        h_leaves, self.hspec = _tree.flatten(hparams, "hparams")
        _tree.check_leaves(h_leaves, self.hspec, "hparams")
        if h_leaves[0].device != p_leaves[0].device:
            raise ValueError(
                f"`hparams` is on {h_leaves[0].device} and `params0` on {p_leaves[0].device}; "
                "put them on one device."
            )
        shared = {id(t) for t in p_leaves} & {id(t) for t in h_leaves}
        if shared:
            path = next(p for t, p in zip(h_leaves, self.hspec.paths) if id(t) in shared)
            raise ValueError(
                f"{path} of `hparams` is also a leaf of `params0`. The initial parameters are "
                "a constant of the run, so their hypergradient would silently be zero. To "
                "learn an initialization, train an offset: params0 = zeros and "
                "inner_loss(init + delta, ...) with `init` in hparams (hg.meta.MAML does this)."
            )
        self.device = p_leaves[0].device
        self.p0 = tuple(t.detach().clone() for t in p_leaves)
        self.h = tuple(t.detach().clone() for t in h_leaves)
        self.group = group
        if group is not None:
            from .distributed import _group_size

            _group_size(group)
            check_consistent(list(self.h), group, "`hparams`", (list(self.p0), "`params0`"))
        self.resume = resume
        # Optimizer settings given as tensors that are hparams leaves are differentiated.
        self.setting_index: dict[str, int] = {}
        self.setting_fns = {} if resume is None else dict(resume.settings)
        for name, value in optimizer.tensor_settings().items():
            if name in self.setting_fns:
                continue
            for i, leaf in enumerate(h_leaves):
                if value is leaf:
                    self.setting_index[name] = i
            if name not in self.setting_index:
                warnings.warn(
                    f"The optimizer's `{name}` is a tensor that is not one of the leaves of "
                    "`hparams`, so it is treated as a constant. To tune it, pass the very "
                    "tensor that is in `hparams` (not an expression of it).",
                    HypergradientWarning,
                    stacklevel=3,
                )
        self.optimizer = optimizer
        self.inner_loss = inner_loss
        self.batches: list[Any] | None = None
        if batches is not None:
            if not isinstance(batches, Iterable):
                raise TypeError("`batches` must be a sequence or an iterable of batches.")
            it: Iterator[Any] = iter(batches)
            self.batches = list(itertools.islice(it, self.steps))
            if len(self.batches) < self.steps:
                raise ValueError(
                    f"`batches` ran out after {len(self.batches)} of steps={self.steps} batches; "
                    "pass at least `steps` batches (e.g. itertools.cycle(loader))."
                )
        self.rng = _RNG(self.device)
        # Check the loss once, outside any transform, for a clear error message, without
        # consuming random numbers (the run must draw exactly what a plain loop draws).
        with self.rng.replay(self.rng.get()), torch.no_grad():
            _check_scalar(self._call(self.p0, self.h, 0), "inner_loss")

    def _call(self, p: tuple[Tensor, ...], h: tuple[Tensor, ...], t: int) -> Tensor:
        pt = _tree.unflatten(self.pspec, p)
        ht = _tree.unflatten(self.hspec, h)
        if self.batches is None:
            return self.inner_loss(pt, ht)
        return self.inner_loss(pt, ht, self.batches[t])

    def init_state(self) -> tuple[Tensor, ...]:
        if self.resume is not None and self.resume.state0 is not None:
            return tuple(t.detach() for t in self.resume.state0)
        return tuple(self.optimizer.init(list(self.p0)))

    # The step Phi_t = update(theta, mean_r grad f_r(theta), state): its gradient part is
    # local to each rank's shard and is averaged by ``reduce``; the update part is the same
    # on every rank. Differentiating them separately lets the average sit between them.
    def grad(self, p: tuple[Tensor, ...], h: tuple[Tensor, ...], t: int):
        """Local ``grad_theta f(theta, phi; batch_t)`` and the loss."""
        return torch.func.grad_and_value(lambda q: self._call(q, h, t))(p)

    def update(
        self,
        p: tuple[Tensor, ...],
        s: tuple[Tensor, ...],
        g: tuple[Tensor, ...],
        h: tuple[Tensor, ...],
        t: int,
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        settings = {name: h[i] for name, i in self.setting_index.items()}
        if self.setting_fns:
            tree = _tree.unflatten(self.hspec, h)
            settings.update({name: fn(tree) for name, fn in self.setting_fns.items()})
        step0 = 0 if self.resume is None else self.resume.step0
        new_p, new_s = self.optimizer.update(list(p), list(g), list(s), step0 + t, settings)
        return tuple(new_p), tuple(new_s)

    def reduce(self, tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Average over the ranks (one all-reduce for the whole tuple); identity alone."""
        if self.group is None or not tensors:
            return tensors
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        all_reduce_mean(flat, self.group)
        out, i = [], 0
        for t in tensors:
            out.append(flat[i : i + t.numel()].reshape(t.shape).to(t.dtype))
            i += t.numel()
        return tuple(out)

    def step(
        self, p: tuple[Tensor, ...], s: tuple[Tensor, ...], h: tuple[Tensor, ...], t: int
    ) -> tuple[tuple[tuple[Tensor, ...], tuple[Tensor, ...]], Tensor]:
        """``Phi_t`` without derivatives. Returns ``((params, state), loss)``."""
        g, loss = self.grad(p, h, t)
        *g, loss = self.reduce((*g, loss.reshape(1)))
        return self.update(p, s, tuple(g), h, t), loss.reshape(())

    def step_vjp(
        self,
        p: tuple[Tensor, ...],
        s: tuple[Tensor, ...],
        t: int,
        adj: tuple[tuple[Tensor, ...], tuple[Tensor, ...]],
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Cotangents of ``(theta_t, state_t, phi)`` given the cotangent of step t's output."""
        g_local, vjp_grad, _ = torch.func.vjp(
            lambda pp, hh: self.grad(pp, hh, t), p, self.h, has_aux=True
        )
        g = self.reduce(g_local)
        _, vjp_update = torch.func.vjp(
            lambda pp, ss, gg, hh: self.update(pp, ss, gg, hh, t), p, s, g, self.h
        )
        dp_u, ds, dg, dh_u = vjp_update(adj)
        dp_g, dh_g = vjp_grad(dg)
        n = len(dp_g)
        both = self.reduce(tuple(dp_g) + tuple(dh_g))  # the transpose of an average
        dp = tuple(a + b for a, b in zip(dp_u, both[:n]))
        dh = tuple(a + b for a, b in zip(dh_u, both[n:]))
        return dp, ds, dh

    def outer_grads(
        self, outer_loss: Callable[[Any, Any], Tensor], p: tuple[Tensor, ...]
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], float]:
        def g(pp, hh):
            value = outer_loss(_tree.unflatten(self.pspec, pp), _tree.unflatten(self.hspec, hh))
            return _check_scalar(value, "outer_loss")

        (gp, gh), value = torch.func.grad_and_value(g, argnums=(0, 1))(p, self.h)
        *both, value = self.reduce((*gp, *gh, value.reshape(1)))
        return tuple(both[: len(gp)]), tuple(both[len(gp) :]), float(value)

    def result(self, flat: tuple[Tensor, ...]) -> Tree:
        for leaf, path in zip(flat, self.hspec.paths):
            if not bool(torch.isfinite(leaf).all()):
                raise NonFiniteHypergradientError(
                    f"The hypergradient of {path} is not finite (NaN or Inf): the inner run "
                    "diverged or its derivative overflowed. Lower the learning rate or the "
                    "number of steps, or check inner_loss."
                )
        return _tree.unflatten(self.hspec, [t.detach() for t in flat])


def _forward(
    run: _Run, keep_state: Callable[[int], bool], first: int
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], dict[int, Any], list[Any], list[Tensor]]:
    """Run the ``T`` steps without graphs.

    Keeps the states ``keep_state(t)`` asks for, and the random-number state before every
    step from ``first`` on (a few kB each), so that any step can be replayed exactly.
    """
    p, s = run.p0, run.init_state()
    kept: dict[int, Any] = {}
    rngs: list[Any] = [None] * run.steps
    losses = []
    with torch.no_grad():
        for t in range(run.steps):
            if t >= first:
                rngs[t] = run.rng.get()
            if keep_state(t):
                kept[t] = (p, s)
            (p, s), loss = run.step(p, s, run.h, t)
            losses.append(loss.detach())
    return p, s, kept, rngs, losses


def _reverse(
    run: _Run,
    outer_loss: Callable[[Any, Any], Tensor],
    p_T: tuple[Tensor, ...],
    s_T: tuple[Tensor, ...],
    state_at: Callable[[int], tuple[tuple[Tensor, ...], tuple[Tensor, ...], Any]],
    first: int,
) -> tuple[list[Tensor], float]:
    """Adjoint recursion from step ``T-1`` down to ``first``."""
    gp, gh, value = run.outer_grads(outer_loss, p_T)
    adj = (gp, tuple(torch.zeros_like(x) for x in s_T))
    hyper = [x.clone() for x in gh]
    for t in range(run.steps - 1, first - 1, -1):
        p, s, rng_state = state_at(t)
        ctx = run.rng.replay(rng_state) if rng_state is not None else contextlib.nullcontext()
        with ctx:
            dp, ds, dh = run.step_vjp(p, s, t, adj)
        adj = (dp, ds)
        for acc, d in zip(hyper, dh):
            acc.add_(d)
    return hyper, value


def _finish(
    run: _Run,
    method: str,
    hyper: list[Tensor],
    p_T: tuple[Tensor, ...],
    losses: list[Tensor],
    value: float,
    started: float,
    reverse_steps: int,
    recomputed: int,
    stored: int,
    return_info: bool,
) -> Any:
    result = run.result(tuple(hyper))
    if not return_info:
        return result
    info = TrajectoryInfo(
        method=method,
        steps=run.steps,
        reverse_steps=reverse_steps,
        recomputed_steps=recomputed,
        stored_states=stored,
        seconds=time.perf_counter() - started,
        params=_tree.unflatten(run.pspec, [t.detach() for t in p_T]),
        inner_losses=torch.stack(losses).tolist() if losses else [],
        outer_loss=value,
    )
    return result, info


def unrolled(
    inner_loss: Callable[..., Tensor],
    outer_loss: Callable[[Any, Any], Tensor],
    params0: Tree,
    hparams: Tree,
    steps: int,
    optimizer: FunctionalOptimizer,
    *,
    truncate: int | None = None,
    batches: Iterable[Any] | None = None,
    checkpoint_every: int | None = None,
    return_info: bool = False,
    process_group: Any = None,
    _resume: _Resume | None = None,
) -> Any:
    """Reverse-mode hypergradient through ``steps`` optimizer steps (exact, or truncated).

    Runs ``theta_{t+1} = update(theta_t, grad f(theta_t, phi; batch_t))`` from ``params0``
    with the differentiable ``optimizer`` and returns ``d g(theta_T, phi) / d phi``,
    including the dependence through optimizer settings that are ``hparams`` leaves
    (learning rate, momentum, betas, weight decay).

    Args:
        inner_loss: ``f(params, hparams)``, or ``f(params, hparams, batch)`` when
            ``batches`` is given. Must be compatible with ``torch.func`` (no in-place
            updates of inputs; use ``torch.func.functional_call`` for modules).
        outer_loss: ``g(params, hparams)`` evaluated at ``theta_T``.
        params0: initial parameters (tree); not modified.
        hparams: hyperparameters (tree); optimizer settings that are these very tensors
            receive hypergradients.
        steps: ``T``.
        optimizer: ``hg.optim.sgd(...)`` or ``hg.optim.adam(...)``.
        truncate: ``K``: differentiate only through the last ``K`` steps (Shaban et al.,
            2019); ``K = T`` is the full hypergradient.
        batches: a sequence or iterable of at least ``T`` batches (one per step).
        checkpoint_every: keep one state every ``c`` steps and recompute the others during
            the reverse pass.
        return_info: also return a :class:`TrajectoryInfo` (with the trained ``params``).
        process_group: a ``torch.distributed`` group for data-parallel training: each rank
            passes its own shard's losses (means over equal-sized shards) and batches; every
            step uses the gradient averaged over the ranks (as ``DistributedDataParallel``
            does), and the hypergradient, identical on every rank, is that of the averaged
            run. Two all-reduces per differentiated step (one per forward step).

    Memory: ``K`` stored states (``P`` parameters plus optimizer buffers each, e.g. 2P for
    momentum SGD, 3P for Adam) and the ``K`` batches; with ``checkpoint_every=c``, about
    ``K / c + c`` states (``c ~ sqrt(K)`` minimizes it) at the price of recomputing
    ``K - K/c`` forward steps. Never more than one step's autograd graph at a time.

    Cost: ``T`` gradient steps forward, then per differentiated step one recomputation
    under ``torch.func.vjp`` (about 3-4 gradients).
    """
    started = time.perf_counter()
    run = _Run(
        inner_loss, params0, hparams, steps, optimizer, batches, _resume, outer_loss, process_group
    )
    T = run.steps
    K = T if truncate is None else _positive_int(truncate, "truncate")
    if K > T:
        raise ValueError(f"`truncate` ({K}) cannot exceed `steps` ({T}).")
    first = T - K
    c = T if checkpoint_every is None else _positive_int(checkpoint_every, "checkpoint_every")
    full = checkpoint_every is None
    p_T, s_T, kept, rngs, losses = _forward(
        run, lambda t: t >= first and (full or (t - first) % c == 0), first
    )
    segment: dict[int, Any] = {}
    counters = {"recomputed": 0, "peak": len(kept)}

    def state_at(t: int) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], Any]:
        if full:
            p, s = kept.pop(t)
            return p, s, rngs[t]
        if t not in segment:  # rebuild the segment that ends at t from its checkpoint
            start = first + ((t - first) // c) * c
            p, s = kept.pop(start)
            segment[start] = (p, s)
            with torch.no_grad():
                for u in range(start, t):
                    with run.rng.replay(rngs[u]):
                        (p, s), _ = run.step(p, s, run.h, u)
                    segment[u + 1] = (p, s)
                    counters["recomputed"] += 1
            counters["peak"] = max(counters["peak"], len(kept) + len(segment))
        p, s = segment.pop(t)
        return p, s, rngs[t]

    hyper, value = _reverse(run, outer_loss, p_T, s_T, state_at, first)
    return _finish(
        run,
        "unrolled",
        hyper,
        p_T,
        losses,
        value,
        started,
        K,
        counters["recomputed"],
        counters["peak"],
        return_info,
    )


def drmad(
    inner_loss: Callable[..., Tensor],
    outer_loss: Callable[[Any, Any], Tensor],
    params0: Tree,
    hparams: Tree,
    steps: int,
    optimizer: FunctionalOptimizer,
    *,
    batches: Iterable[Any] | None = None,
    return_info: bool = False,
    process_group: Any = None,
    _resume: _Resume | None = None,
) -> Any:
    """DrMAD: reverse mode along the straight line from ``s_0`` to ``s_T`` (O(P) memory).

    Fu et al. (2016). Only the initial and final states are kept; the reverse recursion of
    :func:`unrolled` is evaluated at ``s_t ~ (1 - t/T) s_0 + (t/T) s_T`` (parameters and
    optimizer buffers alike). An approximation: exact when the reverse recursion does not
    depend on the states, i.e. SGD (with or without momentum, fixed settings) on an ``f``
    quadratic in ``theta`` whose mixed derivative ``d_phi grad_theta f`` is constant (as
    in benchopt's quadratic bilevel problem); otherwise, e.g. for weight decay, whose mixed
    derivative is ``theta`` itself, exact only if the trajectory is a straight line. It
    points the right way (positive cosine with :func:`unrolled`) when the run moves
    steadily toward the minimum. Arguments as :func:`unrolled`. Cost as :func:`unrolled` without
    truncation; memory: two states and the ``T`` batches.
    """
    started = time.perf_counter()
    run = _Run(
        inner_loss, params0, hparams, steps, optimizer, batches, _resume, outer_loss, process_group
    )
    T = run.steps
    p_T, s_T, _, rngs, losses = _forward(run, lambda t: False, 0)
    s_0 = run.init_state()

    def state_at(t: int) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], Any]:
        beta = t / T
        p = tuple((1 - beta) * a + beta * b for a, b in zip(run.p0, p_T))
        s = tuple((1 - beta) * a + beta * b for a, b in zip(s_0, s_T))
        return p, s, rngs[t]

    hyper, value = _reverse(run, outer_loss, p_T, s_T, state_at, 0)
    return _finish(run, "drmad", hyper, p_T, losses, value, started, T, 0, 2, return_info)


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
    return_info: bool = False,
    process_group: Any = None,
    _resume: _Resume | None = None,
) -> Any:
    """Forward-mode (RTHO) hypergradient: tangents of the trajectory, one per hyperparameter.

    Franceschi et al. (2017). Propagates ``Z_t = d s_t / d phi`` alongside the run with
    ``torch.func.jvp`` (vmapped over the ``m`` hyperparameter directions, ``chunk_size``
    at a time) and returns ``d_phi g + (d theta_T / d phi)^T grad_theta g``. Equal to
    :func:`unrolled` up to rounding.

    Memory: ``m`` tangents of the state (``m x`` (P + buffers)), independent of ``T``: no
    trajectory is stored, and the batches are consumed as they come. Cost per step: one
    jvp of an optimizer step per hyperparameter (about 3 gradients each), so it suits few
    hyperparameters (learning rates, momentum, a handful of loss weights).
    Arguments as :func:`unrolled`.
    """
    started = time.perf_counter()
    run = _Run(
        inner_loss, params0, hparams, steps, optimizer, batches, _resume, outer_loss, process_group
    )
    if chunk_size is not None:
        _positive_int(chunk_size, "chunk_size")
    m = run.hspec.size
    dtype = _tree.common_dtype(list(run.h))
    eye = torch.eye(m, dtype=dtype, device=run.device)
    th = tuple(
        x.to(h.dtype) for x, h in zip(_tree.split(eye, run.hspec), run.h)
    )  # (m, *leaf) tangents of phi
    p, s = run.p0, run.init_state()
    tp = tuple(torch.zeros((m, *x.shape), dtype=x.dtype, device=x.device) for x in p)
    ts = tuple(torch.zeros((m, *x.shape), dtype=x.dtype, device=x.device) for x in s)
    losses = []
    vmap = functools.partial(torch.func.vmap, randomness="same", chunk_size=chunk_size)
    for t in range(run.steps):
        rng_state = run.rng.get()
        with torch.no_grad():  # the primal gradient draws from (and advances) the global RNG
            g_local, loss = run.grad(p, run.h, t)
            *g, loss = run.reduce((*g_local, loss.reshape(1)))
            g = tuple(g)

        def grad_t(pp, hh, t=t):
            return run.grad(pp, hh, t)[0]

        def update_t(pp, ss, gg, hh, t=t):
            return run.update(pp, ss, gg, hh, t)

        def push_grad(dp, dh, p=p, grad_t=grad_t):
            return torch.func.jvp(grad_t, (p, run.h), (dp, dh))[1]

        def push_update(dp, ds, dg, dh, p=p, s=s, g=g, update_t=update_t):
            return torch.func.jvp(update_t, (p, s, g, run.h), (dp, ds, dg, dh))[1]

        with run.rng.replay(rng_state):
            tg = run.reduce(vmap(push_grad)(tp, th))  # tangents of the averaged gradient
        tp, ts = vmap(push_update)(tp, ts, tg, th)
        with torch.no_grad():
            p, s = run.update(p, s, g, run.h, t)
        losses.append(loss.detach().reshape(()))
    gp, gh, value = run.outer_grads(outer_loss, p)
    total = torch.zeros(m, dtype=dtype, device=run.device)
    for z, g in zip(tp, gp):
        total = total + z.reshape(m, -1).to(dtype) @ g.reshape(-1).to(dtype)
    direct = _tree.cat(list(gh), run.hspec, dtype, run.device)
    flat = direct + total
    hyper = _tree.split(flat, run.hspec, [h.dtype for h in run.h])
    return _finish(
        run, "forward_mode", list(hyper), p, losses, value, started, run.steps, 0, 1, return_info
    )
