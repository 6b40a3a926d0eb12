"""The replay bound under a process group: when one rank's replay is off, every rank skips
that hyper-step, so the hyperparameters stay identical (a per-rank decision would let them
drift apart). Two cases: one rank's loop clips its gradients (every rank's replay is then
off: DDP shares the clipped run), and one rank alone reporting a replay error above the
bound (its replay error replaced by 0.5), the case only the collective decision catches."""

from __future__ import annotations

import traceback
import warnings

import torch
import torch.distributed as dist

import hypergradient as hg
from hypergradient.methods import trajectory
from ranks import WORLD, free_port, init_gloo, shared_dict, spawn

DT = torch.float64


def _run(rank: int, clip_on: int | None, fake_on: int | None = None) -> tuple[int, int, list]:
    if rank == fake_on:  # this rank alone reports a replay error above the bound
        trajectory.replay_error = lambda *args: (0.5, {})
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    model = torch.nn.parallel.DistributedDataParallel(model.double())  # averaged gradients
    g = torch.Generator().manual_seed(10 + rank)  # each rank its own shard
    x, y = torch.randn(8, 4, generator=g, dtype=DT), torch.randn(8, generator=g, dtype=DT)

    def loss(m, h, b):
        fit = ((m(b[0]).reshape(-1) - b[1]) ** 2).mean()
        net = m.module if isinstance(m, torch.nn.parallel.DistributedDataParallel) else m
        return fit + (h["decay"] * net[0].weight ** 2).sum()

    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    hopt = hg.HyperOptimizer(
        model,
        {"decay": torch.full((3, 4), 0.02, dtype=DT)},
        inner_optimizer=opt,
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=1.0),
        train_loss=loss,
        val_loss=loss,
        val_data=(x, y),
        method=hg.Unrolled(),
        inner_steps=4,
        process_group=dist.group.WORLD,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        for _ in range(4):
            hopt.zero_grad()
            hopt.train_loss((x, y)).backward()
            if rank == clip_on:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
            hopt.step((x, y))
    return hopt.hyper_steps, hopt.skipped, hopt.hparams["decay"].reshape(-1).tolist()


def _worker(rank, port, results):
    try:
        init_gloo(rank, port)
        results[(rank, "clip1")] = _run(rank, clip_on=1)
        results[(rank, "none")] = _run(rank, clip_on=None)
        results[(rank, "fake1")] = _run(rank, clip_on=None, fake_on=1)
        dist.barrier()
    except BaseException:  # noqa: BLE001 - reported to the parent
        results[(rank, "error")] = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_one_ranks_bad_replay_skips_the_hyper_step_on_every_rank():
    results = shared_dict()
    spawn(_worker, (free_port(), results))
    for rank in range(WORLD):
        assert (rank, "error") not in results, results[(rank, "error")]
    (s0, k0, d0), (s1, k1, d1) = results[(0, "clip1")], results[(1, "clip1")]
    assert (s0, k0) == (s1, k1) == (0, 1) and d0 == d1 == [0.02] * 12
    (s0, k0, d0), (s1, k1, d1) = results[(0, "none")], results[(1, "none")]
    assert (s0, k0) == (s1, k1) == (1, 0) and d0 == d1 and d0 != [0.02] * 12
    (s0, k0, d0), (s1, k1, d1) = results[(0, "fake1")], results[(1, "fake1")]
    assert (s0, k0) == (s1, k1) == (0, 1) and d0 == d1 == [0.02] * 12
