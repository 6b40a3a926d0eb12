"""Optimizers: differentiable functional ones for trajectory hypergradients
(:func:`sgd`, :func:`adam`), and ``torch.optim`` optimizers that adapt their learning rate
online by hypergradient descent (:class:`SGDHD`, :class:`AdamHD`; Baydin et al., 2018)."""

from .functional import SGD, Adam, FunctionalOptimizer, adam, from_torch, sgd
from .hd import SGDHD, AdamHD

__all__ = ["SGD", "Adam", "AdamHD", "FunctionalOptimizer", "SGDHD", "adam", "from_torch", "sgd"]
