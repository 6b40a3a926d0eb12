"""Data-parallel consistency of a HyperOptimizer's configuration: ranks that differ in
``inner_steps``, the inner optimizer's settings or the method's settings raise a
``ValueError`` on every rank (at construction, or at the next hyper-step when a setting
changes on one rank), instead of deadlocking in mismatched collectives."""

from __future__ import annotations

import traceback

import torch
import torch.distributed as dist

import hypergradient as hg
from ranks import WORLD, free_port, init_gloo, shared_dict, spawn

DT = torch.float64


def _make(rank, inner_steps=2, lr=0.1, maxiter=5, dt=DT):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).to(dt)
    x, y = torch.randn(8, 4, dtype=dt), torch.randn(8, dtype=dt)

    def loss(m, h, b):
        return ((m(b[0]).reshape(-1) - b[1]) ** 2).mean() + (h["decay"] * m.weight**2).sum()

    hopt = hg.HyperOptimizer(
        model,
        {"decay": hg.Positive(torch.full((1, 4), 0.1, dtype=dt))},
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
        results[(rank, "scaler")] = _scaler_steps(rank)  # (in this spawn: it costs ~15 s)
    except BaseException:  # noqa: BLE001 - reported to the parent
        results[(rank, "error")] = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _scaler_steps(rank):
    """``scaler.step(hopt, batch)`` under the process group, rank 1's second batch
    overflowing float16: (steps, hyper-steps, steps the scaler skipped)."""
    hopt, (x, y) = _make(rank, dt=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for i in range(5):
        b = (x, y)
        if i == 1 and rank == 1:
            b = (torch.full((8, 4), 1e6), b[1])  # its scaler skips the step
        hopt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            value = hopt.train_loss(b)
        scaler.scale(value).backward()
        scaler.step(hopt, b)
        scaler.update()
    return hopt.loop.count, hopt.hyper_steps, hopt.loop.scaler_skips


def test_ranks_with_different_configurations_all_raise():
    results = shared_dict()
    spawn(_worker, (free_port(), results))
    for rank in range(WORLD):
        assert (rank, "error") not in results, results[(rank, "error")]
        for case in ("inner_steps", "lr", "maxiter", "changed"):
            got = results[(rank, case)]
            assert got.startswith("raised") and "differ" in got, (rank, case, got)
            assert "configuration" in got, (rank, case, got)
        assert results[(rank, "same")] == 2
        # a step one rank's GradScaler skips is skipped on every rank (alone, that rank's
        # weights and hyper-steps fell out of step: "params differ between ranks")
        assert results[(rank, "scaler")] == (4, 2, 1)
