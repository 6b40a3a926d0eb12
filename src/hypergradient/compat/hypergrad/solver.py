"""``hypergrad.solver`` 0.0.1: the bilevel training-loop skeleton, without ``functorch``.

A subclass implements ``inner_forward``, ``inner_update``, ``outer_forward`` and
``outer_update``; :meth:`BaseSolver.run` alternates ``num_iters`` inner updates with an
outer update every ``unroll_steps`` of them. The inner model is functional
(``self.inner_func(self.inner_params, input)``), from :func:`.functorch.make_functional`.
The hypergradient itself comes from ``approx_ihvp`` (``approx_hypergrad.conjugate_gradient``,
``neumann`` or ``nystrom``, which run on ``hg.implicit``).

The names of the release on PyPI (``f_model``, ``f_params``, ``f_optim_state``,
``functorch_requires_grad``, ``global_step``, ``inner_obj``/``outer_obj``, ``set_out_grad``;
the repository's head renamed them) work too, as aliases (:mod:`._release`).

Differences from hypergrad, all deliberate: ``inner_loader``/``outer_loader`` continue
through their loader (hypergrad restarted it at every ``next(...)``, so a list always gave
its first batch and a DataLoader a new epoch iterator each time); an empty loader raises
instead of looping forever; arguments are validated with messages.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import logging
import math
import statistics
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..._vocab import ArgumentTypeError, as_bool, as_int
from .._watch import RunWatch
from ._release import ReleaseNames, default_hook, released_device
from .functorch import make_functional
from .utils import Params

__all__ = ["BaseImplicitSolver", "BaseSolver", "ForwardOutput", "Recorder"]


class Recorder:
    """Accumulates named values: :meth:`flush` averages those since the last flush."""

    def __init__(self) -> None:
        self._tmp: dict[str, list[float]] = collections.defaultdict(list)
        self._archive: dict[str, list[float]] = collections.defaultdict(list)

    def add(self, name: str, value: float | Tensor) -> None:
        """Record ``value`` (a number or a one-element tensor) under ``name``."""
        if isinstance(value, Tensor):
            value = value.detach().cpu().item()
        self._tmp[name].append(value)
        self._archive[name].append(value)

    def flush(self) -> dict[str, float]:
        """The mean of each name's values since the last flush; then forget them."""
        out = {k: statistics.mean(v) for k, v in self._tmp.items()}
        self._tmp = collections.defaultdict(list)
        return out

    @property
    def archive(self) -> dict[str, list[float]]:
        """Every value recorded, by name (a copy)."""
        return self._archive.copy()


@dataclasses.dataclass
class ForwardOutput:
    """A loss and the model's output; unpacks as ``loss, output = forward_output``."""

    loss: Tensor
    output: Tensor

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.loss, self.output))


def _cycle(loader: Iterable[Any], device: torch.device, name: str) -> Iterator[list[Any]]:
    """Batches of ``loader`` forever (tensors moved to ``device``)."""
    passes = 0
    while True:
        empty = True
        for data in loader:
            empty = False
            yield [d.to(device, non_blocking=True) if isinstance(d, Tensor) else d for d in data]
        if empty:
            raise ValueError(_exhausted(name) if passes else f"`{name}` yields no batches.")
        passes += 1


def _exhausted(name: str) -> str:
    """The error for a loader that gave batches once and none when iterated again."""
    return (
        f"`{name}` yields no batches on its second pass: it is a one-pass iterator (a "
        "generator?); pass a re-iterable such as a list or a DataLoader."
    )


class BaseSolver(ReleaseNames, abc.ABC):
    """A bilevel problem's training loop: ``run()`` alternates inner and outer updates.

    Args:
        inner, outer: the inner model and the module holding the hyperparameters.
        inner_loader, outer_loader: iterables of batches (cycled).
        num_iters: inner updates in ``run()`` (>= ``unroll_steps``).
        unroll_steps: inner updates between outer updates (>= 1).
        inner_optimizer: e.g. ``functools.partial(diff_sgd, momentum=0, weight_decay=0,
            lr=0.1)``, called as ``(params, grads, state) -> (params, state)``.
        outer_optimizer: a ``torch.optim`` optimizer over ``outer.parameters()``.
        outer_patience_iters: inner updates before the first outer update.
        logger, log_freq: where and how often ``run()`` logs the recorder's means.
        inner_requires_grad, outer_requires_grad: whether the inner parameters track
            gradients and whether ``outer``'s parameters require grad.
        skip_sync_inner: do not copy the functional parameters back into ``inner``.
        device: default CUDA when available, else CPU (as hypergrad); the models are moved.
            Given by position where the release has it (after ``functorch_requires_grad``,
            in the head's flag's place), it is taken as ``device``.
        functorch_requires_grad: the released name of ``inner_requires_grad`` (overrides it).
    """

    def __init__(
        self,
        inner: nn.Module,
        outer: nn.Module,
        inner_loader: Iterable[Any],
        outer_loader: Iterable[Any],
        num_iters: int,
        unroll_steps: int,
        inner_optimizer: Optimizer | Callable[..., Any],
        outer_optimizer: Optimizer,
        outer_patience_iters: int = 0,
        logger: logging.Logger | None = None,
        log_freq: int = 100,
        inner_requires_grad: bool = False,
        outer_requires_grad: bool = False,
        skip_sync_inner: bool = False,
        device: torch.device | None = None,
        functorch_requires_grad: bool | None = None,
    ):
        self.check_objectives()
        outer_requires_grad, device = released_device(outer_requires_grad, device)
        if functorch_requires_grad is not None:  # the released name of inner_requires_grad
            inner_requires_grad = as_bool(functorch_requires_grad, "functorch_requires_grad")
        self._num_iters = as_int(num_iters, "num_iters", min=1)
        self._unroll_steps = as_int(
            unroll_steps, "unroll_steps", min=1, max=self._num_iters, hint=" (<= num_iters)"
        )
        self._outer_patience_iters = as_int(outer_patience_iters, "outer_patience_iters", min=0)
        self._log_freq = as_int(log_freq, "log_freq", min=1)
        for name, module in (("inner", inner), ("outer", outer)):
            if not isinstance(module, nn.Module):
                raise ArgumentTypeError(
                    f"`{name}` must be an nn.Module, got {type(module).__name__}."
                )
        self.device = (
            torch.device(device)
            if device is not None
            else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.inner = inner.to(self.device)
        self.outer = outer.to(self.device)
        self.outer.requires_grad_(as_bool(outer_requires_grad, "outer_requires_grad"))
        self._inner_loader = inner_loader
        self._outer_loader = outer_loader
        self._inner_iter: Iterator[list[Any]] | None = None
        self._outer_iter: Iterator[list[Any]] | None = None
        self.inner_optimizer = inner_optimizer
        self.outer_optimizer = outer_optimizer
        self.logger = logger or logging.getLogger(type(self).__name__.lower())
        self._inner_requires_grad = as_bool(inner_requires_grad, "inner_requires_grad")
        self._outer_requires_grad = outer_requires_grad
        self._skip_sync_inner = as_bool(skip_sync_inner, "skip_sync_inner")
        self.inner_func: Callable[..., Any] | None = None
        self.inner_params: Params | None = None
        self.inner_optim_state: Any = None
        self.reset_inner_model()
        self.recorder = Recorder()
        self._watch = RunWatch()
        self._inner_step = 0
        self._outer_step = 0
        self._global_step = 0

    @property
    def inner_step(self) -> int:
        """Inner updates taken."""
        return self._inner_step

    @property
    def outer_step(self) -> int:
        """Outer updates taken."""
        return self._outer_step

    def stdout_results(self, results: dict[str, float]) -> None:
        """Log ``results`` with the current step counts."""
        width = int(math.log10(self._num_iters))
        outer_width = int(math.log10(max(1, self._num_iters // self._unroll_steps)))
        out = f"[inner step {self.inner_step - 1:>{width}}] "
        out += f"(outer step {self.outer_step:>{outer_width}}) "
        out += " / ".join(f"{k}={v:.4f}" for k, v in results.items())
        self.logger.info(out.rstrip())

    @property
    def inner_loader(self) -> Iterator[list[Any]]:
        """An endless iterator over ``inner_loader``'s batches (one, continued across calls)."""
        if self._inner_iter is None:
            self._inner_iter = _cycle(self._inner_loader, self.device, "inner_loader")
        return self._inner_iter

    @property
    def outer_loader(self) -> Iterator[list[Any]]:
        """An endless iterator over ``outer_loader``'s batches (one, continued across calls)."""
        if self._outer_iter is None:
            self._outer_iter = _cycle(self._outer_loader, self.device, "outer_loader")
        return self._outer_iter

    def run(self) -> None:
        """``num_iters`` inner updates; after inner update ``i > 0`` with ``i`` a multiple of
        ``unroll_steps`` (and ``i >= outer_patience_iters``) an outer update,
        ``post_outer_update()`` and ``sync_inner()``; logs every ``log_freq`` updates."""
        for i in range(self._num_iters):
            self.inner_update()
            self._inner_step += 1
            params = [p for p in self.inner_params or () if isinstance(p, Tensor)]
            self._watch.record(i - 1, self._unroll_steps, params, None)
            if i > 0 and i >= self._outer_patience_iters and i % self._unroll_steps == 0:
                self._watch.check(type(self).__name__, i)  # a diverging inner run warns
                self.outer_update()
                self.post_outer_update()
                self.sync_inner()
                self._outer_step += 1
            if i > 0 and i % self._log_freq == 0:
                self.stdout_results(self.recorder.flush())
            self._global_step += 1

    def reset_inner_model(self) -> None:
        """(Re)build ``inner_func`` and ``inner_params`` from the ``inner`` module."""
        self.inner_func, self.inner_params = make_functional(
            self.inner, not self._inner_requires_grad
        )

    @default_hook
    def inner_forward(
        self, in_params: Params, out_params: Params, input: Tensor, target: Tensor
    ) -> Any:
        """The inner objective on a batch (a loss, or a :class:`ForwardOutput`); a subclass
        defines it, or ``inner_obj`` (the released name)."""
        return self.inner_obj(in_params, out_params, input, target)

    @abc.abstractmethod
    def inner_update(self) -> None:
        """One update of ``self.inner_params``."""

    @default_hook
    def outer_forward(
        self, in_params: Params, out_params: Params, input: Tensor, target: Tensor
    ) -> Any:
        """The outer objective on a batch (a loss, or a :class:`ForwardOutput`); a subclass
        defines it, or ``outer_obj`` (the released name)."""
        return self.outer_obj(in_params, out_params, input, target)

    @default_hook
    def inner_obj(
        self, in_params: Params, out_params: Params, input: Tensor, target: Tensor
    ) -> Any:
        """The released name of ``inner_forward``."""
        return self.inner_forward(in_params, out_params, input, target)

    @default_hook
    def outer_obj(
        self, in_params: Params, out_params: Params, input: Tensor, target: Tensor
    ) -> Any:
        """The released name of ``outer_forward``."""
        return self.outer_forward(in_params, out_params, input, target)

    @abc.abstractmethod
    def outer_update(self) -> None:
        """One update of ``self.outer``'s parameters."""

    def post_outer_update(self) -> None:  # noqa: B027 (an optional hook, as in hypergrad)
        """Clean-up after each outer update (nothing by default)."""

    def sync_inner(self) -> None:
        """Copy the functional inner parameters into the ``inner`` module."""
        if not self._skip_sync_inner:
            with torch.no_grad():
                for p, f_p in zip(self.inner.parameters(), self.inner_params or ()):
                    p.copy_(f_p)


class BaseImplicitSolver(BaseSolver):
    """:class:`BaseSolver` whose outer update uses an implicit hypergradient ``approx_ihvp``.

    Args:
        approx_ihvp: ``(inner_obj, outer_obj, in_params, out_params) -> hypergradient``,
            e.g. ``functools.partial(approx_hypergrad.nystrom, rank=5, rho=0.1)``.
        The others as :class:`BaseSolver` (``outer_requires_grad`` is False).
    """

    def __init__(
        self,
        inner: nn.Module,
        outer: nn.Module,
        inner_loader: Iterable[Any],
        outer_loader: Iterable[Any],
        approx_ihvp: Callable[..., Params],
        num_iters: int,
        unroll_steps: int,
        inner_optimizer: Optimizer | Callable[..., Any],
        outer_optimizer: Optimizer,
        outer_patience_iters: int = 0,
        logger: logging.Logger | None = None,
        log_freq: int = 100,
        inner_requires_grad: bool = False,
        skip_sync_inner: bool = False,
        device: torch.device | None = None,
        functorch_requires_grad: bool | None = None,
    ):
        skip_sync_inner, device = released_device(skip_sync_inner, device)
        super().__init__(
            inner,
            outer,
            inner_loader,
            outer_loader,
            num_iters,
            unroll_steps,
            inner_optimizer,
            outer_optimizer,
            outer_patience_iters,
            logger,
            log_freq,
            inner_requires_grad,
            outer_requires_grad=False,
            skip_sync_inner=skip_sync_inner,
            device=device,
            functorch_requires_grad=functorch_requires_grad,
        )
        self.approx_ihvp = approx_ihvp

    @property
    def outer_grad(self) -> Iterator[Tensor | None]:
        """The ``.grad`` of each of ``outer``'s parameters."""
        for p in self.outer.parameters():
            yield p.grad

    @outer_grad.setter
    def outer_grad(self, grads: Params) -> None:
        """Add ``grads`` to the ``.grad`` of ``outer``'s parameters (set where None)."""
        for p, g in zip(self.outer.parameters(), grads):
            p.grad = g if p.grad is None else p.grad + g

    def set_out_grad(self, grads: Params) -> None:
        """The released name of the ``outer_grad`` setter: add ``grads`` to the ``.grad``."""
        self.outer_grad = grads
