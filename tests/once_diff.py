"""A function whose backward cannot be differentiated again, for the tests of the
``@once_differentiable`` detection and the product modes' fallback."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class Cube(torch.autograd.Function):
    """``x^3 / 3`` with a backward (``grad * x^2``) that cannot be differentiated again."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3 / 3

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * x**2
