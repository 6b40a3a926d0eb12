"""Skipped parameters under a process group: a parameter is skipped only where no rank used it.

DDP (``find_unused_parameters=True``) averages a gradient a parameter got on some ranks
only, so ``torch.optim`` steps it on every rank; a parameter no rank used keeps
``.grad = None`` and is skipped. The replay decides the same way from flags all-reduced
with the step's gradient. Reference: the identity with one process training on both
shards (the mean of the two shard losses), bit-close, and no hyper-step skipped (the
unused pooler under ``Adam(weight_decay)`` put the replay 13% off before).
"""

from __future__ import annotations

import traceback
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import hypergradient as hg
from ranks import WORLD, free_port, init_gloo, shared_dict, spawn

DT = torch.float64
USE = [[True, False], [False, False], [True, True], [False, True]]  # branch use per step, rank


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 2)
        self.branch = nn.Linear(4, 2)
        self.pooler = nn.Linear(4, 4)  # no rank ever uses it

    def forward(self, x, use):
        return self.body(x) + self.branch(x) if use else self.body(x)


def shard(rank):
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(8, 4, generator=g, dtype=DT), torch.randn(8, 2, generator=g, dtype=DT)


def fit(m, x, y, use):
    return F.mse_loss(m(x, use), y)


def penalty(m, h):
    net = m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m
    return h["pen"] * (net.body.weight**2).sum()


def build(model, loss, val):
    opt = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.1)
    return hg.HyperOptimizer(
        model,
        {"pen": torch.tensor(1e-2, dtype=DT)},
        inner_optimizer=opt,
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.0),
        train_loss=loss,
        val_loss=lambda m, h, b: F.mse_loss(m(b[0], True), b[1]),
        val_data=[val],
        method=hg.Unrolled(),
        inner_steps=len(USE),
        process_group=dist.group.WORLD if dist.is_initialized() else None,
    )


def _run(rank):
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(Net().double(), find_unused_parameters=True)
    x, y = shard(rank)
    hopt = build(model, lambda m, h, b: fit(m, b[0], b[1], bool(b[2])) + penalty(m, h), (x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)
        for use in USE:
            b = (x, y, torch.tensor(use[rank]))
            hopt.zero_grad()
            hopt.train_loss(b).backward()
            hopt.step(b)
    record = hopt.history[-1]
    return float(record.hypergrad["pen"]), record.info.replay_error, hopt.skipped


def _worker(rank, port, results):
    try:
        init_gloo(rank, port)
        results[rank] = _run(rank)
        dist.barrier()
    except BaseException:  # noqa: BLE001 - reported to the parent
        results[(rank, "error")] = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def one_process():
    """Both shards in one process: the mean of the shard losses (DDP's averaged gradient)."""
    torch.manual_seed(0)
    model = Net().double()
    (x0, y0), (x1, y1) = shard(0), shard(1)

    def loss(m, h, b):
        use = b[2].tolist()
        both = fit(m, b[0][:8], b[1][:8], use[0]) + fit(m, b[0][8:], b[1][8:], use[1])
        return both / 2 + penalty(m, h)

    # the validation loss is a mean over ranks of each rank's own batch: here the average
    hopt = hg.HyperOptimizer(
        model,
        {"pen": torch.tensor(1e-2, dtype=DT)},
        inner_optimizer=torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.1),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.0),
        train_loss=loss,
        val_loss=lambda m, h, b: (
            (F.mse_loss(m(b[0][:8], True), b[1][:8]) + F.mse_loss(m(b[0][8:], True), b[1][8:])) / 2
        ),
        val_data=[(torch.cat([x0, x1]), torch.cat([y0, y1]))],
        method=hg.Unrolled(),
        inner_steps=len(USE),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)
        for use in USE:
            b = (torch.cat([x0, x1]), torch.cat([y0, y1]), torch.tensor(use))
            hopt.zero_grad()
            hopt.train_loss(b).backward()
            hopt.step(b)
    return float(hopt.history[-1].hypergrad["pen"])


def test_a_parameter_skipped_only_where_no_rank_used_it():
    results = shared_dict()
    spawn(_worker, (free_port(), results))
    for rank in range(WORLD):
        assert (rank, "error") not in results, results[(rank, "error")]
    (h0, e0, k0), (h1, k1) = results[0], (results[1][0], results[1][2])
    assert h0 == h1 and k0 == k1 == 0 and e0 < 1e-14
    assert abs(h0 - one_process()) <= 1e-12 * abs(h0)
