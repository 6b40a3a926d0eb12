"""``hypergrad.utils`` 0.0.1: parameter tuples and Hessian-vector products, on ``torch.func``.

Same names and call shapes: ``Params`` and ``Objective`` (type aliases), ``hvp``,
``foreach`` and ``vector_to_params`` (``vector_to_tree``, its name in the release on PyPI);
``functorch`` is not needed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

import torch
from torch import Tensor

__all__ = ["Objective", "Params", "foreach", "hvp", "vector_to_params", "vector_to_tree"]

Params: TypeAlias = tuple[Tensor, ...]  # a functional model's parameters
Objective: TypeAlias = Callable[[Params, Params], Tensor]  # f(in_params, out_params) -> loss


def hvp(
    f: Callable[[Params], Tensor], primal: Params, tangent: Params, *, rev_only: bool = False
) -> Params:
    """Hessian-vector product ``H(primal) tangent`` of the scalar ``f(primal)``.

    Forward-over-reverse (``jvp`` of ``grad``) by default; reverse-over-reverse (``vjp``
    of ``grad``) with ``rev_only=True``. Both recompute the gradient: about 2-4 gradient
    evaluations per product (``hg.HessianOperator`` answers each with one backward pass
    through a retained graph instead).

    Returns:
        A tuple shaped like ``primal``.
    """
    if rev_only:
        vjp_fn = torch.func.vjp(torch.func.grad(f), primal)[1]
        return vjp_fn(tangent)[0]
    return torch.func.jvp(torch.func.grad(f), (primal,), (tangent,))[1]


def foreach(
    p1: Params, p2: Params, op: Callable[[Tensor, Tensor], Tensor], alpha: float | Tensor = 1
) -> Params:
    """``tuple(op(a, alpha * b) for a, b in zip(p1, p2))`` (same lengths required)."""
    if len(p1) != len(p2):
        raise ValueError(
            f"p1 and p2 must have the same structure, got {len(p1)} and {len(p2)} tensors."
        )
    return tuple(op(a, alpha * b) for a, b in zip(p1, p2))


def vector_to_params(vec: Tensor, params: Params) -> Params:
    """Views of the 1-D ``vec`` shaped like ``params``, in order."""
    total = sum(p.numel() for p in params)
    if vec.dim() != 1 or vec.numel() != total:
        raise ValueError(
            f"`vec` must be a 1-D tensor of {total} entries (the parameters' total), got shape "
            f"{tuple(vec.shape)}."
        )
    out, start = [], 0
    for p in params:
        out.append(vec[start : start + p.numel()].view_as(p))
        start += p.numel()
    return tuple(out)


def vector_to_tree(vec: Tensor, tree: Params) -> Params:
    """:func:`vector_to_params` under its name in hypergrad 0.0.1 as released on PyPI."""
    return vector_to_params(vec, tree)
