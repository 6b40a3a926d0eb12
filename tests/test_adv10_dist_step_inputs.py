"""``hopt.step()`` refused on one rank only at a hyper-step's step (no batch there).

The refusal ran before any collective on that rank, while the other ranks went on into
the hyper-step's consistency check: they waited there for the backend's timeout (or met
the refusing rank's next backward all-reduce), with a gloo error instead of the cause.
Now every rank joins one check after its own: the refusing rank raises its ``ValueError``,
the others ``RankFailedError``, within seconds and before anything changes; the ranks
then go on training together (T1T2, IFT, Unrolled; ``end_step()`` alike).
"""

from __future__ import annotations

import time
import traceback

import torch
import torch.distributed as dist

import hypergradient as hg
from ranks import WORLD, free_port, init_gloo, shared_dict, spawn

DT = torch.float64


def _loss(m, h, b):
    w = next(p for p in m.parameters() if p.dim() == 2)
    return ((m(b[0]).reshape(-1) - b[1]) ** 2).mean() + (h["decay"] * w**2).sum()


def _state(model, hopt):
    parts = [p.detach().reshape(-1) for p in model.parameters()]
    parts.append(hopt.raw_hparams()[0].detach().reshape(-1))
    parts.append(torch.tensor([float(hopt.loop.count), float(hopt.hyper_steps)], dtype=DT))
    return torch.cat(parts)


def _worker(rank, port, results):
    try:
        init_gloo(rank, port)
        g = torch.Generator().manual_seed(100 + rank)
        X, y = torch.randn(8, 4, generator=g, dtype=DT), torch.randn(8, generator=g, dtype=DT)
        for name, make in (
            ("T1T2", hg.T1T2),
            ("IFT", lambda: hg.IFT(seed=0)),
            ("Unrolled", hg.Unrolled),
        ):
            torch.manual_seed(0)
            model = torch.nn.Linear(4, 1).double()
            hopt = hg.HyperOptimizer(
                torch.nn.parallel.DistributedDataParallel(model),
                {"decay": hg.Positive(torch.full((1, 4), 0.01, dtype=DT))},
                inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.05),
                train_loss=_loss,
                val_loss=_loss,
                val_data=(X, y),
                method=make(),
                inner_steps=2,
                process_group=dist.group.WORLD,
            )
            hopt.zero_grad()
            hopt.train_loss((X, y)).backward()
            hopt.step((X, y))
            hopt.zero_grad()
            hopt.train_loss((X, y)).backward()
            before = _state(model, hopt)
            started = time.perf_counter()
            try:
                hopt.step() if rank == 1 else hopt.step((X, y))  # the hyper-step's step
            except (ValueError, hg.RankFailedError) as err:
                results[(rank, name)] = type(err).__name__
            else:
                results[(rank, name)] = "no error"
            results[(rank, name, "seconds")] = time.perf_counter() - started
            results[(rank, name, "unchanged")] = torch.equal(before, _state(model, hopt))
            for _ in range(2):  # the ranks go on together
                hopt.zero_grad()
                hopt.train_loss((X, y)).backward()
                hopt.step((X, y))
            after = _state(model, hopt)
            same = after.clone()
            dist.broadcast(same, src=0)
            results[(rank, name, "equal")] = torch.equal(same, after) and hopt.hyper_steps == 1
        _end_step(rank, X, y, results)
    except BaseException:  # noqa: BLE001 - reported to the parent
        results[(rank, "error")] = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _end_step(rank, X, y, results):
    """The same through begin_step() / end_step() (a loop that steps the optimizer)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hopt = hg.HyperOptimizer(
        torch.nn.parallel.DistributedDataParallel(model),
        {"decay": hg.Positive(torch.full((1, 4), 0.01, dtype=DT))},
        inner_optimizer=opt,
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.05),
        train_loss=_loss,
        val_loss=_loss,
        val_data=(X, y),
        method=hg.Unrolled(),
        inner_steps=2,
        process_group=dist.group.WORLD,
    )
    for i in range(4):
        hopt.begin_step()
        hopt.zero_grad()
        hopt.train_loss((X, y)).backward()
        opt.step()
        try:
            hopt.end_step(None if (rank == 1 and i == 1) else (X, y))
        except (ValueError, hg.RankFailedError) as err:
            results[(rank, "end_step")] = type(err).__name__
    after = _state(model, hopt)
    same = after.clone()
    dist.broadcast(same, src=0)
    results[(rank, "end_step", "equal")] = torch.equal(same, after)


def test_a_step_refused_on_one_rank_raises_on_every_rank():
    results = shared_dict()
    spawn(_worker, (free_port(), results))
    for rank in range(WORLD):
        assert (rank, "error") not in results, results[(rank, "error")]
        for name in ("T1T2", "IFT", "Unrolled"):
            expected = "ValueError" if rank == 1 else "RankFailedError"
            assert results[(rank, name)] == expected, (rank, name, results[(rank, name)])
            assert results[(rank, name, "seconds")] < 10
            assert results[(rank, name, "unchanged")], (rank, name)
            assert results[(rank, name, "equal")], (rank, name)
        expected = "ValueError" if rank == 1 else "RankFailedError"
        assert results.get((rank, "end_step")) == expected, (rank, results.get((rank, "end_step")))
        assert results[(rank, "end_step", "equal")]
