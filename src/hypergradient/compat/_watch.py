"""The inner run's divergence watch of ``hg.HyperOptimizer`` on the compat layers' loops.

HippoTrainer's loop steps the optimizer itself (``hyper_optimizer.step(loss)``) and
hypergrad's ``BaseSolver.run`` calls the user's ``inner_update``; with a learning rate
above ``2 / lambda_max`` the weights grow geometrically and every hyper-step differentiates
a run that trains nothing: the hyperparameters moved by 7e2 (HippoTrainer's T1T2), 6e194
(HOAG) and from 1 to 1.3e3 (a hypergrad solver with ``conjugate_gradient``) before anything
was said. :class:`RunWatch` records the parameter norm (and a training loss, when the loop
has one) at the last steps before each hyper-step and reads them with
:func:`hypergradient.hyperoptimizer.divergence.diagnose`, as the core driver does:
sustained growth warns, a non-finite value raises before anything changes.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any

import torch
from torch import Tensor

from .._vocab import HypergradientWarning, NonFiniteHypergradientError
from ..hyperoptimizer import divergence

__all__ = ["RunWatch"]


class RunWatch:
    """Parameter norms and training losses of the last steps before a hyper-step."""

    def __init__(self) -> None:
        self.norms: tuple[Tensor, ...] = ()
        self.losses: tuple[Tensor, ...] = ()

    def record(self, count: int, inner_steps: int, params: list[Tensor], loss: Any) -> None:
        """After the optimizer's step number ``count`` (0-based) of a loop."""
        params = [p for p in params if p.is_floating_point()]
        if not params or not divergence.due(count, inner_steps):
            return
        self.norms = divergence.push(self.norms, divergence.norm(params))
        if isinstance(loss, Tensor) and loss.numel() == 1:
            self.losses = divergence.push(self.losses, loss.detach().reshape(()))
        elif isinstance(loss, numbers.Real) and not isinstance(loss, bool):
            self.losses = divergence.push(self.losses, torch.tensor(float(loss)))

    def check(self, owner: str, step: int) -> bool:
        """Warn (finite growth: True) or raise (non-finite values) before the hyper-step."""
        found = divergence.diagnose(self.norms, self.losses)
        if found is None:
            return False
        finite, message = found
        where = f"{owner}, step {step}: "
        if not finite:
            raise NonFiniteHypergradientError(where + message + " Nothing was updated.")
        warnings.warn(
            where + message + " Its hypergradient is applied.", HypergradientWarning, stacklevel=4
        )
        return True
