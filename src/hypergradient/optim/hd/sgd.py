"""SGD-HD and SGDN-HD: SGD (with momentum or Nesterov) whose learning rate adapts online."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from ..._vocab import as_bool, as_float
from .base import HypergradientOptimizer, nonneg

if TYPE_CHECKING:  # torch 2.1 calls it params_t: no runtime import
    from torch.optim.optimizer import ParamsT

__all__ = ["SGDHD"]


class SGDHD(HypergradientOptimizer):
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
    oscillating problem can drive it to zero or below (a ``HypergradientWarning`` when it
    crosses below zero: the steps then ascend the loss). A non-finite ``h_t`` is not
    applied (the learning rate keeps its value and a ``HypergradientWarning`` is issued).

    Args:
        params: parameters or parameter-group dicts (each group has its own ``lr`` and
            ``hypergrad_lr``).
        lr: initial learning rate ``alpha_0`` (>= 0); the current value is ``group["lr"]``.
        momentum: momentum factor ``mu`` (>= 0).
        dampening: dampening of the momentum, in [0, 1].
        weight_decay: L2 penalty added to the gradient (>= 0).
        nesterov: Nesterov momentum (a bool; needs ``momentum > 0`` and ``dampening == 0``).
        hypergrad_lr: hypergradient step size ``beta`` (>= 0); 0 gives plain SGD.
        maximize: maximize the objective instead of minimizing it.

    Raises:
        ArgumentTypeError: a setting of the wrong type (``lr=True``, ``momentum="0.9"``).
        ValueError: a setting out of range or not finite, naming it.

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
        super().__init__(params, self._validate_group(defaults))

    def _validate_group(self, group: dict[str, Any]) -> dict[str, Any]:
        out = {k: nonneg(group, k) for k in ("lr", "momentum", "weight_decay", "hypergrad_lr")}
        out["dampening"] = as_float(group["dampening"], "dampening", min=0.0, max=1.0)
        out["nesterov"] = as_bool(group["nesterov"], "nesterov")
        out["maximize"] = as_bool(group["maximize"], "maximize")
        if out["nesterov"] and (out["momentum"] <= 0 or out["dampening"] != 0):
            raise ValueError(
                "`nesterov=True` requires momentum > 0 and dampening == 0, got "
                f"momentum={group['momentum']!r}, dampening={group['dampening']!r}."
            )
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> None:
        """One SGD step of ``group`` at its adapted learning rate."""
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
