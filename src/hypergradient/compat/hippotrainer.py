"""HippoTrainer 1.0.0's API on this package's core, with correct hypergradients.

Replace ``from hippotrainer import HyperOptimizer, T1T2, Neumann, HOAG, DRMAD`` with
``from hypergradient.compat.hippotrainer import ...``; the constructors
``(hyperparams, hyper_lr=1e-3, inner_steps=1, model=None, optimizer=None,
train_loader=None, val_loader=None, criterion=None)`` and the methods' arguments
(``num_terms``; ``epsilon``, ``cg_max_iter``; ``weight_decay``, ``T``) are the same, and so
is the training loop::

    for inputs, targets in train_loader:
        loss = criterion(model(inputs), targets)
        loss.backward()
        hyper_optimizer.step(loss)
        hyper_optimizer.zero_grad()

As in HippoTrainer, the hyperparameters enter through ``model`` or ``criterion``, which hold
them by reference, and the same ``criterion`` scores training and validation batches.
Differences, all deliberate:

- Hypergradients are the implicit/one-step/DrMAD ones of the papers, computed by the core
  (HippoTrainer's Neumann and DrMAD do not compute hypergradients: the Neumann recursion
  rescales the partial sum by ``lr`` at every term, and DrMAD's update ignores the
  hyperparameters' influence on the training gradient).
- T1T2 keeps the learning-rate factor of the look-ahead step; Neumann uses ``alpha = lr``.
- A hyper-step uses one fresh training and one fresh validation mini-batch (cycling through
  the loaders), not whole passes over both datasets.
- A validation loss that does not contain a hyperparameter is fine (zero direct term).
- A non-finite hypergradient raises instead of being applied.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module

from .._tree import wide_dtype
from ..methods import NonFiniteHypergradientError, implicit
from ..operators import HessianOperator
from ..solvers import (
    CG,
    Identity,
    Solver,
    _positive_float,
    _positive_int,
)
from ..solvers import (
    Neumann as _NeumannSolver,
)

__all__ = ["HyperOptimizer", "T1T2", "Neumann", "HOAG", "DRMAD"]


class _Cycle:
    def __init__(self, loader: Iterable[Any], name: str):
        self.loader, self.name = loader, name
        self._it: Iterator[Any] | None = None

    def next(self) -> Any:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
        raise ValueError(f"`{self.name}` yields no batches.")


class HyperOptimizer:
    """HippoTrainer's base class. Subclasses choose how ``H^{-1}`` is approximated.

    Args:
        hyperparams: ``{name: tensor}``, floating-point leaves used by ``model`` or
            ``criterion``.
        hyper_lr: step size of the hyperparameters' gradient descent.
        inner_steps: training steps between hyper-steps.
        model, optimizer, train_loader, val_loader, criterion: the training set-up; all
            required.
    """

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
    ):
        if not isinstance(hyperparams, dict) or not hyperparams:
            raise TypeError("`hyperparams` must be a non-empty dict {name: tensor}.")
        for name, h in hyperparams.items():
            if not isinstance(h, Tensor) or not h.is_floating_point():
                raise TypeError(f"hyperparams[{name!r}] must be a floating-point tensor.")
            if not h.is_leaf:
                raise ValueError(
                    f"hyperparams[{name!r}] is not a leaf tensor; create it with torch.tensor(...)."
                )
        for name, value in (
            ("model", model),
            ("optimizer", optimizer),
            ("train_loader", train_loader),
            ("val_loader", val_loader),
            ("criterion", criterion),
        ):
            if value is None:
                raise ValueError(f"`{name}` is required.")
        if not isinstance(model, nn.Module):
            raise TypeError("`model` must be an nn.Module.")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError("`optimizer` must be a torch.optim.Optimizer.")
        if not callable(criterion):
            raise TypeError("`criterion` must be callable (predictions, targets) -> loss.")
        self.hyperparams = hyperparams
        self.hyper_lr = hyper_lr
        self.inner_steps = _positive_int(inner_steps, "inner_steps")
        self.model, self.optimizer, self.criterion = model, optimizer, criterion
        self.train_loader, self.val_loader = train_loader, val_loader
        self._train = _Cycle(train_loader, "train_loader")
        self._val = _Cycle(val_loader, "val_loader")
        self.step_count = 0
        self.history: list[dict[str, float]] = []
        self._hyperparams_requires_grad_(False)

    # --- HippoTrainer's methods ---------------------------------------------------------
    def _hyperparams_requires_grad_(self, requires_grad: bool = True) -> None:
        for h in self.hyperparams.values():
            h.requires_grad_(requires_grad)

    def zero_grad(self) -> None:
        """Zero the model's gradients (``optimizer.zero_grad()``)."""
        self.optimizer.zero_grad()

    def zero_hyper_grad(self) -> None:
        for h in self.hyperparams.values():
            if h.grad is not None:
                h.grad.zero_()

    def evaluate(self) -> tuple[Tensor, Tensor]:
        """Mean training and validation loss over the loaders (no gradients)."""
        with torch.no_grad():
            out = []
            for loader in (self.train_loader, self.val_loader):
                total, n = 0.0, 0
                for inputs, targets in loader:
                    total = total + self.criterion(self.model(inputs), targets)
                    n += 1
                out.append(torch.as_tensor(total) / max(n, 1))
        return out[0], out[1]

    def step(self, train_loss: Tensor | None = None) -> None:
        """An optimizer step; every ``inner_steps`` steps, a hyper-step."""
        self.optimizer.step()
        self.step_count += 1
        if self.step_count % self.inner_steps == 0:
            self.hyper_step(train_loss)

    def hyper_step(self, train_loss: Tensor | None = None) -> None:
        """Compute the hypergradient on fresh batches and take ``h -= hyper_lr * grad``."""
        self._hyperparams_requires_grad_(True)
        try:
            grads = self.hyper_grad(self._train.next(), self._val.next())
        finally:
            self._hyperparams_requires_grad_(False)
        for name, g in zip(self.hyperparams, grads):
            if not bool(torch.isfinite(g).all()):
                raise NonFiniteHypergradientError(
                    f"The hypergradient of hyperparams[{name!r}] is not finite; nothing was "
                    "updated."
                )
        with torch.no_grad():
            for h, g in zip(self.hyperparams.values(), grads):
                h.sub_(self.hyper_lr * g)
        norm = math.sqrt(sum(float(g.to(wide_dtype(g.device)).pow(2).sum()) for g in grads))
        self.history.append({"step": self.step_count, "hypergrad_norm": norm})

    # --- the core ---------------------------------------------------------------------
    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _params(self) -> dict[str, Tensor]:
        return {k: p.detach() for k, p in self.model.named_parameters() if p.requires_grad}

    def _loss_fn(self, batch: Any):
        inputs, targets = batch

        def loss(params: dict[str, Tensor], hparams: Any) -> Tensor:
            buffers = {k: b.clone() for k, b in self.model.named_buffers()}
            # The criterion may read the model's weights (an L2 penalty): it runs inside the
            # same reparametrization as the forward pass.
            with _reparametrize_module(self.model, {**buffers, **params}):
                return self.criterion(self.model(inputs), targets)

        return loss

    def _solver(self) -> Solver:
        raise NotImplementedError

    def hyper_grad(self, train_batch: Any, val_batch: Any) -> list[Tensor]:
        """Hypergradient for each hyperparameter (implicit differentiation)."""
        hyper = implicit(
            self._loss_fn(train_batch),
            self._loss_fn(val_batch),
            self._params(),
            tuple(self.hyperparams.values()),
            self._solver(),
            hparams_by_reference=True,
        )
        return list(hyper)


class T1T2(HyperOptimizer):
    """One-step look-ahead (Luketina et al., 2016): ``H^{-1} ~ lr * I``."""

    def _solver(self) -> Solver:
        return Identity(self._lr())


class Neumann(HyperOptimizer):
    """IFT with a Neumann series of ``num_terms`` products, ``alpha = lr`` (Lorraine et al.)."""

    def __init__(self, *args: Any, num_terms: int = 1, **kwargs: Any):
        self.num_terms = _positive_int(num_terms, "num_terms")
        super().__init__(*args, **kwargs)

    def _solver(self) -> Solver:
        return _NeumannSolver(iters=self.num_terms, alpha=self._lr())


class HOAG(HyperOptimizer):
    """HOAG (Pedregosa, 2016): CG until ``||r||^2 < epsilon`` or ``cg_max_iter`` products,
    warm-started from the previous hyper-step's solution."""

    def __init__(self, *args: Any, epsilon: float = 1e-4, cg_max_iter: int = 10, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.epsilon = _positive_float(epsilon, "epsilon")
        self.cg_max_iter = _positive_int(cg_max_iter, "cg_max_iter")
        self._x: Tensor | None = None

    def _solver(self) -> Solver:
        return CG(maxiter=self.cg_max_iter, tol=0.0, atol=math.sqrt(self.epsilon))

    def hyper_grad(self, train_batch: Any, val_batch: Any) -> list[Tensor]:
        hyper, info = implicit(
            self._loss_fn(train_batch),
            self._loss_fn(val_batch),
            self._params(),
            tuple(self.hyperparams.values()),
            self._solver(),
            x0=self._x,
            return_info=True,
            hparams_by_reference=True,
        )
        self._x = info.solution
        return list(hyper)


class DRMAD(HyperOptimizer):
    """DrMAD (Fu et al., 2016) over ``T`` SGD steps taken inside the hyper-step.

    The hyper-step trains ``T`` more steps with the model's optimizer (as HippoTrainer's
    DRMAD does), then runs the reverse pass of SGD,
    ``a <- a - lr (H_t + weight_decay I) a``, ``dphi -= lr (d_phi grad f_t)^T a``, at the
    interpolated weights ``theta_t = (1 - t/T) theta_0 + (t/T) theta_T``. ``weight_decay``
    is the inner L2 coefficient of that SGD model (0 when the penalty is in ``criterion``).
    Momentum of the real optimizer is ignored in the reverse pass (the approximation
    DrMAD makes anyway).
    """

    def __init__(self, *args: Any, weight_decay: float = 0.0, T: int = 10, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.weight_decay = _positive_float(weight_decay, "weight_decay", allow_zero=True)
        self.T = _positive_int(T, "T")

    def hyper_grad(self, train_batch: Any, val_batch: Any) -> list[Tensor]:
        theta0 = {k: v.clone() for k, v in self._params().items()}
        batches = [train_batch] + [self._train.next() for _ in range(self.T - 1)]
        for inputs, targets in batches:  # the T training steps
            self.optimizer.zero_grad()
            self.criterion(self.model(inputs), targets).backward()
            self.optimizer.step()
        self.optimizer.zero_grad()
        thetaT = {k: v.clone() for k, v in self._params().items()}
        lr = self._lr()
        hyper = list(self.hyperparams.values())
        # adjoint at theta_T: gradient of the validation loss
        names = list(thetaT)
        leaves = [thetaT[k].requires_grad_(True) for k in names]
        with torch.enable_grad():
            val = self._loss_fn(val_batch)(dict(zip(names, leaves)), None)
            grads = torch.autograd.grad(val, leaves + hyper, allow_unused=True)
        a = torch.cat(
            [
                (torch.zeros_like(t) if g is None else g).reshape(-1)
                for t, g in zip(leaves, grads[: len(leaves)])
            ]
        )
        total = [
            torch.zeros_like(h) if g is None else g.detach().clone()
            for h, g in zip(hyper, grads[len(leaves) :])
        ]
        for t in range(self.T - 1, -1, -1):
            beta = t / self.T
            point = {k: ((1 - beta) * theta0[k] + beta * thetaT[k].detach()) for k in names}
            op = HessianOperator(
                self._loss_fn(batches[t]), point, tuple(hyper), hparams_by_reference=True
            )
            mixed = op.mixed(a)
            for acc, m in zip(total, mixed):
                if m is not None:
                    acc.sub_(lr * m)
            a = a - lr * (op.matvec(a) + self.weight_decay * a)
            op.release()
        return total
