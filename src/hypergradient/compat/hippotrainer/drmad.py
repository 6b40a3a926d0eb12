"""HippoTrainer's ``DRMAD``: DrMAD (Fu et al., 2016) over ``T`` training steps.

The hyper-step trains ``T`` more steps with the model's own optimizer (as HippoTrainer's
DRMAD does), keeping the weights before and after (``w0``, ``wT``), then computes the
hypergradient with the library's :class:`hypergradient.DrMAD` on a
:class:`hypergradient.methods.Trajectory` of those steps: plain SGD with the optimizer's
learning rate and L2 ``weight_decay`` (or ``DRMAD(weight_decay=...)``; momentum ignored,
as HippoTrainer does), the recorded end ``wT`` (``DrMAD(replay=False)``: no forward
replay), and the criterion's hyperparameters held by reference
(``hparams_by_reference=True``). Its reverse pass is

    a_T = grad_theta g(theta_T),   dphi = d_phi g(theta_T)
    for t = T-1, ..., 0:   theta_t = (1 - t/T) w0 + (t/T) wT
        dphi -= lr (d_phi grad_theta f_t(theta_t))^T a
        a    <- a - lr (H_t(theta_t) a + weight_decay a)

one double-backward pass of the criterion per step (``hvp="auto"``: central differences
of gradients where a kernel has no double backward). Memory: two copies of the weights
(no stored trajectory). A non-finite quantity (training loss, gradient or weight of a
training step, or the hypergradient) raises ``NonFiniteHypergradientError`` naming it,
and the model and optimizer are restored to their state before the hyper-step.

Reference: Fu, Luo, Bai, Ding, Feng, Ren (2016), "DrMAD: Distilling Reverse-Mode Automatic
Differentiation for Optimizing Hyperparameters of Deep Neural Networks", IJCAI.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..._vocab import (
    HypergradientWarning,
    NonFiniteHypergradientError,
    require_finite,
)
from ...hyperoptimizer.build import coupled_decays
from ...methods.base import Problem, Trajectory
from ...methods.drmad import DrMAD
from ...methods.growth import loss_diverging
from ...optim.functional import sgd
from .._watch import RunWatch
from ._autograd import criterion_loss
from ._checks import reads_by_reference
from ._settings import Setting, at_least_one, optional_non_negative
from .base import HyperOptimizer, is_batch

__all__ = ["DRMAD"]

_FIX = (
    "The model and optimizer were restored to their state before the hyper-step. Lower the "
    "optimizer's learning rate, or T."
)


class DRMAD(HyperOptimizer):
    """DrMAD over ``T`` SGD steps taken inside each hyper-step.

    The first eight arguments are those of :class:`HyperOptimizer`, in HippoTrainer's
    order (``hyperparams, hyper_lr, inner_steps, model, optimizer, train_loader,
    val_loader, criterion``); ``weight_decay`` and ``T`` may follow by position.

    Args:
        weight_decay: the inner SGD's L2 coefficient in the reverse pass; by default
            (None) the optimizer's own L2 ``weight_decay`` (``torch.optim.SGD``, ``Adam``,
            ...; 0 for ``AdamW``'s decoupled decay or none), the term its training steps
            add to the gradient. (A penalty in ``criterion`` is differentiated anyway.)
        T: training steps per hyper-step (>= 1).

    Attributes:
        w0, wT: the trained weights (one tensor per parameter that requires grad and
            that the optimizer steps, in ``model.parameters()`` order) before and after
            the last hyper-step's ``T`` training steps; None before the first.

    Momentum of the real optimizer is ignored in the reverse pass (the approximation DrMAD
    makes anyway). Cost per hyper-step: ``T`` training steps, one validation gradient and
    ``T`` double-backward passes of the criterion.
    """

    weight_decay = Setting(optional_non_negative)
    T = Setting(at_least_one)

    def __init__(
        self,
        hyperparams: dict[str, Tensor],
        hyper_lr: float | Tensor = 1e-3,
        inner_steps: int = 1,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        train_loader: Iterable[Any] | None = None,
        val_loader: Iterable[Any] | None = None,
        criterion: Any = None,
        weight_decay: float | None = None,
        T: int = 10,
    ):
        # HippoTrainer's signature: weight_decay and T may be passed by position
        self.weight_decay = weight_decay
        self.T = T
        self.w0: list[Tensor] | None = None
        self.wT: list[Tensor] | None = None
        setup = (model, optimizer, train_loader, val_loader, criterion)
        super().__init__(hyperparams, hyper_lr, inner_steps, *setup)

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
        self._check_one_lr()
        batches = [train_batch] + [self._train.next() for _ in range(self.T - 1)]
        model_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        try:
            names, params = self._named_params()
            w0 = [p.detach().clone() for p in params]
            self._train_steps(batches, names, params)
            self._check_no_reference(train_batch, names, params)  # (restored if it raises)
            wT = [p.detach().clone() for p in params]
            hyper = self._reverse(batches, val_batch, names, w0, wT)
        except BaseException:
            self.model.load_state_dict(model_state)
            self.optimizer.load_state_dict(optimizer_state)
            self.optimizer.zero_grad()
            raise
        self.w0, self.wT = w0, wT
        return hyper

    def _check_one_lr(self) -> None:
        """The reverse pass is SGD with one learning rate and one L2 decay: refuse param
        groups that differ (before any training step or change)."""
        stepped = {id(p) for p in self._named_params()[1]}
        lrs = {
            i: g["lr"]
            for i, g in enumerate(self.optimizer.param_groups)
            if any(id(p) in stepped for p in g["params"])
        }
        if self.weight_decay is None and len(set(self._decays())) > 1:
            raise ValueError(
                "DRMAD's reverse pass takes one L2 weight_decay, and the optimizer's param "
                f"groups add several to the trained parameters ({sorted(set(self._decays()))}). "
                "Use one weight_decay for them, or pass DRMAD(weight_decay=...) to set the "
                "reverse pass's."
            )
        if len({float(v) for v in lrs.values()}) > 1:
            raise ValueError(
                f"DRMAD's reverse pass takes one learning rate, and the optimizer's param groups "
                f"have several ({lrs}): its hypergradient would be that of other training "
                "steps. Use one learning rate for the trained parameters (T1T2, Neumann and "
                "HOAG take each group's own)."
            )

    def _decays(self) -> list[float]:
        """The optimizer's L2 decay of each trained parameter (0 where it adds none)."""
        params = self._named_params()[1]
        return coupled_decays(self.optimizer, params) or [0.0] * len(params)

    def _decay(self) -> float:
        """The reverse pass's L2 coefficient: ``weight_decay``, else the optimizer's."""
        if self.weight_decay is not None:
            return self.weight_decay
        return max(self._decays(), default=0.0)  # one value (_check_one_lr)

    _reference: str | None | bool = False  # reads_by_reference's answer (False: not asked)

    def _check_no_reference(self, batch: Any, names: list[str], params: list[Tensor]) -> None:
        """Refuse a criterion that reads a weight through a reference of its own (the
        reverse pass differentiates at copies swapped into the model); asked once."""
        if self._reference is False:
            self._reference = reads_by_reference(self.model, self.criterion, batch, names, params)
        if self._reference is not None:
            raise ValueError(
                f"The criterion (or the model) reads the model parameter {self._reference!r} "
                "through a reference of its own (e.g. a list made with list(model.parameters()) "
                "before training): DRMAD's reverse pass would take it as a constant. Read the "
                "weights through the model inside the criterion (self.model.parameters(), "
                "model.layer.weight); T1T2, Neumann and HOAG accept it. The model and optimizer "
                "were restored to their state before the hyper-step."
            )

    def _train_steps(self, batches: list[Any], names: list[str], params: list[Tensor]) -> None:
        """``T`` steps of the optimizer; the hyperparameters do not require grad meanwhile,
        so the steps' ``backward()`` leaves their ``.grad`` alone (HippoTrainer's added the
        training losses' gradients to it)."""
        labels = [f"model parameter {k!r}" for k in names]
        self._hyperparams_requires_grad_(False)  # _requiring_grad() restores the flags
        watch = RunWatch()  # hg.HyperOptimizer's divergence check on these steps
        watch.record(0, 1, params, None)
        losses: list[float] = []
        for t, (inputs, targets) in enumerate(batches, 1):
            where = f"DRMAD's training step {t} of {self.T} (inside the hyper-step)"
            self.optimizer.zero_grad()
            loss = self.criterion(self.model(inputs), targets)
            require_finite([loss.detach()], [f"the training loss of {where}"], "", _FIX)
            loss.backward()
            require_finite([p.grad for p in params], labels, f"At {where}, the gradient of", _FIX)
            self.optimizer.step()
            require_finite([p.detach() for p in params], labels, f"After {where},", _FIX)
            watch.record(t, 1, params, loss)
            losses.append(float(loss.detach()))
        self.optimizer.zero_grad()
        # geometric growth (lr above 2 / lambda_max): the reverse pass would differentiate a
        # run that trains nothing; warn as hg.HyperOptimizer (its watch) and the trajectory
        # methods (a loss that grew 1e6x over the run and still grows) do
        what = f"DRMAD's {len(batches)} training steps"
        why = None if watch.check(what, self.step_count) else loss_diverging(losses)
        if why is not None:
            warnings.warn(
                f"{what} (inside the hyper-step after step {self.step_count}) diverged: {why}. "
                "The hypergradient is applied, but that run trained nothing. Lower the "
                "optimizer's learning rate, or T.",
                HypergradientWarning,
                stacklevel=5,
            )

    def _reverse(
        self,
        batches: list[Any],
        val_batch: Any,
        names: list[str],
        w0: list[Tensor],
        wT: list[Tensor],
    ) -> list[Tensor]:
        """``hg.DrMAD(replay=False)`` between ``w0`` and the trained ``wT``."""
        model, criterion = self.model, self.criterion

        def step_loss(params: Any, hparams: Any, batch: Any) -> Tensor:
            return criterion_loss(model, criterion, batch)(params, None)

        def outer_loss(params: Any, hparams: Any) -> Tensor:
            return criterion_loss(model, criterion, val_batch, validation=True)(params, None)

        end = dict(zip(names, wT))
        trajectory = Trajectory(
            step_loss=step_loss,
            params0=dict(zip(names, w0)),
            optimizer=sgd(lr=self._lr(), weight_decay=self._decay()),
            batches=batches,
            final_params=end,
        )
        self._hyperparams_requires_grad_(True)
        problem = Problem(
            inner_loss=lambda p, h: step_loss(p, h, batches[-1]),
            outer_loss=outer_loss,
            params=end,
            hparams=tuple(self.hyperparams.values()),
            trajectory=trajectory,
            hparams_by_reference=True,
        )
        try:
            hyper, _ = DrMAD(replay=False, max_deviation=None)(problem)
        except NonFiniteHypergradientError as error:
            raise NonFiniteHypergradientError(f"{error} {_FIX}", error.quantity) from None
        return [x.detach() for x in cast(tuple[Tensor, ...], hyper)]
