"""T1T2 under a process group whose step clipped the averaged gradient.

With two gloo ranks and ``DistributedDataParallel``, ``clip_grad_norm_`` between
``backward()`` and ``step()`` went unchecked (the comparison of ``.grad`` with the replayed
gradient ran only without a process group): T1T2 applied -0.00485 where the clipped step's
exact hypergradient (a float64 central difference of one real clipped step on the ranks'
concatenated shards) is +0.00186, silently. Every rank now averages its replayed gradient
(one all-reduce) and compares it with the averaged ``.grad``: every rank warns, or skips
together with ``on_divergence="skip"``; an unclipped step stays silent and exact.
"""

from __future__ import annotations

import traceback
import warnings

import pytest
import torch
import torch.distributed as dist

import hypergradient as hg
from ranks import WORLD, free_port, init_gloo, shared_dict, spawn

DT = torch.float64
MAX_NORM = 0.05


def _loss(m, h, b):
    w = next(p for p in m.parameters() if p.dim() == 2)
    return ((m(b[0]).reshape(-1) - b[1]) ** 2).mean() + (h["decay"] * w**2).sum()


def _val(m, h, b):
    return ((m(b[0]).reshape(-1) - b[1]) ** 2).mean()


def _data(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(8, 4, generator=g, dtype=DT), 3 * torch.randn(8, generator=g, dtype=DT)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)
    ).double()


def _worker(rank, port, results):
    try:
        init_gloo(rank, port)
        batch, val = _data(rank), _data(10 + rank)
        for case in ("plain", "clip", "clip-skip"):
            model = _net()
            hopt = hg.HyperOptimizer(
                torch.nn.parallel.DistributedDataParallel(model),
                {"decay": torch.full((3, 4), 0.01, dtype=DT)},
                inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=1.0),
                train_loss=_loss,
                val_loss=_val,
                val_data=val,
                method=hg.T1T2(),
                inner_steps=1,
                process_group=dist.group.WORLD,
                on_divergence="skip" if case == "clip-skip" else "warn",
            )
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                hopt.zero_grad()
                hopt.train_loss(batch).backward()
                if case != "plain":
                    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
                hopt.step(batch)
            seen = [
                str(w.message) for w in caught if issubclass(w.category, hg.HypergradientWarning)
            ]
            got = float(hopt.history[-1].hypergrad["decay"].sum()) if hopt.hyper_steps else None
            results[(rank, case)] = (got, seen, hopt.skipped, float(hopt.hparams["decay"].sum()))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results[(rank, "error")] = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _exact(clip, eps=1e-6):
    """The derivative of the validation loss (the ranks' mean) after one real step, in the
    sum of ``decay``'s entries, on the concatenated shards (equal shards: DDP's average of
    the ranks' mean gradients is the mean gradient over all of them)."""
    x, y = (torch.cat(t) for t in zip(*[_data(r) for r in range(WORLD)]))
    xv, yv = (torch.cat(t) for t in zip(*[_data(10 + r) for r in range(WORLD)]))

    def after(decay):
        m = _net()
        _loss(m, {"decay": decay}, (x, y)).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(m.parameters(), MAX_NORM)
        torch.optim.SGD(m.parameters(), lr=0.1).step()
        with torch.no_grad():
            return float(_val(m, None, (xv, yv)))

    d0, total = torch.full((3, 4), 0.01, dtype=DT), 0.0
    for i in range(12):
        e = torch.zeros(12, dtype=DT)
        e[i] = eps
        total += (after(d0 + e.reshape(3, 4)) - after(d0 - e.reshape(3, 4))) / (2 * eps)
    return total


def test_clipping_under_a_process_group_warns_or_skips_on_every_rank():
    results = shared_dict()
    spawn(_worker, (free_port(), results))
    for rank in range(WORLD):
        assert (rank, "error") not in results, results[(rank, "error")]
    plain, clipped = _exact(False), _exact(True)
    for rank in range(WORLD):
        got, seen, skipped, _ = results[(rank, "plain")]
        assert not seen and skipped == 0, seen
        assert got == pytest.approx(plain, rel=1e-6)
        got, seen, skipped, _ = results[(rank, "clip")]
        assert len(seen) == 1 and "not train_loss's gradient" in seen[0], seen
        assert "process group" in seen[0] and skipped == 0
        assert abs(got - clipped) > abs(clipped)  # what it applied: not the clipped step's
        got, seen, skipped, value = results[(rank, "clip-skip")]
        assert got is None and skipped == 1 and len(seen) == 1, seen
        assert "hyper-step skipped" in seen[0]
        assert value == pytest.approx(0.12, rel=1e-12)  # nothing applied (12 x 0.01)
