"""Leaves of another dtype on one rank are a different structure.

The ranks' consistency check compared values in float64 only: hyperparameters of 0.5 in
float64 on rank 0 and in float32 on rank 1 passed, the hypergradient's all-reduced terms
mixed float32 and float64 rounding, and the ranks got different results (rank 0
-0.057439029004, rank 1 -0.0574390292 in float32, against -0.057439028793 with float64 on
both): their hyperparameters drift apart from the first hyper-step. Now both ranks raise
``ValueError`` naming the dtype.
"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist

import hypergradient as hg
from hypergradient.distributed import _fingerprint
from ranks import WORLD, free_port, init_gloo, shared_dict, spawn

DT = torch.float64


def test_the_fingerprint_structure_holds_the_dtype():
    cpu = torch.device("cpu")
    a = _fingerprint([torch.full((4,), 0.5, dtype=DT)], cpu)
    b = _fingerprint([torch.full((4,), 0.5, dtype=torch.float32)], cpu)
    assert torch.equal(a[3:], b[3:])  # the same values
    assert not torch.equal(a[:3], b[:3])  # another structure


def _worker(rank, port, results):
    try:
        init_gloo(rank, port)
        g = torch.Generator().manual_seed(10 + rank)
        X, y = torch.randn(8, 4, generator=g, dtype=DT), torch.randn(8, generator=g, dtype=DT)

        def f(w, h):
            return ((X @ w - y) ** 2).mean() + (h.to(DT) * w**2).sum()

        def g_(w, h):
            return ((X @ w - y) ** 2).mean()

        w = torch.full((4,), 0.1, dtype=DT)
        h = torch.full((4,), 0.5, dtype=torch.float32 if rank else DT)
        with pytest.raises(ValueError, match="dtypes"):
            hg.implicit(f, g_, w, h, solver=hg.CG(maxiter=10), process_group=dist.group.WORLD)
        got = hg.implicit(
            f, g_, w, h.to(DT), solver=hg.CG(maxiter=10), process_group=dist.group.WORLD
        )
        same = got.clone()
        dist.broadcast(same, src=0)
        results[rank] = "ok" if torch.equal(same, got) else "differ"
    except BaseException:  # noqa: BLE001 - reported to the parent
        results[rank] = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_float32_leaf_on_one_rank_raises_on_every_rank():
    results = shared_dict()
    spawn(_worker, (free_port(), results))
    for rank in range(WORLD):
        assert results.get(rank) == "ok", results.get(rank)
