"""HippoTrainer's ``DRMAD``: DrMAD (Fu et al., 2016) over ``T`` training steps.

The hyper-step trains ``T`` more steps with the model's own optimizer (as HippoTrainer's
DRMAD does), keeping the weights before and after (``w0``, ``wT``), then runs the reverse
pass of SGD on the straight line between them:

    a_T = grad_theta g(theta_T),   dphi = d_phi g(theta_T)
    for t = T-1, ..., 0:   theta_t = (1 - t/T) w0 + (t/T) wT
        dphi -= lr (d_phi grad_theta f_t(theta_t))^T a
        a    <- a - lr (H_t(theta_t) a + weight_decay a)

Each reverse step is one double-backward graph of the criterion at ``theta_t``, answering
``H_t a`` and the mixed product in one backward pass. Memory: two copies of the weights
(no stored trajectory). A non-finite quantity (training loss, gradient or weight of a
training step, or the reverse pass) raises ``NonFiniteHypergradientError`` naming it, and
the model and optimizer are restored to their state before the hyper-step.

Reference: Fu, Luo, Bai, Ding, Feng, Ren (2016), "DrMAD: Distilling Reverse-Mode Automatic
Differentiation for Optimizing Hyperparameters of Deep Neural Networks", IJCAI.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from ..._vocab import as_float, as_int, require_finite
from ._autograd import grads_or_zeros, vjp_or_zeros
from .base import HyperOptimizer, is_batch

__all__ = ["DRMAD"]

_FIX = (
    "The model and optimizer were restored to their state before the hyper-step. Lower the "
    "optimizer's learning rate, or T."
)


class DRMAD(HyperOptimizer):
    """DrMAD over ``T`` SGD steps taken inside each hyper-step.

    Args:
        weight_decay: the inner SGD's L2 coefficient in the reverse pass (0 when the
            penalty is in ``criterion``; use the optimizer's ``weight_decay`` otherwise).
        T: training steps per hyper-step (>= 1).
        *args, **kwargs: those of :class:`HyperOptimizer`.

    Attributes:
        w0, wT: the weights (one tensor per ``model.parameters()`` entry) before and after
            the last hyper-step's ``T`` training steps; None before the first.

    Momentum of the real optimizer is ignored in the reverse pass (the approximation DrMAD
    makes anyway). Cost per hyper-step: ``T`` training steps, one validation gradient and
    ``T`` double-backward passes of the criterion.
    """

    def __init__(self, *args: Any, weight_decay: float = 0.0, T: int = 10, **kwargs: Any):
        self.weight_decay = as_float(weight_decay, "weight_decay", min=0.0)
        self.T = as_int(T, "T", min=1)
        self.w0: list[Tensor] | None = None
        self.wT: list[Tensor] | None = None
        super().__init__(*args, **kwargs)

    def hyper_grad(self, train_loss: Tensor, val_loss: Tensor) -> list[Tensor]:
        """DrMAD's hypergradient: trains ``T`` steps on ``train_loader``, then reverses.

        DrMAD differentiates the losses at weights it trains to, so it draws its own
        batches: the validation loss is re-evaluated at the trained weights on a fresh
        validation batch, and ``train_loss``/``val_loss`` (built before training, at the
        wrong weights) are accepted for the hook's signature and not used.
        """
        if is_batch(train_loss):
            return self._deprecated_batches(train_loss, val_loss)
        with self._requiring_grad():
            return self._builtin_hyper_grad(self._train.next(), self._val.next())

    def _builtin_hyper_grad(self, train_batch: Any, val_batch: Any) -> list[Tensor]:
        batches = [train_batch] + [self._train.next() for _ in range(self.T - 1)]
        model_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        try:
            names, params = self._named_params()
            w0 = [p.detach().clone() for p in params]
            self._train_steps(batches, names, params)
            wT = [p.detach().clone() for p in params]
            hyper = self._reverse(batches, val_batch, names, w0, wT)
        except BaseException:
            self.model.load_state_dict(model_state)
            self.optimizer.load_state_dict(optimizer_state)
            self.optimizer.zero_grad()
            raise
        self.w0, self.wT = w0, wT
        return hyper

    def _train_steps(self, batches: list[Any], names: list[str], params: list[Tensor]) -> None:
        labels = [f"model parameter {k!r}" for k in names]
        for t, (inputs, targets) in enumerate(batches, 1):
            where = f"DRMAD's training step {t} of {self.T} (inside the hyper-step)"
            self.optimizer.zero_grad()
            loss = self.criterion(self.model(inputs), targets)
            require_finite([loss.detach()], [f"the training loss of {where}"], "", _FIX)
            loss.backward()
            require_finite([p.grad for p in params], labels, f"At {where}, the gradient of", _FIX)
            self.optimizer.step()
            require_finite([p.detach() for p in params], labels, f"After {where},", _FIX)
        self.optimizer.zero_grad()

    def _reverse(
        self,
        batches: list[Any],
        val_batch: Any,
        names: list[str],
        w0: list[Tensor],
        wT: list[Tensor],
    ) -> list[Tensor]:
        hyper = list(self.hyperparams.values())
        n, lr = len(names), self._lr()
        leaves = [w.clone().requires_grad_(True) for w in wT]
        with torch.enable_grad():
            val = self._loss(val_batch)(dict(zip(names, leaves)))
        grads = grads_or_zeros(val, leaves + hyper)
        a, total = grads[:n], grads[n:]
        labels = [f"model parameter {k!r}" for k in names]
        require_finite(a, labels, "The gradient of the validation loss with respect to", _FIX)
        for t in range(self.T - 1, -1, -1):
            beta = t / self.T
            point = [((1 - beta) * x + beta * y).requires_grad_(True) for x, y in zip(w0, wT)]
            with torch.enable_grad():
                loss = self._loss(batches[t])(dict(zip(names, point)))
                g = grads_or_zeros(loss, point, create_graph=True)
            products = vjp_or_zeros(g, point + hyper, a)  # H_t a and the mixed product
            total = [acc - lr * m for acc, m in zip(total, products[n:])]
            a = [x - lr * (h + self.weight_decay * x) for x, h in zip(a, products[:n])]
            require_finite(a, labels, f"At DrMAD's reverse step {t}, the adjoint of", _FIX)
        return [x.detach() for x in total]
