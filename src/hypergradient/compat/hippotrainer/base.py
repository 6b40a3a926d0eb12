"""HippoTrainer 1.0.0's ``HyperOptimizer``: the driver every method class shares."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from ..._tree import wide_dtype
from ..._vocab import (
    ArgumentTypeError,
    HypergradientWarning,
    NonFiniteHypergradientError,
    require_finite,
)
from .._watch import RunWatch
from ._autograd import criterion_loss, grads_or_zeros, leaves_reached, vjp_or_zeros
from ._checks import (
    as_hyper_lr,
    check_hyperparams,
    check_optimizer,
    check_setup,
    find_stale,
    stale_capture_message,
    trained_lr,
    unused_in_hippotrainer_terms,
    unused_message,
)
from ._loaders import LoaderCycles
from ._settings import Setting, at_least_one

__all__ = ["HyperOptimizer"]

_PACKAGE = __name__.rsplit(".", 1)[0]


def _is_loss(value: Any) -> bool:
    return isinstance(value, Tensor) and value.numel() == 1


class HyperOptimizer(LoaderCycles):
    """HippoTrainer's base class: a hyper-step every ``inner_steps`` optimizer steps.

    The hyperparameters enter through ``model`` or ``criterion``, which hold them by
    reference; the same ``criterion`` scores training and validation batches. A hyper-step
    computes the hypergradient on one fresh training batch (the model in its current mode)
    and one fresh validation batch (in eval mode, as ``evaluate()``), without updating the
    model's buffers, and takes ``h <- h - hyper_lr * hypergradient``. Subclasses implement
    HippoTrainer's hook ``hyper_grad(train_loss, val_loss)`` (this base class raises
    ``NotImplementedError``, as HippoTrainer's does); the library's classes (:class:`T1T2`,
    :class:`Neumann`, :class:`HOAG`, :class:`DRMAD`) compute it with this package's solvers.

    Args:
        hyperparams: ``{name: tensor}``, floating-point leaf tensors read by ``model`` or
            ``criterion``. A value derived from one (``theta.exp()``) must be computed
            inside the criterion's ``forward``; one computed once beforehand is refused.
        hyper_lr: step size, a number >= 0 or a tensor of them broadcasting to every
            hyperparameter.
        inner_steps: optimizer steps between hyper-steps (>= 1).
        model, optimizer, train_loader, val_loader, criterion: the training set-up, all
            required; loaders yield ``(inputs, targets)``.

    Raises:
        ArgumentTypeError / ValueError: bad arguments, before anything is changed.
    """

    _hooks: ClassVar[tuple[str, ...]] = ("hyper_grad",)
    inner_steps = Setting(at_least_one)  # checked at every assignment

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
        check_setup(model, optimizer, train_loader, val_loader, criterion)
        model, optimizer = cast(nn.Module, model), cast(torch.optim.Optimizer, optimizer)
        check_hyperparams(hyperparams, model, optimizer)
        check_optimizer(hyperparams, optimizer)
        stale = find_stale(hyperparams, model, criterion, train_loader)
        if stale is not None:
            raise ValueError(stale_capture_message(*stale))
        self.hyperparams = hyperparams
        self.hyper_lr = hyper_lr
        self.inner_steps = inner_steps
        self.model: nn.Module = model
        self.optimizer = optimizer
        self.criterion = criterion
        self.train_loader = cast(Iterable[Any], train_loader)
        self.val_loader = cast(Iterable[Any], val_loader)
        self.step_count = 0
        self._watch = RunWatch()
        self.history: list[dict[str, float]] = []
        self._hyperparams_requires_grad_(False)

    @property
    def hyper_lr(self) -> float | Tensor:
        """Step size of the hyperparameters, validated when set and when read (a tensor is
        read by reference, as HippoTrainer's: a schedule changing it in place applies)."""
        return as_hyper_lr(self._hyper_lr, self.hyperparams)

    @hyper_lr.setter
    def hyper_lr(self, value: float | Tensor) -> None:
        as_hyper_lr(value, self.hyperparams)
        self._hyper_lr = value

    # --- HippoTrainer's public methods ---------------------------------------------------
    def _hyperparams_requires_grad_(self, requires_grad: bool = True) -> None:
        for h in self.hyperparams.values():
            h.requires_grad_(requires_grad)

    def zero_grad(self) -> None:
        """Zero the model's gradients (``optimizer.zero_grad()``)."""
        self.optimizer.zero_grad()

    def zero_hyper_grad(self) -> None:
        """Zero the hyperparameters' ``.grad`` (those that have one)."""
        for h in self.hyperparams.values():
            if h.grad is not None:
                h.grad.zero_()

    def evaluate(self) -> tuple[Tensor, Tensor]:
        """Mean criterion over ``train_loader`` (train mode) and ``val_loader`` (eval mode).

        Differentiable, as HippoTrainer's: the losses keep their graphs to the model's
        parameters and to the hyperparameters that require grad. Wrap the call in
        ``torch.no_grad()`` when only the values are needed. Each submodule's mode is restored.

        Returns:
            ``(train_loss, val_loss)``, scalar tensors.
        """
        modes = [(m, m.training) for m in self.model.modules()]
        try:
            self.model.train()
            train = mean_loss(self.model, self.criterion, self.train_loader, "train_loader")
            self.model.eval()
            val = mean_loss(self.model, self.criterion, self.val_loader, "val_loader")
        finally:
            for m, training in modes:
                m.training = training
        return train, val

    def hyper_grad(self, train_loss: Tensor, val_loss: Tensor) -> list[Tensor]:
        """HippoTrainer's hook: the hypergradient of each hyperparameter, as a list.

        ``train_loss`` and ``val_loss`` are the criterion on a training and on a validation
        batch, computed with the hyperparameters requiring grad; implementations
        differentiate their graphs with respect to ``model.parameters()`` and the
        hyperparameters.
        """
        raise NotImplementedError

    def step(self, train_loss: Tensor | None = None) -> None:
        """``optimizer.step()``; every ``inner_steps`` steps, ``hyper_step`` with the
        hyperparameters requiring grad (as HippoTrainer, for a subclass's own ``hyper_step``).

        ``train_loss`` is accepted for HippoTrainer's call shape and not used.
        """
        self.optimizer.step()
        self._watch.record(self.step_count, self.inner_steps, self._named_params()[1], train_loss)
        self.step_count += 1
        if self.step_count % self.inner_steps == 0:
            self._watch.check(type(self).__name__, self.step_count)  # a diverging run warns
            with self._requiring_grad():
                self.hyper_step(train_loss)

    def hyper_step(self, train_loss: Tensor | None = None) -> None:
        """Hypergradient on a fresh training and validation batch, then ``h -= hyper_lr * g``.

        Raises:
            NonFiniteHypergradientError: a non-finite quantity (named); nothing is updated.
        """
        grads = self.hyper_grad_on_batches(self._train.next(), self._val.next())
        self._apply(grads)

    # --- beyond HippoTrainer's API ----------------------------------------------------
    def hyper_grad_on_batches(self, train_batch: Any, val_batch: Any) -> list[Tensor]:
        """The hypergradient a hyper-step would take, on the given batches.

        The library's classes compute it with this package's methods and solvers; a
        subclass that overrides ``hyper_grad`` (or a helper it calls) gets the losses on
        these batches passed to its ``hyper_grad``, as in HippoTrainer. The
        hyperparameters' ``requires_grad`` is restored afterwards.

        Returns:
            One detached tensor per hyperparameter (the order of ``hyperparams``).
        """
        try:
            names = list(self.hyperparams)
            with self._requiring_grad(), _freed_graph_hint(), unused_in_hippotrainer_terms(names):
                if self._uses_builtin_hooks():
                    grads = self._builtin_hyper_grad(train_batch, val_batch)
                else:
                    grads = self.hyper_grad(*self._losses(train_batch, val_batch))
        except NonFiniteHypergradientError as exc:
            raise NonFiniteHypergradientError(
                f"{type(self).__name__}'s hyper-step after step {self.step_count} "
                "(inner_loss: criterion on a training batch, outer_loss: criterion on a "
                f"validation batch): {exc}",
                exc.quantity,
            ) from exc
        return checked_hypergradients(grads, self.hyperparams)

    # --- machinery ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _requiring_grad(self) -> Iterator[None]:
        """The hyperparameters require grad inside; their previous flags are restored."""
        previous = [h.requires_grad for h in self.hyperparams.values()]
        self._hyperparams_requires_grad_(True)
        try:
            yield
        finally:
            for h, r in zip(self.hyperparams.values(), previous):
                h.requires_grad_(r)

    def _builtin_hyper_grad(self, train_batch: Any, val_batch: Any) -> list[Tensor]:
        raise NotImplementedError

    def _uses_builtin_hooks(self) -> bool:
        """Whether this object's hooks are those of one of this package's classes."""
        owner: type[HyperOptimizer] = next(
            c for c in type(self).__mro__ if c.__module__.startswith(_PACKAGE)
        )
        if owner is HyperOptimizer:
            return False
        return all(getattr(type(self), n) is getattr(owner, n) for n in owner._hooks)

    def _losses(self, train_batch: Any, val_batch: Any) -> tuple[Tensor, Tensor]:
        """The hook's losses (graphs to the model's own parameters), as the hyper-step's."""
        params: dict[str, Tensor] = dict(self.model.named_parameters())
        train = criterion_loss(self.model, self.criterion, train_batch)(params, None)
        val = criterion_loss(self.model, self.criterion, val_batch, validation=True)(params, None)
        return train, val

    def _named_params(self) -> tuple[list[str], list[Tensor]]:
        """The trained parameters: those ``optimizer`` steps that require grad (a parameter
        left out of the optimizer is a constant of the inner problem, as a frozen one)."""
        stepped = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        named = [
            (k, p) for k, p in self.model.named_parameters() if p.requires_grad and id(p) in stepped
        ]
        return [k for k, _ in named], [p for _, p in named]

    def _params(self) -> dict[str, Tensor]:
        return {k: p.detach() for k, p in zip(*self._named_params())}

    def _loss(self, batch: Any, validation: bool = False) -> Any:
        return criterion_loss(self.model, self.criterion, batch, validation=validation)

    def _lr(self) -> float:
        return trained_lr(self.optimizer, self._named_params()[1])

    def _graph_hyper_grad(self, train_loss: Any, val_loss: Any, inverse: Any) -> list[Tensor]:
        """``d_phi g - (d_phi grad_theta f)^T inverse(grad_theta g, grad_theta f)`` on graphs."""
        hyper = list(self.hyperparams.values())
        _check_hook_inputs(train_loss, val_loss, self.hyperparams)
        names, params = self._named_params()
        v1 = grads_or_zeros(val_loss, params)
        labels = [f"model parameter {k!r}" for k in names]
        require_finite(v1, labels, "The gradient of val_loss with respect to", "Check val_loss.")
        d_train = grads_or_zeros(train_loss, params, create_graph=True)
        x = list(inverse(v1, d_train))
        require_finite(x, labels, "The inverse-Hessian-vector product at", "Add damping.")
        mixed, direct = vjp_or_zeros(d_train, hyper, x), grads_or_zeros(val_loss, hyper)
        _warn_unread(self.hyperparams, [train_loss, val_loss])  # as the core's path does
        return [(d - m).detach() for d, m in zip(direct, mixed)]

    def _deprecated_batches(self, train_batch: Any, val_batch: Any) -> list[Tensor]:
        warnings.warn(
            "hyper_grad(train_batch, val_batch) is deprecated: HippoTrainer's hook is "
            "hyper_grad(train_loss, val_loss). Use hyper_grad_on_batches(train_batch, "
            "val_batch) for the hypergradient on given batches.",
            DeprecationWarning,
            stacklevel=3,
        )
        return self.hyper_grad_on_batches(train_batch, val_batch)

    def _apply(self, grads: Sequence[Tensor]) -> None:
        """``h <- h - hyper_lr * g`` for all hyperparameters, or none if any is not finite."""
        new = descended(self.hyperparams, grads, self.hyper_lr)
        with torch.no_grad():
            for h, v in zip(self.hyperparams.values(), new):
                h.copy_(v)
        norm = math.sqrt(sum(float(g.to(wide_dtype(g.device)).pow(2).sum()) for g in grads))
        self.history.append({"step": self.step_count, "hypergrad_norm": norm})


@contextlib.contextmanager
def _freed_graph_hint() -> Iterator[None]:
    """Autograd's "backward through the graph a second time" in a hyper-step means a tensor
    computed once from a hyperparameter that the construction-time search did not reach."""
    try:
        yield
    except RuntimeError as exc:
        if "backward through the graph a second time" not in str(exc):
            raise
        raise ValueError(
            "A tensor read by the criterion (or the model) was computed once from a "
            "hyperparameter before training: its graph, differentiated once, is freed, and a "
            "value computed once is never tuned. Compute it inside the criterion's forward "
            "from the hyperparameter itself (e.g. `self.theta.exp()`). This hyper-step "
            "updated nothing."
        ) from exc


def _warn_unread(hyperparams: dict[str, Tensor], losses: list[Tensor]) -> None:
    """Warn for each hyperparameter the losses' graphs do not reach (its hypergradient is 0)."""
    for name, read in zip(hyperparams, leaves_reached(losses, list(hyperparams.values()))):
        if not read:
            warnings.warn(unused_message(name), HypergradientWarning, stacklevel=4)


def _check_hook_inputs(train_loss: Any, val_loss: Any, hyperparams: dict[str, Tensor]) -> None:
    for name, value in (("train_loss", train_loss), ("val_loss", val_loss)):
        if not _is_loss(value) or not value.is_floating_point():
            raise ArgumentTypeError(
                f"`{name}` must be a scalar loss tensor (criterion(model(inputs), targets)), "
                f"got {type(value).__name__}."
            )
        if not value.requires_grad:  # its products would all be zero
            raise ValueError(f"`{name}` carries no autograd graph (computed under no_grad?).")
    for name, h in hyperparams.items():
        if not h.requires_grad:
            raise ValueError(
                f"hyperparams[{name!r}] does not require grad, so the losses carry no graph to "
                "it: compute train_loss and val_loss after setting requires_grad_(True) on the "
                "hyperparameters (hyper_step does this)."
            )


def is_batch(value: Any) -> bool:
    """Whether a ``hyper_grad`` argument is a batch (the deprecated form), not a loss."""
    return not _is_loss(value)


def mean_loss(model: nn.Module, criterion: Any, loader: Iterable[Any], name: str) -> Tensor:
    """The mean of ``criterion(model(inputs), targets)`` over the batches of ``loader``."""
    total: Tensor | float = 0.0
    n = 0
    for inputs, targets in loader:
        total = total + criterion(model(inputs), targets)
        n += 1
    if n == 0:
        raise ValueError(f"`{name}` yields no batches.")
    return torch.as_tensor(total) / n


def checked_hypergradients(grads: Any, hyperparams: dict[str, Tensor]) -> list[Tensor]:
    """``grads`` as one detached tensor per hyperparameter, shaped like it (else ValueError)."""
    grads = list(grads)
    if len(grads) != len(hyperparams):
        raise ValueError(
            f"hyper_grad returned {len(grads)} tensor(s) for {len(hyperparams)} "
            "hyperparameter(s); it must return one per hyperparameter, in order."
        )
    for (name, h), g in zip(hyperparams.items(), grads):
        if not isinstance(g, Tensor) or g.shape != h.shape:
            raise ValueError(
                f"hyper_grad returned {getattr(g, 'shape', type(g).__name__)} for "
                f"hyperparams[{name!r}] of shape {tuple(h.shape)}."
            )
    return [g.detach() for g in grads]


def descended(
    hyperparams: dict[str, Tensor], grads: Sequence[Tensor], hyper_lr: float | Tensor
) -> list[Tensor]:
    """``h - hyper_lr * g`` per hyperparameter; raises if a gradient or a result is not finite."""
    names = [f"hyperparams[{k!r}]" for k in hyperparams]
    fix = "Nothing was updated."
    require_finite(grads, names, "The hypergradient of", fix)
    new = []
    for h, g in zip(hyperparams.values(), grads):
        lr = hyper_lr.to(h.device) if isinstance(hyper_lr, Tensor) else hyper_lr
        new.append(h.detach() - lr * g.to(h.dtype))
    require_finite(new, names, "The updated value of", fix + " Lower hyper_lr.")
    return new
