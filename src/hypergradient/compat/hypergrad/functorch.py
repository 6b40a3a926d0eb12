"""The part of ``functorch`` that hypergrad 0.0.1 and its examples use, on ``torch.func``.

``functorch`` became ``torch.func`` in PyTorch 2.0; its ``make_functional`` is deprecated
and slated for removal. Code written for hypergrad can replace ``import functorch`` with
``from hypergradient.compat.hypergrad import functorch`` and run on PyTorch builds without
it. ``grad``, ``grad_and_value``, ``jvp``, ``vjp``, ``vmap``, ``jacrev``, ``jacfwd`` and
``hessian`` are ``torch.func``'s; :func:`make_functional` is rebuilt on
``torch.func.functional_call``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, grad_and_value, hessian, jacfwd, jacrev, jvp, vjp, vmap

from ..._vocab import ArgumentTypeError, as_bool

__all__ = [
    "FunctionalModule",
    "grad",
    "grad_and_value",
    "hessian",
    "jacfwd",
    "jacrev",
    "jvp",
    "make_functional",
    "vjp",
    "vmap",
]


class FunctionalModule(nn.Module):
    """``fmodel(params, *args, **kwargs)``: ``model`` evaluated at ``params``.

    As ``functorch``'s: an ``nn.Module`` with its own train/eval mode, which starts as the
    model's modes at :func:`make_functional` and changes only through ``fmodel.train()`` /
    ``fmodel.eval()`` (functorch runs a copy of the model; here each call runs the model
    itself in those modes and then puts the model's own modes back). It has no parameters
    of its own (``fmodel.parameters()`` is empty, as functorch's).
    """

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.stateless = [model]  # in a list: not a registered submodule
        self.names = names
        self.modes = [m.training for m in model.modules()]
        self.training = model.training

    def train(self, mode: bool = True) -> FunctionalModule:
        """Set the mode of every submodule of the functional model (not of ``model``)."""
        self.training = as_bool(mode, "mode")
        self.modes = [self.training] * len(self.modes)
        return self

    def forward(self, new_params: Any, *args: Any, **kwargs: Any) -> Any:
        new_params = tuple(new_params)
        if len(new_params) != len(self.names):
            raise ValueError(
                f"The functional model takes {len(self.names)} parameter tensors "
                f"({self.names}), got {len(new_params)}."
            )
        model = self.stateless[0]
        modules = list(model.modules())
        own = [m.training for m in modules]
        for m, mode in zip(modules, self.modes):
            m.training = mode
        try:
            return torch.func.functional_call(
                model, dict(zip(self.names, new_params)), args, kwargs
            )
        finally:
            for m, mode in zip(modules, own):
                m.training = mode


def make_functional(
    model: nn.Module, disable_autograd_tracking: bool = False
) -> tuple[FunctionalModule, tuple[Tensor, ...]]:
    """``(fmodel, params)`` with ``fmodel(params, *args, **kwargs) == model(*args, **kwargs)``
    evaluated at ``params`` instead of the module's own parameters.

    As ``functorch.make_functional``: ``params`` is a tuple of copies of
    ``model.parameters()`` (``nn.Parameter`` objects unrelated to the model's: updating one in
    place changes neither the model nor the ``params`` of another call; they require grad
    as the model's do, or not with ``disable_autograd_tracking=True``) and ``fmodel`` a
    :class:`FunctionalModule` (``fmodel.eval()`` / ``fmodel.train()`` switch its mode, e.g.
    dropout off for a test pass). Unlike it, a module with buffers is accepted; its own
    buffers are used (BatchNorm in training mode updates them).

    Args:
        model: the module.
        disable_autograd_tracking: return detached parameters.
    """
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
    detach = as_bool(disable_autograd_tracking, "disable_autograd_tracking")
    named = list(model.named_parameters())
    # copies, as functorch's (of a deep copy of the model): views of the model's storage
    # would let an in-place update of `params` move the model, and `params` of another call
    params = tuple(
        nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad and not detach)
        for _, p in named
    )
    return FunctionalModule(model, [n for n, _ in named]), params
