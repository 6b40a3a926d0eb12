"""A hyper-step's local skip decisions under a process group are taken together.

Before a hyper-step the driver may skip it from this rank's own state: the step was taken
at learning rate 0 (T1T2), the inner optimizer's settings changed inside the window
(Unrolled). These decisions ran before the ranks' consistency check, so a rank that
skipped alone went on training while the others waited in the check's all-reduce: under
DDP its next backward's all-reduce met theirs and the processes aborted (SIGABRT); without
DDP the ranks' step counts drifted apart. Now the decisions are part of the check: every
rank raises ``ValueError`` at that hyper-step (its inner step undone, the ranks' states
equal), and when every rank decides the same, they skip together. T1T2 after a step whose
gradient accumulated dropout draws on one rank only (uneven accumulation, a legitimate
loop; it aborted the same way): every rank skips that hyper-step together.
"""

from __future__ import annotations

import traceback
import warnings

import torch
import torch.distributed as dist

import hypergradient as hg
from ranks import WORLD, free_port, init_gloo, shared_dict, spawn

DT = torch.float64


def _run(rank: int, method, change) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).double()
    x, y = torch.randn(8, 4, dtype=DT), torch.randn(8, dtype=DT)

    def loss(m, h, b):
        w = next(p for p in m.parameters() if p.dim() == 2)
        return ((m(b[0]).reshape(-1) - b[1]) ** 2).mean() + (h["decay"] * w**2).sum()

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hopt = hg.HyperOptimizer(
        torch.nn.parallel.DistributedDataParallel(model),
        {"decay": hg.Positive(torch.full((1, 4), 0.1, dtype=DT))},
        inner_optimizer=opt,
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.1),
        train_loss=loss,
        val_loss=loss,
        val_data=(x, y),
        method=method,
        inner_steps=3,
        process_group=dist.group.WORLD,
    )
    out: dict = {"errors": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        for i in range(6):
            change(rank, i, opt)
            hopt.zero_grad()
            hopt.train_loss((x, y)).backward()
            try:
                hopt.step((x, y))
            except ValueError as err:
                out["errors"].append((i, str(err)[:39]))
                break
    out.update(count=hopt.loop.count, hyper=hopt.hyper_steps, skipped=hopt.skipped)
    out["weights"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()
    out["raw"] = hopt.raw_hparams()[0].detach().reshape(-1).tolist()
    return out


def _zero_lr_on_rank1(rank, i, opt):  # a per-rank warm-up: rate 0 at the hyper-step's step
    if rank == 1:
        opt.param_groups[0]["lr"] = 0.0 if i == 2 else 0.1


def _mid_window_on_rank1(rank, i, opt):  # changed and restored inside the window, rank 1
    if rank == 1:
        opt.param_groups[0]["lr"] = 0.05 if i == 1 else 0.1


def _mid_window_everywhere(rank, i, opt):
    opt.param_groups[0]["lr"] = 0.05 if i == 1 else 0.1


def _uneven_accumulation(rank: int) -> dict:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Dropout(0.3), torch.nn.Linear(6, 1))
    model = net.double()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    g = torch.Generator().manual_seed(10 + rank)
    x, y = torch.randn(8, 4, generator=g, dtype=DT), torch.randn(8, generator=g, dtype=DT)

    def loss(m, h, b):
        w = next(p for p in m.parameters() if p.dim() == 2)
        return ((m(b[0]).reshape(-1) - b[1]) ** 2).mean() + (h["decay"] * w**2).sum()

    hopt = hg.HyperOptimizer(
        ddp,
        {"decay": hg.Positive(torch.full((6, 4), 0.1, dtype=DT))},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.1),
        train_loss=loss,
        val_loss=loss,
        val_data=(x, y),
        method=hg.T1T2(),
        inner_steps=2,
        process_group=dist.group.WORLD,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            hopt.zero_grad()
            if rank == 0:  # two micro-batches here, one batch on rank 1
                with ddp.no_sync():
                    (hopt.train_loss((x[:4], y[:4])) / 2).backward()
                (hopt.train_loss((x[4:], y[4:])) / 2).backward()
            else:
                hopt.train_loss((x, y)).backward()
            hopt.step((x, y))
    return {
        "hyper": hopt.hyper_steps,
        "skipped": hopt.skipped,
        "warned": sum("accumulated" in str(w.message) for w in caught),
        "raw": hopt.raw_hparams()[0].detach().reshape(-1).tolist(),
    }


def _worker(rank, port, results):
    try:
        init_gloo(rank, port)
        results[(rank, "uneven")] = _uneven_accumulation(rank)
        results[(rank, "zero")] = _run(rank, hg.T1T2(), _zero_lr_on_rank1)
        results[(rank, "window")] = _run(rank, hg.Unrolled(), _mid_window_on_rank1)
        results[(rank, "both")] = _run(rank, hg.Unrolled(), _mid_window_everywhere)
        dist.barrier()
    except BaseException:  # noqa: BLE001 - reported to the parent
        results[(rank, "error")] = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_skip_decided_on_one_rank_raises_on_every_rank_and_a_shared_one_skips_together():
    results = shared_dict()
    spawn(_worker, (free_port(), results))
    for rank in range(WORLD):
        assert (rank, "error") not in results, results[(rank, "error")]
    for case in ("zero", "window"):
        r0, r1 = results[(0, case)], results[(1, case)]
        # both ranks raise at the hyper-step (step index 2), that step undone: 2 steps taken
        assert r0["errors"] == r1["errors"] == [(2, "The configuration differs between ranks")]
        assert r0["count"] == r1["count"] == 2, case
        assert r0["raw"] == r1["raw"], case
    # with the zero rate (the step undone) the weights are equal too; in "window" rank 1's
    # step at lr 0.05 made them differ (the user's per-rank rate, now reported)
    assert results[(0, "zero")]["weights"] == results[(1, "zero")]["weights"]
    r0, r1 = results[(0, "both")], results[(1, "both")]
    assert r0["errors"] == r1["errors"] == []
    # the first window (lr changed inside it) skipped on both ranks, the second applied
    assert (r0["skipped"], r0["hyper"], r0["count"]) == (r1["skipped"], r1["hyper"], 6) == (1, 1, 6)
    assert r0["raw"] == r1["raw"] and r0["weights"] == r1["weights"]
    r0, r1 = results[(0, "uneven")], results[(1, "uneven")]
    for r in (r0, r1):  # both hyper-steps skipped on both ranks, with the warning
        assert (r["hyper"], r["skipped"], r["warned"]) == (0, 2, 2)
    assert r0["raw"] == r1["raw"]
