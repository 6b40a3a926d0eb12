"""Forward mode's watch for SGD from its own tangents (the theory and the measured figures are
in :mod:`~hypergradient.methods.growth`'s notes; the probe it replaces for SGD is
:class:`~hypergradient.methods.growth.TangentWatch`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["SourceWatch"]


def _leaf_row_norms(xs: Sequence[Tensor]) -> Tensor:
    """``(len(xs), m)``: the norm of each row (dim 0) of each leaf, in the leaves' dtype
    (float32 for narrower ones: no wide copy of a leaf); one call for one row."""
    m, device = xs[0].shape[0], xs[0].device  # (leaves on several devices: the first's)
    wide = [x if x.dtype.itemsize >= 4 else x.float() for x in xs]
    if m == 1:
        norms = list(torch._foreach_norm(wide))
    else:
        norms = [torch.linalg.vector_norm(x.reshape(m, -1), dim=1) for x in wide]
    norms = [n if n.device == device else n.to(device) for n in norms]
    return torch.stack(norms).reshape(len(xs), m)


class SourceWatch:
    """Forward mode's watch for SGD: for each hyperparameter ``k``, the largest ratio
    ``||Z_{t+1}^k|| / sum_{s <= t} ||B_s^k||`` of its tangent's parameter rows to the sum of
    its sources' (``B_s = dPhi_s/dphi``) so far (norms kept as tensors, read once).

    With ``Z_{t+1} = J_t Z_t + B_t`` and ``Z_0 = 0``, ``Z_{t+1} = sum_s J_t ... J_{s+1} B_s``,
    so the ratio is at most the largest growth ``||J_t ... J_{s+1} B_s|| / ||B_s||`` of the
    products of step Jacobians along the sources (read on the parameters' rows, as the
    probe's): a ratio of ``r`` shows a growth of about ``r`` or more along directions the
    hypergradient is made of. It is 1 after the first step (``Z_1 = B_0``) and stays near
    1 while the Jacobians neither grow nor contract; it cannot see a growth along
    directions no source reaches, or one that sources of opposite signs cancel."""

    def __init__(self) -> None:
        self.norms: list[Tensor] = []
        self.gains: list[Tensor | None] = []

    def record(
        self, source: Sequence[Tensor], gains: Tensor | None, tangent: Sequence[Tensor]
    ) -> None:
        """Record the row norms of the step's source ``B_t`` (or of ``S_t`` with ``gains``,
        ``B_t``'s rows being ``gains[i] S_t``'s leaf by leaf: plain SGD) and of ``Z_{t+1}``
        (the parameters' rows of each, leaf by leaf)."""
        if source:
            norms = _leaf_row_norms([*source, *tangent])
            self.norms.append(norms)
            self.gains.append(gains)

    def growth(self) -> float | None:
        """The largest ratio over the steps and hyperparameters with a source so far; None
        without one (no step, or no hyperparameter that steers a step: the tangents are
        zero) or with a NaN norm; inf when a norm overflowed (a tangent or a source too
        large for its dtype's norm: ~1e19 in float32)."""
        if not self.norms:
            return None
        norms = torch.stack(self.norms).cpu().double()  # (steps, 2 leaves, m)
        half = norms.shape[1] // 2
        gains = [torch.ones(half, dtype=norms.dtype) if c is None else c for c in self.gains]
        sources = norms[:, :half] * torch.stack(gains)[:, :, None]
        b = torch.linalg.vector_norm(sources, dim=1).cumsum(0).tolist()
        z = torch.linalg.vector_norm(norms[:, half:], dim=1).tolist()
        values = [v for row in (*b, *z) for v in row]
        if any(math.isnan(v) for v in values):
            return None
        if any(math.isinf(v) for v in values):
            return math.inf
        ratios = [zk / bk for zrow, brow in zip(z, b) for zk, bk in zip(zrow, brow) if bk > 0]
        return max(ratios) if ratios else None
