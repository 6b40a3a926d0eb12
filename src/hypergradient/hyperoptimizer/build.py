"""How the hyper-optimizer turns its constructor's arguments into collaborators, and the
bilevel :class:`~hypergradient.methods.base.Problem` it hands its method at a hyper-step.

The inner objective of that problem is the one the inner optimizer minimizes: the user's
``train_loss`` plus, for an optimizer whose ``weight_decay`` is an L2 term added to the
gradient (``torch.optim.SGD``, ``Adam``, ``RMSprop``, ...: :data:`COUPLED_DECAY`), the
penalty ``sum_i weight_decay_i / 2 * ||theta_i||^2`` of each parameter's group. Its fixed
points are the stationary points of that sum, not of ``train_loss`` alone, so implicit
methods need it (the Hessian is ``H + weight_decay I``). Trajectory methods replay the
optimizer's own update, decay included. A decoupled decay (``AdamW``) is no L2 term and
is left out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import _tree
from .._vocab import ArgumentTypeError, as_bool, as_callable, as_float, as_optional_int
from ..methods import IFT, T1T2, Method, Problem, replay_rng
from ..optim.functional import from_torch
from . import precision
from .holdout import HoldoutGuard
from .hparams import HyperParameters
from .model import ModelView
from .sampler import BatchSampler
from .step_grads import scaled_rates
from .step_rates import exact_rates, warn_inexact
from .step_share import shared_loss
from .weight_norm import warn_fused_weight_norm

if TYPE_CHECKING:  # pragma: no cover
    from .driver import HyperOptimizer

__all__ = [
    "COUPLED_DECAY",
    "LossFn",
    "check_descent",
    "check_inner",
    "coupled_decays",
    "inner_lr",
    "make_guard",
    "make_hyperparameters",
    "make_problem",
    "make_sampler",
    "step_lr",
]

LossFn = Callable[[Any, dict[str, Tensor], Any], Tensor]

_ROWS = " Pass a positive number of rows."

#: torch optimizers whose ``weight_decay`` adds ``weight_decay * theta`` to the gradient
#: (unless the group sets ``decoupled_weight_decay``, as ``AdamW`` does).
COUPLED_DECAY: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.Adamax,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.RMSprop,
    torch.optim.ASGD,
    torch.optim.NAdam,
    torch.optim.RAdam,
)


def make_sampler(data: Any, batch_size: Any, seed: int, name: str) -> BatchSampler:
    """``data`` itself if it is a :class:`BatchSampler`, else a sampler over it."""
    size_name = name.replace("_data", "_batch_size")
    size = as_optional_int(batch_size, size_name, min=1, hint=_ROWS)
    if isinstance(data, BatchSampler):
        if size is not None:
            raise ValueError(
                f"`{size_name}` would be ignored: `{name}` is a BatchSampler, which has its own "
                "batch_size; set it there."
            )
        return data
    return BatchSampler(data, size, seed, name)


def make_train_sampler(data: Any, batch_size: Any, seed: int) -> BatchSampler | None:
    """The sampler of ``train_data`` (None without it, when a batch size is refused)."""
    if data is None:
        if batch_size is not None:
            raise ValueError(
                "`train_batch_size` needs `train_data`: pass the training data that "
                "hyper-steps draw a batch from when step() gets none, or drop the batch size."
            )
        return None
    return make_sampler(data, batch_size, seed + 1, "train_data")


def check_method(
    method: Method | None, links: Mapping[str, str] | None, group: Any = None
) -> Method:
    """The method (``IFT()`` by default; ``IFT(seed=0)`` with a process ``group``: its
    step estimate's random start is then the same on ranks whose global random streams
    differ, as with per-rank dropout seeds), checked against the optimizer-setting links."""
    if method is None:
        method = IFT() if group is None else IFT(seed=0)
    if not isinstance(method, Method):
        raise ArgumentTypeError(f"`method` must be a method such as hg.IFT(), got {method!r}.")
    if type(method).__call__ is Method.__call__:  # the previous release's interface
        old = " (its compute(ctx) is the previous release's interface)"
        raise ArgumentTypeError(
            f"`method` {type(method).__name__} does not implement __call__(problem) -> "
            f"(hypergradient, hg.Info){old if hasattr(method, 'compute') else ''}: read "
            "problem.inner_loss, outer_loss, params and hparams (ctx.train_loss, val_loss, "
            "params and raw before) and return the hypergradient with an hg.Info."
        )
    if links and not method.tunes_optimizer:
        raise ValueError(
            f"{type(method).__name__} differentiates at the current parameters (T1T2: through "
            "the last step) with the inner optimizer's settings as constants (a coupled "
            "weight_decay is a fixed L2 term of the inner objective), so it cannot tune them; "
            "tune them with hg.Unrolled(), hg.ForwardMode() or hg.DrMAD(), or tune a weight "
            "decay as a penalty in train_loss (with the optimizer's weight_decay at 0)."
        )
    return method


def make_hyperparameters(
    hparams: Any, view: ModelView, inner: torch.optim.Optimizer, links: Any, method: Method
) -> HyperParameters:
    """The :class:`HyperParameters`: ``hparams`` itself if it is one (its links are the
    optimizer-setting links: ``links`` must be None or the same), else built from the dict."""
    if isinstance(hparams, HyperParameters):
        if links is not None and dict(links) != hparams.links:
            raise ValueError(
                f"optimizer_hparams={dict(links)!r} differs from the links of the given "
                f"HyperParameters ({hparams.links!r}); pass them once, to "
                "HyperParameters(links=...)."
            )
        check_method(method, hparams.links)
        return hparams
    forbidden = view.all_parameters()
    return HyperParameters(
        hparams, device=view.device, forbidden=forbidden, inner_optimizer=inner, links=links
    )


def make_guard(
    data: Any, batch_size: Any, loss: Any, val_loss: LossFn, seed: int, **options: Any
) -> HoldoutGuard | None:
    """The :class:`HoldoutGuard` over ``data`` (None without held-out data)."""
    if data is None:
        as_bool(options.get("keep_best", True), "keep_best")
        delta = as_float(options.get("min_delta", 0.0), "min_delta", min=0.0)
        if batch_size is not None or loss is not None or options.get("patience") is not None:
            delta = 1.0
        if delta:
            raise ValueError(
                "`holdout_batch_size`, `holdout_loss`, `patience` and `min_delta` need "
                "`holdout_data`: pass a held-out split (not the validation data) to score at "
                "each hyper-step."
            )
        return None
    loss = val_loss if loss is None else loss
    as_callable(loss, "holdout_loss", "(model, hparams, batch)")
    return HoldoutGuard(make_sampler(data, batch_size, seed + 2, "holdout_data"), loss, **options)


def make_problem(
    hopt: HyperOptimizer,
    train_batch: Any,
    val_batch: Any,
    before: list[Tensor],
    saved: Any = None,
) -> Problem:
    """The bilevel problem at a hyper-step (with the recorded window for trajectory methods;
    ``saved``: the step's :class:`~.transaction.Transaction`, whose optimizer state and
    weights before the step give T1T2's exact rates: :func:`inner_lr`)."""
    view, hp, window = hopt.view, hopt.hyperparameters, hopt.loop.window
    params = view.detached()
    trajectory = None
    amp = precision.replayed(hopt.loop.step_amp)  # as trained (:mod:`.precision`)
    if window is not None:
        step_loss = view.functional(hopt.train_loss_fn, hp.transform)
        step_loss = with_held_grads(precision.in_state(step_loss, amp, view.device), window)
        rounding = precision.unreplayed_rounding(hopt.loop.step_amp)
        trajectory = window.to_trajectory(view, step_loss, hp.setting_fns(), params, rounding)
    inner_loss = view.at_batch(hopt.train_loss_fn, hp.transform, train_batch)
    if isinstance(hopt.method, T1T2) and hopt.loop.step_rng is not None:
        inner_loss = replayed(inner_loss, hopt.loop.step_rng, view.device)
    inner_loss = shared_loss(hopt, inner_loss)  # T1T2: the step-gradient check's replay
    decays = coupled_decays(hopt.inner_optimizer, view.params)
    if decays is not None:
        inner_loss = with_decay(inner_loss, decays)
    return Problem(
        inner_loss=inner_loss,
        outer_loss=view.at_batch(hopt.val_loss_fn, hp.transform, val_batch),
        params=params,
        hparams=hp.detached_raw(),
        lr=scaled_rates(
            step_lr(hopt, saved),
            hopt.loop.grad_scale,  # T1T2: a step on c * grad (:mod:`.draws`)
        ),
        prev_params=view.tree(before),
        trajectory=trajectory,
        process_group=hopt.process_group,
    )


def step_lr(hopt: HyperOptimizer, saved: Any = None) -> Any:
    """``Problem.lr`` of the step ``saved`` (its :class:`~.transaction.Transaction`, or
    None) took: :func:`inner_lr`, computed once per transaction (kept in ``saved.lr``:
    nothing it reads changes during a hyper-step)."""
    lr = getattr(saved, "lr", None)
    if lr is None:
        lr = inner_lr(hopt.inner_optimizer, hopt.view.params, hopt.method, hopt.loop.lrs, saved)
        if saved is not None:
            saved.lr = lr
    return lr


def check_inner(
    optimizer: torch.optim.Optimizer, view: ModelView, method: Method, tuned: Iterable[str]
) -> None:
    """Refuse, at construction, an inner optimizer the method cannot differentiate: one
    without a functional twin (trajectory methods; ``tuned``: the settings linked to
    hyperparameters), one with buffers for ``DrMAD(replay=False)``, or one that ascends
    (``maximize=True``); then warn about a weight
    norm whose second derivatives torch gets wrong (:mod:`.weight_norm`)."""
    check_descent(optimizer)
    if method.needs_trajectory:
        twin = from_torch(optimizer, view.params, tuned=tuple(tuned))[0]
        if getattr(method, "replay", True) is False and twin.buffers:
            raise ValueError(
                "DrMAD(replay=False) reverses from the model's weights and needs a stateless "
                f"inner optimizer (plain SGD, no momentum); this {type(optimizer).__name__} "
                "keeps buffers (momentum, moments). Use hg.DrMAD() (replay=True)."
            )
    warn_fused_weight_norm(view.module, method)
    if isinstance(method, T1T2):
        warn_inexact(optimizer)


def check_descent(optimizer: torch.optim.Optimizer) -> None:
    """Refuse ``maximize=True``: every method differentiates descent on ``train_loss`` (T1T2
    applied the hypergradient of the opposite step: the opposite sign, silently)."""
    for i, g in enumerate(optimizer.param_groups):
        if g.get("maximize", False):
            raise ValueError(
                f"inner_optimizer.param_groups[{i}]['maximize'] is True: the methods "
                "differentiate a descent on train_loss. Return the negated objective from "
                "train_loss and build the optimizer with maximize=False."
            )


def tuned(hopt: HyperOptimizer) -> tuple[str, ...]:
    """The inner optimizer's settings linked to hyperparameters (``optimizer_hparams``)."""
    return tuple(hopt.hyperparameters.links)


def inner_lr(
    optimizer: torch.optim.Optimizer,
    params: list[Tensor],
    method: Method,
    lrs: tuple[float, ...] | None = None,
    before: Any = None,
) -> float | tuple[float | Tensor, ...]:
    """``Problem.lr``: the learning rate of the param groups that hold trained parameters;
    ``lrs``: the groups' rates the step used, if they may have moved on since
    (``begin_step``). Where the groups' rates differ: for
    :class:`~hypergradient.methods.T1T2`, one rate per trained parameter (its group's: T1T2
    differentiates the step ``theta - Lambda grad``); for the other methods the smallest
    positive one (IFT's default Neumann caps its step there; a group at ``lr=0`` is frozen).
    0 when every group's rate is 0. For T1T2, ``before`` (the step's
    :class:`~.transaction.Transaction`: the inner optimizer's ``state_dict()`` and the
    weights before the step) gives the exact ``-d theta' / d g`` of the step taken
    (:mod:`.step_rates`): SGD's ``lr * k`` per parameter (momentum's factor), Adam's and
    AdamW's per-entry rates.
    """
    check_descent(optimizer)
    groups, rates = optimizer.param_groups, _rates(optimizer, lrs)
    exact = _exact(optimizer, params, method, rates, before)
    if exact is not None:
        return exact
    if len(groups) == 1:
        return rates[0]
    ids = {id(p) for p in params}
    held = [r for r, g in zip(rates, groups) if any(id(p) in ids for p in g["params"])]
    distinct = sorted(set(held))
    if len(distinct) > 1 and isinstance(method, T1T2) and any(held):
        return _per_parameter(groups, rates, params)
    positive = [r for r in distinct if r > 0]
    return positive[0] if positive else distinct[0] if distinct else rates[0]


def _exact(
    optimizer: torch.optim.Optimizer, params: list[Tensor], method: Method, rates: list, saved: Any
) -> Any:
    """T1T2's exact rates of the step from ``saved`` (:func:`.step_rates.exact_rates`), or
    None (another method, no transaction, or the learning rates are exact)."""
    if not isinstance(method, T1T2) or saved is None:
        return None
    per = _per_parameter(optimizer.param_groups, rates, params)
    return exact_rates(optimizer, params, per, saved)


def _per_parameter(groups: list[dict], rates: list[float], params: list[Tensor]) -> tuple:
    """Each trained parameter's group rate, in the trained parameters' order."""
    by_id = {id(p): r for r, g in zip(rates, groups) for p in g["params"]}
    return tuple(by_id[id(p)] for p in params)


def _rates(optimizer: torch.optim.Optimizer, lrs: tuple[float, ...] | None) -> list[float]:
    """The param groups' rates: ``lrs`` (those the step used) when it has one per group."""
    groups = optimizer.param_groups
    raw = list(lrs) if lrs is not None and len(lrs) == len(groups) else [g["lr"] for g in groups]
    name = "inner_optimizer.param_groups[{}]['lr']"
    return [as_float(r, name.format(i), min=0.0) for i, r in enumerate(raw)]


def coupled_decays(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> list[float] | None:
    """Per trained parameter, the L2 coefficient the inner optimizer adds to its gradient
    (its group's ``weight_decay`` for a :data:`COUPLED_DECAY` optimizer; 0 for a decoupled
    decay); None when all are 0 or the optimizer is not one of those."""
    if not isinstance(optimizer, COUPLED_DECAY):
        return None
    by_id: dict[int, float] = {}
    for group in optimizer.param_groups:
        decay = 0.0 if group.get("decoupled_weight_decay", False) else group.get("weight_decay")
        for p in group["params"]:
            by_id[id(p)] = float(decay or 0.0)
    decays = [by_id.get(id(p), 0.0) for p in params]
    return decays if any(decays) else None


def replayed(
    loss: Callable[[Any, Any], Tensor], state: Any, device: torch.device
) -> Callable[[Any, Any], Tensor]:
    """``loss`` evaluated under the random-number ``state`` (the step's dropout masks)."""

    def f(params: Any, raw: Any) -> Tensor:
        with replay_rng(state, device):
            return loss(params, raw)

    return f


def with_decay(
    loss: Callable[[Any, Any], Tensor], decays: list[float]
) -> Callable[[Any, Any], Tensor]:
    """``f(params, raw) = loss(params, raw) + sum_i decays[i] / 2 * ||params_i||^2`` (the
    leaves in the trained parameters' order)."""

    def f(params: Any, raw: Any) -> Tensor:
        out = loss(params, raw)
        for d, p in zip(decays, _tree.flatten(params, "params")[0]):
            if d:
                out = out + 0.5 * d * p.pow(2).sum()
        return out

    f.__wrapped__ = loss  # type: ignore[attr-defined]  # (T1T2 finds a shared replay)
    return f


def with_held_grads(loss: Callable[[Any, Any, Any], Tensor], window: Any) -> Callable:
    """``loss`` plus ``0 * sum(theta_i)`` for each trained parameter that held an all-zero
    ``.grad`` after a step of the ``window`` (:meth:`~.window.TrajectoryWindow.held`):
    where the step's loss does not use it, autograd's gradient is then 0 instead of None,
    and the replay steps it as torch did on the zeros ``zero_grad(set_to_none=False)``
    left (an SGD momentum run's replay ended 0.5 away and every hyper-step was skipped).
    Other runs get ``loss`` itself (the terms cost 10-30% of a replay on small models)."""
    held = window.held() or []
    if not any(held):
        return loss

    def f(params: Any, raw: Any, batch: Any) -> Tensor:
        out = loss(params, raw, batch)
        leaves = _tree.flatten(params, "params")[0]
        zero = sum((p * 0).sum() for p, h in zip(leaves, held) if h)  # a dense gradient
        return out + zero.to(out.dtype) if isinstance(zero, Tensor) else out

    return f
