"""Optimizers: differentiable functional ones for trajectory hypergradients, and
``torch.optim`` optimizers that adapt their learning rate online (hypergradient descent)."""

from .functional import SGD, Adam, FunctionalOptimizer, adam, sgd

__all__ = ["SGD", "Adam", "FunctionalOptimizer", "adam", "sgd"]

try:  # hypergradient-descent optimizers (Baydin et al., 2018)
    from .hd import SGDHD, AdamHD  # noqa: F401

    __all__ += ["SGDHD", "AdamHD"]
except ImportError:  # pragma: no cover - while hd.py is being written
    pass
