"""Adam-HD: Adam whose learning rate adapts online by hypergradient descent."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..._vocab import as_bool
from .base import HypergradientOptimizer, betas_pair, nonneg

if TYPE_CHECKING:  # torch 2.1 calls it params_t: no runtime import
    from torch.optim.optimizer import ParamsT

__all__ = ["AdamHD"]


class AdamHD(HypergradientOptimizer):
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
    SGD-HD (1e-7, the paper's value). The learning rate is not clipped (a
    ``HypergradientWarning`` when it crosses below zero); a non-finite
    ``h_t`` is not applied (the learning rate keeps its value, with a
    ``HypergradientWarning``).

    Args:
        params: parameters or parameter-group dicts (each group has its own ``lr`` and
            ``hypergrad_lr``).
        lr: initial learning rate ``alpha_0`` (>= 0); the current value is ``group["lr"]``.
        betas: ``(beta1, beta2)``, each in [0, 1).
        eps: term added to the denominator (>= 0).
        weight_decay: L2 penalty added to the gradient (>= 0), as in ``torch.optim.Adam``.
        hypergrad_lr: hypergradient step size ``beta`` (>= 0); 0 gives plain Adam.
        maximize: maximize the objective instead of minimizing it.

    Raises:
        ArgumentTypeError: a setting of the wrong type (``lr=True``, ``momentum="0.9"``).
        ValueError: a setting out of range or not finite, naming it.

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
        super().__init__(params, self._validate_group(defaults))

    def _validate_group(self, group: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: nonneg(group, k) for k in ("lr", "eps", "weight_decay", "hypergrad_lr")
        }
        out["betas"] = betas_pair(group["betas"])
        out["maximize"] = as_bool(group["maximize"], "maximize")
        return out

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> None:
        """One Adam step of ``group`` at its adapted learning rate."""
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
