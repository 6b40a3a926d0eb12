"""Data-parallel hypergradients through ``torch.distributed``.

Each rank holds one shard of the data; its ``inner_loss`` and ``outer_loss`` are means over
that shard, and the global objectives are their averages over the ranks (equal-sized
shards). Everything the solvers see is then a global quantity obtained by averaging with
collective operations:

- the right-hand side ``grad_theta g`` and the direct term ``d_phi g``: one all-reduce each;
- every Hessian-vector product ``H v = mean_r H_r v``: one all-reduce per product (a batch
  of products, as in a Nystrom sketch, is one all-reduce);
- the mixed product ``(d_phi grad_theta f)^T x``: one all-reduce.

The solvers are deterministic given identical inputs, so every rank runs the same
iterations and ends with the same hypergradient, bit for bit. Randomized sketches must be
seeded for the same reason (checked). Any backend works (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._tree import wide_dtype
from .operators import LinearOperator

__all__ = ["AveragedOperator", "all_reduce_mean", "check_consistent", "mean_over_ranks"]


def _group_size(group: Any) -> int:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "`process_group` was given but torch.distributed is not initialized; call "
            "torch.distributed.init_process_group(...) first (e.g. under torchrun)."
        )
    if dist.get_rank(group) < 0:
        raise ValueError(
            f"This process (global rank {dist.get_rank()}) is not a member of "
            "`process_group`; pass a group that contains every rank that calls this function."
        )
    return dist.get_world_size(group)


def all_reduce_mean(tensor: Tensor, group: Any) -> Tensor:
    """Average ``tensor`` over the ranks of ``group`` (in place; returns it)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    tensor.div_(_group_size(group))
    return tensor


def mean_over_ranks(tensors: Sequence[Tensor], group: Any) -> list[Tensor]:
    """Average several tensors over the ranks with one all-reduce (the one implementation).

    The tensors are packed into one buffer of the widest float type (float64, float32 on
    MPS), averaged, and unpacked to their shapes and dtypes. With ``group=None`` they are
    returned unchanged.
    """
    tensors = list(tensors)
    if group is None or not tensors:
        return tensors
    device = tensors[0].device
    wide = wide_dtype(device)
    flat = torch.cat([t.detach().reshape(-1).to(device=device, dtype=wide) for t in tensors])
    all_reduce_mean(flat, group)
    out, i = [], 0
    for t in tensors:
        out.append(flat[i : i + t.numel()].reshape(t.shape).to(device=t.device, dtype=t.dtype))
        i += t.numel()
    return out


def _fingerprint(values: list[Tensor], device: torch.device) -> Tensor:
    """Six float64 numbers that differ, in practice, when ``values`` differ.

    Leaf count, total size, and per-leaf size, sum, sum of squares and position-weighted
    sum, each summed with the leaf's index as weight (so swapping leaves changes it).
    Non-finite entries map to fixed sentinels, so equal NaNs compare equal.
    """
    fp = torch.zeros(6, dtype=torch.float64, device=device)
    fp[0] = float(len(values))
    for i, v in enumerate(values, start=1):
        x = v.detach().to(device=device, dtype=torch.float64).reshape(-1)
        w = torch.arange(1, x.numel() + 1, dtype=torch.float64, device=device)
        fp[1] += x.numel()
        fp[2] += i * x.numel()
        fp[3] += i * x.sum()
        fp[4] += i * (x * x).sum()
        fp[5] += i * (w * x).sum()
    return torch.nan_to_num(fp, nan=1.0e300, posinf=1.1e300, neginf=-1.1e300)


def check_consistent(
    values: list[Tensor], group: Any, what: str, *more: tuple[list[Tensor], str]
) -> None:
    """Raise on every rank if ``values`` (shapes and contents) differ between ranks.

    ``more`` adds further ``(values, what)`` pairs checked by the same collective. Each is
    reduced to a fixed-size fingerprint (:func:`_fingerprint`); one all-reduce of
    ``[fp, -fp]`` with ``MAX`` gives every rank the largest and smallest fingerprint of
    the group, so every rank reaches the same verdict, and no rank waits for a collective
    that another skipped.
    """
    checks = [(values, what), *more]
    device = next((v[0].device for v, _ in checks if v), torch.device("cpu"))
    fp = torch.stack([_fingerprint(v, device) for v, _ in checks])  # (checks, 6)
    both = torch.cat([fp, -fp])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    hi, lo = both[: len(checks)], -both[len(checks) :]
    for (_, name), h, low in zip(checks, hi, lo):
        if not torch.equal(h[:3], low[:3]):
            raise ValueError(
                f"{name} have different structures on different ranks; every rank must pass "
                "the same structure and shapes."
            )
        if not torch.equal(h, low):
            raise ValueError(
                f"{name} differ between ranks; every rank must pass identical values "
                "(broadcast them from rank 0 with torch.distributed.broadcast before the call)."
            )


class AveragedOperator(LinearOperator):
    """``v -> mean over ranks of A_r v``: one all-reduce per product (or per batch)."""

    def __init__(self, base: LinearOperator, group: Any):
        super().__init__(base.size, base.dtype, base.device)
        self.base = base
        self.group = group
        self.symmetric = base.symmetric

    @property  # type: ignore[override]
    def num_matvecs(self) -> int:
        return self.base.num_matvecs

    @num_matvecs.setter
    def num_matvecs(self, value: int) -> None:
        pass

    def matvec(self, v: Tensor) -> Tensor:
        return all_reduce_mean(self.base.matvec(v).contiguous(), self.group)

    def matmat(self, V: Tensor, chunk_size: int | None = None) -> Tensor:
        return all_reduce_mean(self.base.matmat(V, chunk_size).contiguous(), self.group)
