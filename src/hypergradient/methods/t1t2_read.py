"""T1T2's look-ahead: every finiteness check and norm read in one host synchronization.

The direct path of :class:`~hypergradient.methods.t1t2.T1T2` reports ``||grad_theta f||``
and ``||b|| = ||grad_theta g||`` without building the flat vectors: each norm comes in the
parts :func:`~hypergradient._norms.norm_parts` takes while a leaf is in cache, read
with ``f``, ``g`` and a sum probe of each hypergradient leaf. With one learning rate ``b``'s
norm is ``||lr b|| / lr``; with one rate per leaf it is read from ``b``'s own leaves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _tree
from .._norms import ROW_SQUARES, in_rows, norm_parts, read_floats
from .._vocab import finite_probe

__all__ = ["b_parts", "read_look_ahead"]


def b_parts(
    lr: float | Tensor, grads: Sequence[Tensor | None], wide: torch.dtype
) -> tuple[list[Tensor], list[Tensor]] | None:
    """With one rate per leaf (``lr`` a tensor), the parts of ``||b||`` over ``b``'s leaves
    ``grads`` and those leaves; None for one rate (``||b|| = ||x|| / lr``)."""
    if not isinstance(lr, Tensor):
        return None
    leaves = [t.detach() for t in grads if t is not None]
    return [part for t in leaves for part in norm_parts(t, wide)], leaves


def read_look_ahead(
    norms: tuple[list[Tensor], list[Tensor]],
    gf: list[Tensor | None],
    x: Tensor,
    values: tuple[Tensor, Tensor],
    out: list[Tensor],
    lr: float | Tensor,
    b: tuple[list[Tensor], list[Tensor]] | None = None,
) -> list[float] | None:
    """``[||grad_theta f||, ||b||, f, g]`` in the device's wide dtype, read in one host
    synchronization with a sum probe of every leaf of ``out``; None when one of them is
    not finite or a norm is too small to be read to rounding. The norms come in parts
    (``norms``: the parts of :func:`norm_parts` for ``grad_theta f``'s leaves and for
    ``x``, taken as each was computed, while in cache) combined on the host: no flat
    copy; ``||b|| = ||x|| / lr``, or with one rate per leaf (``b``: :func:`b_parts`) read
    from ``b``'s leaves. ``out`` finite means both of its terms are (``inf - inf`` is
    NaN)."""
    wide = _tree.wide_dtype(x.device)
    bparts, bleaves = b if b is not None else ([], [])
    probes = [*norms[0], *norms[1], *bparts]
    count, count_x, count_b = len(norms[0]), len(norms[0]) + len(norms[1]), len(probes)
    probes += [v.detach() for v in values]
    probes += [t.sum(dtype=wide) if t.is_floating_point() else finite_probe(t) for t in out]
    read = read_floats(probes, x.device, wide)  # on the CPU: each as it is (no stack)
    if not all(math.isfinite(v) for v in read):
        return None
    stat, xnorm = math.hypot(*read[:count]), math.hypot(*read[count:count_x])
    if stat < _smallest_stat(gf, wide) or xnorm < _smallest_norm(x, wide):
        return None  # a norm that may be more than a rounding off: the general formula
    if b is None:
        return [stat, xnorm / float(lr), *read[count_b : count_b + 2]]
    bnorm = math.hypot(*read[count_x:count_b])
    if bnorm <= _smallest_stat(bleaves, wide):  # 0 included: the general formula warns
        return None
    return [stat, bnorm, *read[count_b : count_b + 2]]


def _smallest_stat(gf: Sequence[Tensor | None], wide: torch.dtype) -> float:
    """The smallest ``||grad_theta f||`` read to rounding by float32 rows (0 when no leaf
    is read that way)."""
    leaves = [t for t in gf if t is not None]
    if not any(in_rows(t, wide) for t in leaves):
        return 0.0
    return math.sqrt(sum(t.numel() for t in leaves)) * ROW_SQUARES


def _smallest_norm(x: Tensor, wide: torch.dtype) -> float:
    """The smallest ``||x||`` that is ``||lr b||`` to rounding: below it subnormal entries of
    ``x`` (absolute error up to ``finfo(x.dtype).tiny``), or squares that underflow in the
    wide dtype (each ``finfo(wide).tiny``) or in float32 rows (:func:`norm_parts`), could
    move the norm by more than a rounding; the general formula then reads ``b`` itself
    (``x = 0`` included)."""
    w = torch.finfo(wide)
    low = max(torch.finfo(x.dtype).tiny, math.sqrt(w.tiny / w.eps))
    if in_rows(x, wide):
        low = max(low, ROW_SQUARES)
    return math.sqrt(x.numel()) * low
