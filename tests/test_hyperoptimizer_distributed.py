"""Data-parallel consistency of a HyperOptimizer's configuration: ranks that differ in
``inner_steps``, the inner optimizer's settings or the method's settings raise a
``ValueError`` on every rank (at construction, or at the next hyper-step when a setting
changes on one rank), instead of deadlocking in mismatched collectives."""

from __future__ import annotations

import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hypergradient as hg
from ranks import WORLD, free_port, init_gloo, spawn

DT = torch.float64


def _make(rank, inner_steps=2, lr=0.1, maxiter=5):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).double()
    x, y = torch.randn(8, 4, dtype=DT), torch.randn(8, dtype=DT)

    def loss(m, h, b):
        return ((m(b[0]).reshape(-1) - b[1]) ** 2).mean() + (h["decay"] * m.weight**2).sum()

    hopt = hg.HyperOptimizer(
        model,
        {"decay": hg.Positive(torch.full((1, 4), 0.1, dtype=DT))},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.1),
        train_loss=loss,
        val_loss=loss,
        val_data=(x, y),
        method=hg.IFT(hg.CG(maxiter=maxiter), damping=1.0),
        inner_steps=inner_steps,
        process_group=dist.group.WORLD,
    )
    return hopt, (x, y)


def _expect_error(fn, results, key):
    try:
        fn()
    except ValueError as err:
        results[key] = "raised: " + str(err)
    else:
        results[key] = "no error"


def _worker(rank, port, results):
    try:
        init_gloo(rank, port)
        _expect_error(lambda: _make(rank, inner_steps=2 + rank), results, (rank, "inner_steps"))
        _expect_error(lambda: _make(rank, lr=0.1 * (1 + rank)), results, (rank, "lr"))
        _expect_error(lambda: _make(rank, maxiter=5 + rank), results, (rank, "maxiter"))
        hopt, batch = _make(rank)  # the same configuration: fine
        for _ in range(4):
            hopt.zero_grad()
            hopt.train_loss(batch).backward()
            hopt.step(batch)
        results[(rank, "same")] = hopt.hyper_steps
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        hopt.step(batch)
        if rank == 1:  # a per-rank learning-rate schedule: caught at the next hyper-step
            hopt.inner_optimizer.param_groups[0]["lr"] = 0.05
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        _expect_error(lambda: hopt.step(batch), results, (rank, "changed"))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results[(rank, "error")] = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ranks_with_different_configurations_all_raise():
    results = mp.Manager().dict()
    spawn(_worker, (free_port(), results))
    for rank in range(WORLD):
        assert (rank, "error") not in results, results[(rank, "error")]
        for case in ("inner_steps", "lr", "maxiter", "changed"):
            got = results[(rank, case)]
            assert got.startswith("raised") and "differ" in got, (rank, case, got)
            assert "configuration" in got, (rank, case, got)
        assert results[(rank, "same")] == 2
