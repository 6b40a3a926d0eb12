"""A hyper-optimizer checkpoint saved on rank 0 in the middle of a window, loaded on both.

Such a checkpoint holds rank 0's batches of the window; rank 1 loaded it without a word,
and the next hyper-step's replay (with rank 0's shard twice in the average) ended 1.02
(relative) from the model on every rank, which skipped it, blaming the loop ("gradient
clipping, accumulation"). The checkpoint now records the saving rank: loading another
rank's mid-window checkpoint raises ``ValueError`` on that rank and ``RankFailedError`` on
the others (one collective after the validation, so no rank trains on alone into DDP's
next all-reduce), before anything changes. Each rank loading its own checkpoint resumes
bit for bit as the uninterrupted run.
"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist

import hypergradient as hg
from ranks import WORLD, free_port, init_gloo, shared_dict, spawn

DT = torch.float64


def _loss(m, h, b):
    w = next(p for p in m.parameters() if p.dim() == 2)
    return ((m(b[0]).reshape(-1) - b[1]) ** 2).mean() + (h["decay"] * w**2).sum()


def _build(val):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    hopt = hg.HyperOptimizer(
        torch.nn.parallel.DistributedDataParallel(model),
        {"decay": hg.Positive(torch.full((1, 4), 0.01, dtype=DT))},
        inner_optimizer=opt,
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.05),
        train_loss=_loss,
        val_loss=_loss,
        val_data=val,
        method=hg.Unrolled(),
        inner_steps=4,
        process_group=dist.group.WORLD,
    )
    return model, opt, hopt


def _steps(hopt, X, y, a, b):
    for i in range(a, b):
        hopt.zero_grad()
        hopt.train_loss((X[i], y[i])).backward()
        hopt.step((X[i], y[i]))


def _worker(rank, port, path, results, stop=6):
    try:
        init_gloo(rank, port)
        g = torch.Generator().manual_seed(100 + rank)
        X, y = (
            torch.randn(10, 8, 4, generator=g, dtype=DT),
            torch.randn(10, 8, generator=g, dtype=DT),
        )
        val = (torch.randn(8, 4, generator=g, dtype=DT), torch.randn(8, generator=g, dtype=DT))
        model, opt, hopt = _build(val)
        _steps(hopt, X, y, 0, 10)
        ref = hopt.raw_hparams()[0].detach().clone()
        model, opt, hopt = _build(val)
        _steps(hopt, X, y, 0, stop)  # 6: mid-window; 8: right after a hyper-step
        torch.save(
            {"h": hopt.state_dict(), "m": model.state_dict(), "o": opt.state_dict()},
            f"{path}{rank}.pt",
        )
        dist.barrier()
        model, opt, hopt = _build(val)
        theirs = torch.load(f"{path}0.pt", weights_only=True)  # rank 0's, on every rank
        raw = hopt.raw_hparams()[0].detach().clone()
        try:
            hopt.load_state_dict(theirs["h"])
        except (ValueError, hg.RankFailedError) as err:
            results[(rank, "theirs")] = f"{type(err).__name__}: {err}"
        else:
            results[(rank, "theirs")] = "loaded"
        results[(rank, "unchanged")] = hopt.loop.count == 0 and torch.equal(
            raw, hopt.raw_hparams()[0].detach()
        )
        own = torch.load(f"{path}{rank}.pt", weights_only=True)
        model.load_state_dict(own["m"])
        opt.load_state_dict(own["o"])
        hopt.load_state_dict(own["h"])
        _steps(hopt, X, y, stop, 10)
        results[(rank, "resumed")] = torch.equal(hopt.raw_hparams()[0].detach(), ref)
        results[(rank, "counts")] = (hopt.hyper_steps, hopt.skipped)
    except BaseException:  # noqa: BLE001 - reported to the parent
        results[(rank, "error")] = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("stop", [6, 8], ids=["mid-window", "after a hyper-step"])
def test_another_ranks_checkpoint_is_refused_on_every_rank(tmp_path, stop):
    """(Round 23: right after a hyper-step, rank 1 took rank 0's random-number state and
    samplers' positions without a word: per-rank dropout drew the same masks on both.)"""
    results = shared_dict()
    spawn(_worker, (free_port(), str(tmp_path / "ckpt"), results, stop))
    for rank in range(WORLD):
        assert (rank, "error") not in results, results[(rank, "error")]
        got = results[(rank, "theirs")]
        if rank == 0:
            assert got.startswith("RankFailedError"), got
        else:
            assert got.startswith("ValueError") and "saved on rank 0" in got, got
        assert results[(rank, "unchanged")]
        assert results[(rank, "resumed")]
        assert results[(rank, "counts")] == (2, 0)
