"""Differentiable functional optimizers for trajectory hypergradients.

An optimizer here is a pair of pure functions, ``init(params) -> state`` and
``update(params, grads, state, step, settings) -> (params, state)``, on lists of tensors.
Nothing is updated in place, so the inner training loop can be differentiated by reverse
mode (``hg.unrolled``, ``hg.drmad``) or forward mode (``hg.forward_mode``).

Any setting (learning rate, momentum, betas, weight decay) may be a tensor that is also a
leaf of the ``hparams`` passed to the trajectory method; it then receives a hypergradient.
This is how learning rates and momentum are tuned.

The update rules are those of ``torch.optim.SGD`` and ``torch.optim.Adam`` (tested against
them step by step).

Settings are validated through :mod:`hypergradient._vocab` when the optimizer is built: a
number (Python or numpy scalar; stored as a Python float) or a floating-point scalar tensor
(kept as it is), finite and in range; ``bool`` is refused where a number is meant
(``ArgumentTypeError``, both a ``TypeError`` and a ``ValueError``), and ``nesterov`` must
be a ``bool``; settings given to ``update`` are checked alike (tensors by shape and dtype
only: their values are not read).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .._vocab import ArgumentTypeError, as_bool, as_float
from .checks import check_settings, check_update

__all__ = ["FunctionalOptimizer", "SGD", "Adam", "sgd", "adam", "from_torch", "zeros_or_copy"]

Setting = float | Tensor


def _check_setting(value: Any, name: str, low: float, high: float | None = None) -> Setting:
    """A setting in ``[low, high)``: a number (returned as a float) or a scalar tensor.

    A tensor is returned as it is (it may be a hyperparameter that receives a
    hypergradient); numbers go through :func:`~hypergradient._vocab.as_float`, so numpy
    scalars are accepted and ``bool`` is refused.
    """
    if isinstance(value, Tensor) and not (value.numel() == 1 and value.is_floating_point()):
        raise ArgumentTypeError(
            f"`{name}` as a tensor must be a floating-point scalar, got shape "
            f"{tuple(value.shape)} and dtype {value.dtype}."
        )
    v = as_float(value, name, min=low, max=high, open_max=high is not None)
    return value if isinstance(value, Tensor) else v


def _check_betas(betas: Any) -> tuple[Any, Any]:
    if isinstance(betas, (str, bytes)) or not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ArgumentTypeError(f"`betas` must be a pair (beta1, beta2), got {betas!r:.80}.")
    return betas[0], betas[1]


class FunctionalOptimizer:
    """Base class: ``settings`` maps names to floats or scalar tensors; ``offsets``, if
    not None, each parameter's own step count minus the step count a replay starts from
    (:func:`from_torch` of an optimizer whose parameters took different numbers of steps)."""

    settings: dict[str, Setting]
    #: state tensors per parameter (momentum buffers, Adam's moments)
    buffers: int = 0
    offsets: list[int] | None = None
    #: per param group after the first, its settings that differ (``from_torch``); and per
    #: parameter, its group (None: one group) and its shape
    groups: list[dict[str, float]] = []
    group_of: list[int] | None = None
    group_shapes: list[tuple[int, ...]] | None = None

    def own_settings(self, group: int, given: Mapping[str, Setting] | None) -> dict[str, float]:
        """Param group ``group``'s own settings, but those ``given`` to the update."""
        own = self.groups[group - 1]
        return {k: v for k, v in own.items() if not given or k not in given}

    def init(self, params: Sequence[Tensor]) -> list[Tensor]:
        """The optimizer's initial state for ``params`` (zero buffers; none for plain SGD)."""
        raise NotImplementedError

    def update(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor | None],
        state: Sequence[Tensor],
        step: int | Sequence[int],
        settings: Mapping[str, Setting] | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """One step: the new parameters and state.

        ``step`` is the number of updates taken before this one: one count, or one per
        parameter (``torch.optim`` counts per parameter). A None gradient leaves its
        parameter and its buffers as they are, as ``torch.optim`` skips a parameter whose
        ``.grad`` is None (unused by the step's loss, after ``zero_grad()``). ``settings``
        replace the optimizer's own for this step and obey the constructor's rules.

        Raises:
            ValueError, ArgumentTypeError: before anything is computed, for lists of other
                lengths or shapes, a step count that is not an int >= 0, or a bad setting
                (:mod:`hypergradient.optim.checks`).
        """
        raise NotImplementedError

    def tensor_settings(self) -> dict[str, Tensor]:
        """Settings given as tensors: candidates for hyperparameters."""
        return {k: v for k, v in self.settings.items() if isinstance(v, Tensor)}

    def _resolve(self, settings: Mapping[str, Setting] | None) -> dict[str, Setting]:
        out = dict(self.settings)
        if settings:
            check_settings(self, settings)  # names, tensor shapes, numbers' ranges
            out.update(settings)
        return out

    def check_update(
        self, params: Sequence[Tensor], grads: Sequence[Any], state: Any, step: Any = None
    ) -> None:
        """``ValueError`` unless there is a gradient (or None) of each parameter's shape,
        ``buffers`` state tensors per parameter and a valid ``step`` (see :mod:`.checks`)."""
        check_update(self, params, grads, state, step)

    def __repr__(self) -> str:
        args = ", ".join(
            f"{k}={float(v.detach()) if isinstance(v, Tensor) else v!r}"
            + (" (tensor)" if isinstance(v, Tensor) else "")
            for k, v in self.settings.items()
        )
        return f"{type(self).__name__}({args})"


def _setting_on(value: Setting, like: Tensor) -> Setting:
    if isinstance(value, Tensor):  # converted only if needed: each op is a node to backprop
        if value.dtype != like.dtype:
            value = value.to(dtype=like.dtype)
        return value if value.dim() == 0 else value.reshape(())
    return value


def _per_dtype(
    s: Mapping[str, Setting],
    keys: Sequence[str],
    opt: FunctionalOptimizer | None = None,
    given: Mapping[str, Setting] | None = None,
) -> Callable[[Tensor, int], tuple[Setting, ...]]:
    """``(like, i) -> (setting on like's dtype, ...)`` for ``keys`` and parameter ``i``,
    converted once per dtype and param group.

    Tensor settings become 0-d tensors of the parameter's dtype (differentiably); numbers
    stay numbers. One conversion per dtype and call instead of one per parameter. A param
    group's own values (``opt.groups``) replace ``s``'s, except for the settings ``given``
    to the update (tuned: one value for every group).
    """
    cache: dict[tuple[torch.dtype, int], tuple[Setting, ...]] = {}
    group_of = None if opt is None else opt.group_of

    def on(like: Tensor, i: int = 0) -> tuple[Setting, ...]:
        group = 0 if group_of is None else group_of[i]
        got = cache.get((like.dtype, group))
        if got is None:
            own = {} if group == 0 or opt is None else opt.own_settings(group, given)
            values = [own.get(k, s[k]) for k in keys]
            got = cache[like.dtype, group] = tuple([_setting_on(v, like) for v in values])
        return got

    return on


def _is_zero(value: Setting) -> bool:
    return not isinstance(value, Tensor) and value == 0


def _count(step: int | Sequence[int], i: int) -> int:
    """Parameter ``i``'s count of updates before this one."""
    return step if isinstance(step, int) else step[i]


class SGD(FunctionalOptimizer):
    """Stochastic gradient descent with momentum, as ``torch.optim.SGD``.

    .. math::

        g_t = \\nabla f(\\theta_t) + \\lambda \\theta_t, \\quad
        b_t = \\mu b_{t-1} + (1 - \\tau) g_t \\ (b_0 = g_0), \\quad
        \\theta_{t+1} = \\theta_t - \\eta\\, (g_t + \\mu b_t \\text{ if nesterov else } b_t)

    Args:
        lr, momentum, dampening, weight_decay: floats or scalar tensors (tensors listed in
            ``hparams`` get hypergradients).
        nesterov: Nesterov momentum.

    State: one momentum buffer per parameter when momentum is used (O(P) memory).
    """

    def __init__(
        self,
        lr: Setting,
        momentum: Setting = 0.0,
        dampening: Setting = 0.0,
        weight_decay: Setting = 0.0,
        nesterov: bool = False,
    ):
        self.settings = {
            "lr": _check_setting(lr, "lr", 0.0),
            "momentum": _check_setting(momentum, "momentum", 0.0),
            "dampening": _check_setting(dampening, "dampening", 0.0),
            "weight_decay": _check_setting(weight_decay, "weight_decay", 0.0),
        }
        nesterov = as_bool(nesterov, "nesterov")
        momentum, dampening = self.settings["momentum"], self.settings["dampening"]
        if nesterov and (_is_zero(momentum) or not _is_zero(dampening)):
            raise ValueError("`nesterov=True` requires a momentum > 0 and zero dampening.")
        self.nesterov = nesterov
        self.uses_momentum = not _is_zero(momentum)
        self.buffers = int(self.uses_momentum)

    def init(self, params: Sequence[Tensor]) -> list[Tensor]:
        if not self.uses_momentum:
            return []
        return [torch.zeros_like(p) for p in params]

    def update(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor | None],
        state: Sequence[Tensor],
        step: int | Sequence[int],
        settings: Mapping[str, Setting] | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        self.check_update(params, grads, state, step)
        s = self._resolve(settings)
        if not self.uses_momentum and not _is_zero(s["momentum"]):
            raise ValueError(
                "This SGD was built with momentum=0, so it keeps no momentum buffers, but "
                f"update() got momentum={s['momentum']!r}: its effect (and hypergradient) "
                "would be dropped. Build it with the momentum as a tensor (hg.optim.sgd(lr, "
                "momentum=torch.tensor(0.0))), or from_torch(..., tuned=('momentum',)) "
                "(a momentum linked to a hyperparameter: start it above 0)."
            )
        on = _per_dtype(s, ("lr", "momentum", "dampening", "weight_decay"), self, settings)
        decay = not _is_zero(s["weight_decay"]) or any([g.get("weight_decay") for g in self.groups])
        damped = not _is_zero(s["dampening"])
        new_params: list[Tensor] = []
        new_state: list[Tensor] = []
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is None:  # torch.optim skips a parameter whose .grad is None
                new_params.append(p)
                new_state.extend(state[i : i + 1] if self.uses_momentum else ())
                continue
            lr, mom, damp, wd = on(p, i)
            if decay:
                g = g + wd * p
            if self.uses_momentum:
                if _count(step, i) == 0:
                    buf = g
                else:
                    buf = mom * state[i] + ((1 - damp) * g if damped else g)
                new_state.append(buf)
                g = g + mom * buf if self.nesterov else buf
            new_params.append(p - lr * g)
        return new_params, new_state


class Adam(FunctionalOptimizer):
    """Adam, as ``torch.optim.Adam`` (Kingma & Ba, 2015).

    .. math::

        m_t = \\beta_1 m_{t-1} + (1-\\beta_1) g_t,\\quad
        v_t = \\beta_2 v_{t-1} + (1-\\beta_2) g_t^2,\\quad
        \\theta_{t+1} = \\theta_t - \\frac{\\eta}{1-\\beta_1^{t+1}}
        \\frac{m_t}{\\sqrt{v_t / (1-\\beta_2^{t+1})} + \\epsilon}

    With ``decoupled=True`` (``torch.optim.AdamW``; Loshchilov & Hutter, 2019) the weight
    decay is no gradient term: ``theta_t`` is first scaled by ``1 - eta lambda``. With
    ``amsgrad=True`` (Reddi et al., 2018) the denominator takes the largest ``v`` so far
    (a third buffer).

    ``sqrt`` has a zero derivative where ``v_t = 0`` (a coordinate that never had a
    gradient) instead of an infinite one, so such coordinates do not turn hypergradients
    into NaN. State: two buffers per parameter (three with AMSGrad).
    """

    def __init__(
        self,
        lr: Setting = 1e-3,
        betas: tuple[Setting, Setting] = (0.9, 0.999),
        eps: Setting = 1e-8,
        weight_decay: Setting = 0.0,
        *,
        decoupled: bool = False,
        amsgrad: bool = False,
    ):
        beta1, beta2 = _check_betas(betas)
        self.decoupled = as_bool(decoupled, "decoupled")
        self.amsgrad = as_bool(amsgrad, "amsgrad")
        self.buffers = 3 if self.amsgrad else 2  # m, v (and the largest v)
        self.settings = {
            "lr": _check_setting(lr, "lr", 0.0),
            "beta1": _check_setting(beta1, "betas[0]", 0.0, 1.0),
            "beta2": _check_setting(beta2, "betas[1]", 0.0, 1.0),
            "eps": _check_setting(eps, "eps", 0.0),
            "weight_decay": _check_setting(weight_decay, "weight_decay", 0.0),
        }

    def init(self, params: Sequence[Tensor]) -> list[Tensor]:
        return [torch.zeros_like(p) for _ in range(self.buffers) for p in params]

    def update(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor | None],
        state: Sequence[Tensor],
        step: int | Sequence[int],
        settings: Mapping[str, Setting] | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        self.check_update(params, grads, state, step)
        s = self._resolve(settings)
        n = len(params)
        new_params: list[Tensor] = []
        ms: list[Tensor] = []
        vs: list[Tensor] = []
        highs: list[Tensor] = []
        on = _per_dtype(s, ("lr", "beta1", "beta2", "eps", "weight_decay"), self, settings)
        decay = not _is_zero(s["weight_decay"]) or any(g.get("weight_decay") for g in self.groups)
        corrections: dict[tuple[Any, ...], tuple[Any, Any]] = {}
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is None:  # torch.optim skips a parameter whose .grad is None
                new_params.append(p)
                ms.append(state[i])
                vs.append(state[n + i])
                highs.extend(state[2 * n + i : 2 * n + i + 1])
                continue
            lr, b1, b2, eps, wd = on(p, i)
            if decay and self.decoupled:  # AdamW: p (1 - lr wd), then the step
                p = p * (1 - lr * wd)
            elif decay:
                g = g + wd * p
            m = b1 * state[i] + (1 - b1) * g
            v = b2 * state[n + i] + (1 - b2) * g * g
            t = _count(step, i)
            key = (p.dtype, t, 0 if self.group_of is None else self.group_of[i])
            if key not in corrections:  # lr / (1 - b1^(t+1)) and sqrt(1 - b2^(t+1))
                bc2 = 1 - b2 ** (t + 1)
                corrections[key] = (
                    lr / (1 - b1 ** (t + 1)),
                    bc2.sqrt() if isinstance(bc2, Tensor) else math.sqrt(bc2),
                )
            step_size, bc2_root = corrections[key]
            ms.append(m)
            vs.append(v)
            if self.amsgrad:  # the largest v so far in the denominator
                v = torch.maximum(state[2 * n + i], v)
                highs.append(v)
            positive = v > 0
            root = torch.where(positive, v, torch.ones_like(v)).sqrt() * positive
            denom = root / bc2_root + eps
            new_params.append(p - step_size * m / denom)
        return new_params, ms + vs + highs


def sgd(
    lr: Setting,
    momentum: Setting = 0.0,
    *,
    weight_decay: Setting = 0.0,
    nesterov: bool = False,
    dampening: Setting = 0.0,
) -> SGD:
    """Differentiable SGD (see :class:`SGD`); the settings after ``momentum`` are keyword-only
    (``torch.optim.SGD``'s third is ``dampening``, this function's was ``weight_decay``)."""
    return SGD(
        lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov
    )


def adam(
    lr: Setting = 1e-3,
    betas: tuple[Setting, Setting] = (0.9, 0.999),
    eps: Setting = 1e-8,
    weight_decay: Setting = 0.0,
    *,
    decoupled: bool = False,
    amsgrad: bool = False,
) -> Adam:
    """Differentiable Adam, or AdamW with ``decoupled=True`` (see :class:`Adam`); the flags
    are keyword-only (``torch.optim.Adam``'s fifth setting is ``amsgrad``, this function's
    was ``decoupled``: a positional ``True`` made AdamW of what torch reads as AMSGrad)."""
    return Adam(lr, betas, eps, weight_decay, decoupled=decoupled, amsgrad=amsgrad)


# The torch.optim twins live in .twins (re-exported here: their historical home).
from .twins import from_torch, zeros_or_copy  # noqa: E402
