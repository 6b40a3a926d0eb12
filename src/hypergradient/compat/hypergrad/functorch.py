"""The part of ``functorch`` that hypergrad 0.0.1 and its examples use, on ``torch.func``.

``functorch`` became ``torch.func`` in PyTorch 2.0; its ``make_functional`` is deprecated
and slated for removal. Code written for hypergrad can replace ``import functorch`` with
``from hypergradient.compat.hypergrad import functorch`` and run on PyTorch builds without
it. ``grad``, ``grad_and_value``, ``jvp``, ``vjp``, ``vmap``, ``jacrev``, ``jacfwd`` and
``hessian`` are ``torch.func``'s; :func:`make_functional` is rebuilt on
``torch.func.functional_call``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, grad_and_value, hessian, jacfwd, jacrev, jvp, vjp, vmap

from ..._vocab import ArgumentTypeError, as_bool

__all__ = [
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


def make_functional(
    model: nn.Module, disable_autograd_tracking: bool = False
) -> tuple[Callable[..., Any], tuple[Tensor, ...]]:
    """``(fmodel, params)`` with ``fmodel(params, *args, **kwargs) == model(*args, **kwargs)``
    evaluated at ``params`` instead of the module's own parameters.

    As ``functorch.make_functional``: ``params`` is the tuple of ``model.parameters()``
    (detached, sharing storage, with ``disable_autograd_tracking=True``). Unlike it, a
    module with buffers is accepted; its own buffers are used (BatchNorm in training mode
    updates them).

    Args:
        model: the module.
        disable_autograd_tracking: return detached parameters.
    """
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
    detach = as_bool(disable_autograd_tracking, "disable_autograd_tracking")
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    params = tuple(p.detach() if detach else p for _, p in named)

    def fmodel(new_params: Any, *args: Any, **kwargs: Any) -> Any:
        new_params = tuple(new_params)
        if len(new_params) != len(names):
            raise ValueError(
                f"The functional model takes {len(names)} parameter tensors ({names}), got "
                f"{len(new_params)}."
            )
        return torch.func.functional_call(model, dict(zip(names, new_params)), args, kwargs)

    return fmodel, params
