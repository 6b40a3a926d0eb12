"""Where users train, search and watch: Lightning, Optuna, TensorBoard, CSV, progress bars.

- :class:`TensorBoardLogger`, :class:`CSVLogger` (:mod:`.loggers`), :class:`ProgressBar`
  (:mod:`.progress`): sinks for ``HyperOptimizer(..., logger=...)``.
- :mod:`hypergradient.integrations.lightning`: :class:`~.lightning.HypergradientCallback`
  tunes hyperparameters of a ``LightningModule`` trained by an unmodified
  ``lightning.Trainer`` (imported on demand: needs ``lightning``).
- :mod:`hypergradient.integrations.optuna`: hybrid search, Optuna for the discrete choices
  and the starting values, hypergradient descent for the continuous hyperparameters inside
  each trial (imported on demand: needs ``optuna``).

``pip install 'hypergradient[integrations]'`` installs lightning, optuna and tensorboard.
"""

from .loggers import CSVLogger, TensorBoardLogger, record_scalars
from .progress import ProgressBar

__all__ = ["CSVLogger", "ProgressBar", "TensorBoardLogger", "record_scalars"]
