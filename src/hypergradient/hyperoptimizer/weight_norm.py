"""Weight-normalized layers and second-order products: a warning at construction.

torch's fused weight norm (``torch._weight_norm``, behind
``torch.nn.utils.parametrizations.weight_norm`` and the legacy ``nn.utils.weight_norm`` with
``dim`` the first or the last axis) has a double backward that treats the norm ``||v||`` as
a constant: the ``v``-``v`` block of every Hessian-vector product is wrong (25 to 63 %
relative on a 4x5 ``nn.Linear`` in float64, torch 2.13), while gradients are right.
Implicit methods (their Hessian), ``Unrolled``, ``DrMAD`` and ``ForwardMode`` (the
Jacobians of the steps) would return wrong hypergradients without any error; central
differences of gradients (``hvp="first_order"``) are right. ``T1T2`` needs only the mixed
product, which does not go through that block.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from .._vocab import HypergradientWarning
from ..methods import T1T2, Method

__all__ = ["warn_fused_weight_norm"]


def _fused(dim: int, v: torch.Tensor) -> bool:
    """Whether ``torch._weight_norm(v, g, dim)`` takes the fused kernel (``dim=-1``: the norm
    over the whole tensor, composite; half precision: composite)."""
    if dim == -1 or v.dtype in (torch.float16, torch.bfloat16):
        return False
    return dim == 0 or dim == v.dim() - 1


def fused_weight_norms(module: nn.Module) -> list[str]:
    """The names of the submodules whose weight norm takes the fused kernel."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.weight_norm import WeightNorm

    kind = getattr(torch.nn.utils.parametrizations, "_WeightNorm", None)
    found = []
    for name, m in module.named_modules():
        for hook in m._forward_pre_hooks.values():  # legacy nn.utils.weight_norm
            if isinstance(hook, WeightNorm) and _fused(hook.dim, getattr(m, hook.name + "_v")):
                found.append(name)
        if kind is None or not parametrize.is_parametrized(m):
            continue
        for tensor, plist in m.parametrizations.items():
            for p in plist:
                if isinstance(p, kind) and _fused(p.dim, plist.original1):
                    found.append(f"{name}.{tensor}" if name else tensor)
    return found


@functools.cache
def fused_double_backward_is_wrong() -> bool:
    """Whether this torch's fused weight norm has the wrong double backward: one
    Hessian-vector product on a 3x2 ``v`` against the composite formula's (float64)."""
    gen = torch.Generator().manual_seed(0)
    v, g, u, c = (torch.randn(3, 2, generator=gen, dtype=torch.float64) for _ in range(4))
    products = []
    for fused in (True, False):
        leaf = v.clone().requires_grad_(True)
        w = (
            torch._weight_norm(leaf, g[:, :1], 0)
            if fused
            else leaf * g[:, :1] / leaf.norm(dim=1, keepdim=True)
        )
        (grad,) = torch.autograd.grad((c * w.tanh()).sum(), leaf, create_graph=True)
        products.append(torch.autograd.grad((grad * u).sum(), leaf)[0])
    return not torch.allclose(products[0], products[1], rtol=1e-8, atol=1e-10)


def warn_fused_weight_norm(module: nn.Module | None, method: Method) -> None:
    """Warn when a method whose products go through ``H`` meets a fused weight norm."""
    if module is None or isinstance(method, T1T2) or getattr(method, "hvp", None) == "first_order":
        return
    found = fused_weight_norms(module)
    if found and fused_double_backward_is_wrong():
        warnings.warn(
            f"weight norm in {', '.join(found[:3])}{' ...' if len(found) > 3 else ''}: torch's "
            "double backward of torch._weight_norm treats the norm as a constant, so "
            f"{type(method).__name__}'s second-order products (and hypergradient) are wrong "
            "for these layers. Pass hvp='first_order' to the method (central differences "
            "of gradients), or compute the weight as g * v / v.norm(...) yourself.",
            HypergradientWarning,
            stacklevel=4,
        )
