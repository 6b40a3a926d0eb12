"""How a trajectory method's reverse step gets its second-order products.

The reverse step needs ``H_t u`` and ``(d_phi grad_theta f_t)^T u`` for the cotangent
``u`` of the step's gradient. The modes have the names of the operators' product modes:

=================  ===========================================================  ==========
mode               products                                                     gradients
=================  ===========================================================  ==========
``"double"``       backward through the graph of ``grad f`` (double backward)   ~3
``"double_math"``  the same, the graph built with the math attention kernel     ~3
                   and without cuDNN (fused kernels without double backward)
``"first_order"``  ``(grad f(theta + e u) - grad f(theta - e u)) / 2e`` with    3
                   respect to ``theta`` and ``phi``: no double backward
``"auto"``         ``"double"``; on torch's "derivative ... is not implemented"  as chosen
                   error, ``"double_math"``, then ``"first_order"`` (one warning)
=================  ===========================================================  ==========

(Gradients counted per reverse step, the recomputation of ``grad f`` included.) Every
evaluation of the loss in a step, the central differences' two included, draws the step's
recorded random numbers, so dropout uses the same masks as the step it differentiates.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .._vocab import as_choice

__all__ = [
    "MODES",
    "as_mode",
    "first_order_step",
    "has_error_node",
    "is_double_backward_error",
    "math_kernels",
]

MODES = ("auto", "double", "double_math", "first_order")

_DOUBLE_BACKWARD = re.compile(
    r"derivative for .+ is not implemented|double backwards? (is )?(not|un)|"
    r"differentiate twice|once_differentiable",
    re.IGNORECASE,
)


def as_mode(value: object) -> str:
    """``value`` if it is one of :data:`MODES` (``ValueError`` naming them otherwise)."""
    return as_choice(value, "hvp", MODES)


def is_double_backward_error(error: BaseException) -> bool:
    """Whether ``error`` is torch's refusal to differentiate a backward formula.

    Matches ``"derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is
    not implemented"``, cuDNN RNNs' "Double backwards is not supported" and the error of a
    custom function marked ``@once_differentiable``.
    """
    return isinstance(error, RuntimeError) and bool(_DOUBLE_BACKWARD.search(str(error)))


@contextlib.contextmanager
def math_kernels() -> Iterator[None]:
    """Forward passes whose kernels have a double backward.

    Scaled dot-product attention runs its math backend (matmuls and a softmax instead of
    the fused flash / memory-efficient kernels) and cuDNN is off.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cudnn = torch.backends.cudnn
    with (
        sdpa_kernel(SDPBackend.MATH),
        cudnn.flags(
            enabled=False,
            benchmark=cudnn.benchmark,
            deterministic=cudnn.deterministic,
            allow_tf32=cudnn.allow_tf32,
        ),
    ):
        yield


def first_order_step(theta_norm: float, v_norm: float, size: int, dtype: torch.dtype) -> float:
    """The step ``e`` of ``(g(theta + e v) - g(theta - e v)) / 2e``.

    ``e = eps^(1/3) (1 + rms(theta)) / (2 ||v||)``: the perturbation has norm
    ``eps^(1/3) (1 + rms(theta)) / 2``, which balances the truncation error
    (``O(e^2)``, third derivatives) against the rounding error (``O(eps / e)``), both
    ``O(eps^(2/3))`` relative. ``eps`` is the machine epsilon of ``dtype`` (the least
    precise parameter dtype), ``rms(theta) = ||theta|| / sqrt(size)``.
    """
    eps = torch.finfo(dtype).eps
    rms = theta_norm / max(size, 1) ** 0.5
    return 0.5 * eps ** (1.0 / 3.0) * (1.0 + rms) / v_norm


def has_error_node(outputs: Sequence[Tensor]) -> bool:
    """Whether the graph of ``outputs`` holds a node that refuses differentiation.

    A custom ``autograd.Function`` whose backward is ``@once_differentiable`` leaves an
    error node in the graph of the gradient; a backward pass that does not reach it would
    silently miss that function's part of the Hessian. Visits each node once.
    """
    stack = [o.grad_fn for o in outputs if o.grad_fn is not None]
    seen: set[int] = set()
    while stack and len(seen) < 200_000:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.name() in ("torch::autograd::Error", "torch::autograd::DelayedError"):
            return True
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return False
