"""The hyper-optimizer: a thin driver (:class:`HyperOptimizer`) over small collaborators.

- :class:`ModelView` (``model.py``): the model, trained vs frozen parameters, DDP
  unwrapping, functional calls of the user's losses (buffers are copies).
- :class:`HyperParameters` (``hparams.py``): names, constraints, domain checks, links of
  inner-optimizer settings.
- :class:`TrajectoryWindow` (``window.py``): the steps trajectory methods replay.
- :class:`BatchSampler` (``sampler.py``): validation and training batches.
- :class:`History`, :class:`HyperStepRecord` (``history.py``): bounded records, logging sink.
- :class:`HoldoutGuard` (``holdout.py``): a held-out split scored at every hyper-step, the
  best hyperparameters by its score, early stopping of the hyper-steps.
"""

from ..constraints import HyperparameterDomainError
from .driver import HyperOptimizer
from .history import History, HyperStepRecord
from .holdout import HoldoutGuard
from .hparams import HyperParameters
from .model import ModelView
from .sampler import BatchSampler
from .window import TrajectoryWindow

__all__ = [
    "BatchSampler",
    "History",
    "HoldoutGuard",
    "HyperOptimizer",
    "HyperParameters",
    "HyperStepRecord",
    "HyperparameterDomainError",
    "ModelView",
    "TrajectoryWindow",
]
