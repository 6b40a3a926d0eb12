"""Online learning-rate adaptation by hypergradient descent (SGD-HD, SGDN-HD, Adam-HD).

Baydin, Cornish, Martinez Rubio, Schmidt & Wood (2018), "Online Learning Rate Adaptation
with Hypergradient Descent", ICLR. https://arxiv.org/abs/1703.04782

Every base optimizer here moves the parameters by ``theta_t = theta_{t-1} - alpha_t u_t``
where ``u_t`` is its update direction (the gradient for SGD, the momentum/Nesterov
direction with momentum, ``m_hat / (sqrt(v_hat) + eps)`` for Adam). Since
``d theta_{t-1} / d alpha = -u_{t-1}`` for the step that produced ``theta_{t-1}``, the
derivative of the objective with respect to the learning rate used at that step is

    h_t = d f(theta_{t-1}) / d alpha_{t-1} = -grad f(theta_{t-1}) . u_{t-1},

available for one dot product once the new gradient is known. Before taking step ``t``
the learning rate descends it, ``alpha_t = alpha_{t-1} - beta h_t``: it grows while
successive directions agree (``g_t . u_{t-1} > 0``) and shrinks when they disagree (an
overshoot). The learning rate is one Python float per parameter group, kept in
``group["lr"]`` like every ``torch.optim`` optimizer, so schedulers and loggers see it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from .._tree import wide_dtype

__all__ = ["SGDHD", "AdamHD"]

_DIRECTION = "prev_direction"


def _check_nonneg(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite float >= 0."""
    try:
        v = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}") from None
    if not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")


def _sum_dots(dots: list[Tensor]) -> float:
    """Sum 0-d tensors (possibly on several devices) into a Python float, one sync per device."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for d in dots:
        by_device.setdefault(d.device, []).append(d.to(wide_dtype(d.device)))
    return sum(float(torch.stack(ds).sum()) for ds in by_device.values())


class _HypergradientOptimizer(Optimizer):
    """Shared machinery: validation of every group, gradient gathering and the lr update."""

    _name = "HD"

    def _validate_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group after checking its (merged) hyperparameters."""
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._validate_group(merged)
        param_group = dict(param_group)
        if "lr" in param_group:
            param_group["lr"] = float(param_group["lr"])
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)

    def _check_grads(self) -> None:
        """Raise before any state is touched if a gradient is sparse or a parameter complex."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{self._name} does not support sparse gradients; use dense gradients "
                        "(e.g. nn.Embedding(sparse=False)) or torch.optim.SparseAdam"
                    )
                if torch.is_complex(p):
                    raise RuntimeError(
                        f"{self._name} does not support complex parameters; optimize "
                        "torch.view_as_real(param) instead"
                    )

    def _gather(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """Params with a gradient and their effective gradients ``±grad + weight_decay * p``.

        A parameter without gradient does not move at this step, so its stored direction
        (which describes an older step) is dropped: it must not enter the next hypergradient.
        """
        params: list[Tensor] = []
        grads: list[Tensor] = []
        for p in group["params"]:
            if p.grad is None:
                if p in self.state:
                    self.state[p].pop(_DIRECTION, None)
            else:
                params.append(p)
        for p in params:
            grad = p.grad if not group["maximize"] else -p.grad
            if group["weight_decay"] != 0:
                grad = grad.add(p, alpha=group["weight_decay"])
            grads.append(grad)
        return params, grads

    def _adapt_lr(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """``alpha <- alpha - beta h`` with ``h = -sum_p g_p . u_p`` (previous directions)."""
        if group["hypergrad_lr"] == 0:
            return
        dots = [
            torch.dot(g.reshape(-1), self.state[p][_DIRECTION].reshape(-1))
            for p, g in zip(params, grads)
            if _DIRECTION in self.state[p]
        ]
        if not dots:
            return
        h = -_sum_dots(dots)
        group["lr"] = group["lr"] - group["hypergrad_lr"] * h

    @staticmethod
    def _direction_buffer(state: dict[str, Any], p: Tensor) -> Tensor:
        """The per-parameter buffer holding the last applied direction (allocated once)."""
        buf = state.get(_DIRECTION)
        if buf is None:
            buf = state[_DIRECTION] = torch.empty_like(p, memory_format=torch.preserve_format)
        return buf


class SGDHD(_HypergradientOptimizer):
    r"""SGD (optionally with momentum or Nesterov momentum) whose learning rate adapts online.

    The parameter update is exactly :class:`torch.optim.SGD`'s. With
    ``g_t = grad f(theta_{t-1}) + weight_decay * theta_{t-1}`` (negated gradient if
    ``maximize``) and ``mu`` the momentum, the direction applied at step ``t`` is

    .. math::

        b_t = \mu b_{t-1} + (1 - \text{dampening}) g_t \quad (b_1 = g_1), \qquad
        u_t = \begin{cases} g_t & \mu = 0 \\ b_t & \text{momentum} \\
              g_t + \mu b_t & \text{Nesterov} \end{cases}

    and, before it is applied, the learning rate of the group takes one hypergradient step
    (SGD-HD / SGDN-HD of Baydin et al., Algorithms 1 and 4):

    .. math::

        h_t = \frac{\partial f(\theta_{t-1})}{\partial \alpha_{t-1}} = -g_t \cdot u_{t-1},
        \qquad \alpha_t = \alpha_{t-1} - \beta h_t, \qquad
        \theta_t = \theta_{t-1} - \alpha_t u_t .

    The dot product sums over all parameters of the group; at the first step (no
    ``u_0``) the learning rate is unchanged. As in the paper, the momentum buffer's own
    dependence on past learning rates is ignored (PyTorch's buffer does not depend on
    ``alpha`` at all). The learning rate is not clipped: a large ``hypergrad_lr`` on an
    oscillating problem can drive it to zero or below.

    Args:
        params: parameters or parameter-group dicts (each group has its own ``lr`` and
            ``hypergrad_lr``).
        lr: initial learning rate ``alpha_0`` (>= 0); the current value is ``group["lr"]``.
        momentum: momentum factor ``mu`` (>= 0).
        dampening: dampening of the momentum, in [0, 1].
        weight_decay: L2 penalty added to the gradient (>= 0).
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        hypergrad_lr: hypergradient step size ``beta`` (>= 0); 0 gives plain SGD.
        maximize: maximize the objective instead of minimizing it.

    Cost:
        O(P) extra memory (the previous direction of every parameter, in
        ``self.state[p]["prev_direction"]``, next to the momentum buffer) and one dot
        product per parameter per step (plus one host sync per group and device to read
        the scalar into ``group["lr"]``; skipped when ``hypergrad_lr == 0``).

    Reference:
        A. G. Baydin, R. Cornish, D. Martinez Rubio, M. Schmidt, F. Wood, "Online Learning
        Rate Adaptation with Hypergradient Descent", ICLR 2018, arXiv:1703.04782.
    """

    _name = "SGDHD"

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        hypergrad_lr: float = 1e-4,
        *,
        maximize: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            hypergrad_lr=hypergrad_lr,
            maximize=maximize,
        )
        self._validate_group(defaults)
        defaults["lr"] = float(lr)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        for name in ("lr", "momentum", "weight_decay", "hypergrad_lr"):
            _check_nonneg(name, group[name])
        _check_nonneg("dampening", group["dampening"])
        if float(group["dampening"]) > 1.0:
            raise ValueError(f"dampening must be in [0, 1], got {group['dampening']!r}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                "nesterov=True requires momentum > 0 and dampening == 0, got "
                f"momentum={group['momentum']!r}, dampening={group['dampening']!r}"
            )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Adapt each group's learning rate, then take one SGD step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss
                (run with gradients enabled).

        Returns:
            The closure's loss, or None without closure.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        self._check_grads()
        for group in self.param_groups:
            params, grads = self._gather(group)
            self._adapt_lr(group, params, grads)
            lr: float = group["lr"]
            momentum: float = group["momentum"]
            dampening: float = group["dampening"]
            for p, grad in zip(params, grads):
                state = self.state[p]
                if momentum != 0:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = grad.detach().clone()
                    else:
                        buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                    if group["nesterov"]:
                        grad = grad.add(buf, alpha=momentum)
                    else:
                        grad = buf
                p.add_(self._direction_buffer(state, p).copy_(grad), alpha=-lr)
        return loss


class AdamHD(_HypergradientOptimizer):
    r"""Adam whose (global, per-group) learning rate adapts online by hypergradient descent.

    The parameter update is exactly :class:`torch.optim.Adam`'s (L2 ``weight_decay`` added
    to the gradient, bias correction, ``eps`` outside the square root):

    .. math::

        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \quad
        u_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon},

    and before the step the group's learning rate takes one hypergradient step (Adam-HD,
    Baydin et al., Algorithm 3), with ``u_{t-1}`` the direction actually applied at the
    previous step:

    .. math::

        h_t = \frac{\partial f(\theta_{t-1})}{\partial \alpha_{t-1}} = -g_t \cdot u_{t-1},
        \qquad \alpha_t = \alpha_{t-1} - \beta h_t, \qquad
        \theta_t = \theta_{t-1} - \alpha_t u_t .

    The dot product sums over all parameters of the group; the first step leaves the
    learning rate unchanged. Because ``u`` is normalized (entries of order 1),
    ``g . u`` scales like ``||g||_1``, hence the much smaller default ``beta`` than for
    SGD-HD (1e-7, the paper's value). The learning rate is not clipped.

    Args:
        params: parameters or parameter-group dicts (each group has its own ``lr`` and
            ``hypergrad_lr``).
        lr: initial learning rate ``alpha_0`` (>= 0); the current value is ``group["lr"]``.
        betas: ``(beta1, beta2)``, each in [0, 1).
        eps: term added to the denominator (>= 0).
        weight_decay: L2 penalty added to the gradient (>= 0), as in ``torch.optim.Adam``.
        hypergrad_lr: hypergradient step size ``beta`` (>= 0); 0 gives plain Adam.
        maximize: maximize the objective instead of minimizing it.

    Cost:
        O(P) extra memory (the previous direction of every parameter, in
        ``self.state[p]["prev_direction"]``, next to Adam's two moments) and one dot
        product per parameter per step (plus one host sync per group and device to read
        the scalar into ``group["lr"]``; skipped when ``hypergrad_lr == 0``).

    Reference:
        A. G. Baydin, R. Cornish, D. Martinez Rubio, M. Schmidt, F. Wood, "Online Learning
        Rate Adaptation with Hypergradient Descent", ICLR 2018, arXiv:1703.04782.
    """

    _name = "AdamHD"

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        hypergrad_lr: float = 1e-7,
        *,
        maximize: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            hypergrad_lr=hypergrad_lr,
            maximize=maximize,
        )
        self._validate_group(defaults)
        defaults["lr"] = float(lr)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        for name in ("lr", "eps", "weight_decay", "hypergrad_lr"):
            _check_nonneg(name, group[name])
        betas = group["betas"]
        if not isinstance(betas, Iterable) or len(tuple(betas)) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for i, b in enumerate(betas):
            _check_nonneg(f"betas[{i}]", b)
            if not float(b) < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {b!r}")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Adapt each group's learning rate, then take one Adam step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss
                (run with gradients enabled).

        Returns:
            The closure's loss, or None without closure.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        self._check_grads()
        for group in self.param_groups:
            params, grads = self._gather(group)
            self._adapt_lr(group, params, grads)
            lr: float = group["lr"]
            beta1, beta2 = (float(b) for b in group["betas"])
            eps: float = group["eps"]
            for p, grad in zip(params, grads):
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step: int = state["step"]
                exp_avg: Tensor = state["exp_avg"]
                exp_avg_sq: Tensor = state["exp_avg_sq"]

                # Same operations, in the same order, as torch.optim.Adam (single tensor).
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bias_correction1 = 1 - beta1**step
                bias_correction2 = 1 - beta2**step
                step_size = lr / bias_correction1
                denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-step_size)

                # u_t = m_hat / (sqrt(v_hat) + eps): d theta_t / d alpha_t = -u_t.
                direction = self._direction_buffer(state, p)
                torch.div(exp_avg, denom, out=direction).div_(bias_correction1)
        return loss
