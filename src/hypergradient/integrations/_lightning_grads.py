"""The step's gradients under manual optimization, for T1T2's step check.

At every hyper-step T1T2 compares the step's ``.grad`` with ``train_loss``'s gradient at the
step's start (:mod:`hypergradient.hyperoptimizer.step_grads`): clipping, a term outside
``train_loss``, or gradients accumulated over other batches make its hypergradient another
step's, and the check warns (``on_divergence="skip"``: skips). The callback hands the step
to the driver after ``training_step``, which under manual optimization often sets the
gradients to None after its ``opt.step()`` (Lightning's accumulation recipe: step and
``zero_grad`` every N batches). The check then had no ``.grad`` to read, and passed a step
accumulated over two batches: its hypergradient 14% off the accumulated step's (-0.0560
applied for an exact -0.0649), with no warning, where automatic optimization warned.

:class:`StepGrads` notes, in a pre-step hook of the optimizer, the gradient tensors each step
that ends with a T1T2 hyper-step uses (references: no copy), and :meth:`StepGrads.shown`
puts them back as ``.grad`` during the hyper-step where the module has set them to None
since (restored after). A ``.grad`` still there is left as it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..hyperoptimizer import HyperOptimizer
from ..hyperoptimizer.step_checks import ends_window
from ..methods import T1T2

__all__ = ["StepGrads", "shown"]


class StepGrads:
    """The gradients the optimizer's steps used, for a T1T2 ``hopt`` (see the module)."""

    def __init__(self, hopt: HyperOptimizer, optimizer: torch.optim.Optimizer):
        self.hopt = hopt
        self.kept: list[Tensor | None] | None = None
        self.handle = optimizer.register_step_pre_hook(self._pre_step)

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        hopt = self.hopt
        closing = isinstance(hopt.method, T1T2) and ends_window(hopt)
        self.kept = [p.grad for p in hopt.view.params] if closing else None

    @contextlib.contextmanager
    def shown(self) -> Iterator[None]:
        """While the step is handed over: each trained parameter's ``.grad`` the step used,
        where the module has set it to None since; as the module left them afterwards."""
        kept, self.kept = self.kept, None
        params = self.hopt.view.params
        if kept is None or len(kept) != len(params):
            yield
            return
        missing = [(p, g) for p, g in zip(params, kept) if p.grad is None and g is not None]
        for p, g in missing:
            p.grad = g
        try:
            yield
        finally:
            for p, _ in missing:
                p.grad = None

    def close(self) -> None:
        """Remove the hook."""
        self.handle.remove()
        self.kept = None

    @staticmethod
    def attach(old: StepGrads | None, hopt: HyperOptimizer, optimizer: Any, module: Any) -> Any:
        """A :class:`StepGrads` when ``module`` optimizes manually (``old``'s hook removed);
        None under automatic optimization (Lightning zeroes the gradients at the next
        batch's start: the check reads them)."""
        if old is not None:
            old.close()
        manual = not getattr(module, "automatic_optimization", True)
        return StepGrads(hopt, optimizer) if manual else None


def shown(grads: StepGrads | None) -> contextlib.AbstractContextManager[None]:
    """``grads.shown()``, or nothing to do without a :class:`StepGrads`."""
    return grads.shown() if grads is not None else contextlib.nullcontext()
