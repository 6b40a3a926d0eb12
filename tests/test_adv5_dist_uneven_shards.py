"""Uneven shards: what the data-parallel objective is (pinned, and documented).

Each rank's losses are means over its own shard, and the library averages over the ranks
with equal weights (as DDP averages gradients): with shards of 8 and 5 rows the
hypergradient is that of ``(mean_8 + mean_5) / 2``, not of the mean over the 13 rows of
their union. Weighting each rank's losses by ``world * n_r / N`` gives the union's mean.
References: the closed-form ridge hypergradient from dense float64 solves.
"""

from __future__ import annotations

import traceback

import torch
import torch.distributed as dist

import hypergradient as hg
from ranks import WORLD, free_port, init_gloo, shared_dict, spawn

DT = torch.float64
SIZES = (8, 5)


def _data():
    g = torch.Generator().manual_seed(7)
    X, y = torch.randn(13, 4, generator=g, dtype=DT), torch.randn(13, generator=g, dtype=DT)
    Xv, yv = torch.randn(13, 4, generator=g, dtype=DT), torch.randn(13, generator=g, dtype=DT)
    return X, y, Xv, yv


def _shards(t):
    return t[: SIZES[0]], t[SIZES[0] :]


def _exact(weights, lam):
    """d/dlam of g(w*(lam)) for f = sum_r c_r mse_r + lam |w|^2, g = sum_r c_r mse_r."""
    X, y, Xv, yv = _data()
    H = 2 * lam * torch.eye(4, dtype=DT)
    b = torch.zeros(4, dtype=DT)
    gw_parts = []
    for c, Xr, yr, Xvr, yvr in zip(weights, _shards(X), _shards(y), _shards(Xv), _shards(yv)):
        H = H + c * 2 * Xr.T @ Xr / len(yr)
        b = b + c * 2 * Xr.T @ yr / len(yr)
        gw_parts.append((c, Xvr, yvr))
    w = torch.linalg.solve(H, b)
    gw = sum(c * 2 * Xvr.T @ (Xvr @ w - yvr) / len(yvr) for c, Xvr, yvr in gw_parts)
    return float(-(gw @ torch.linalg.solve(H, 2 * w))), w


def _worker(rank, port, results):
    try:
        init_gloo(rank, port)
        X, y, Xv, yv = (_shards(t)[rank] for t in _data())
        lam = torch.tensor(0.3, dtype=DT)
        for name, scale in (("plain", 1.0), ("weighted", WORLD * SIZES[rank] / sum(SIZES))):

            def f(w, h, scale=scale):
                return scale * ((X @ w - y) ** 2).mean() + h * (w**2).sum()

            def g(w, h, scale=scale):
                return scale * ((Xv @ w - yv) ** 2).mean()

            weights = (0.5, 0.5) if name == "plain" else tuple(n / sum(SIZES) for n in SIZES)
            _, w = _exact(weights, float(lam))
            solver = hg.CG(tol=1e-14, maxiter=50)
            got = hg.implicit(f, g, w, lam, solver=solver, process_group=dist.group.WORLD)
            results[(rank, name)] = float(got)
    except BaseException:  # noqa: BLE001 - reported to the parent
        results[(rank, "error")] = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_uneven_shards_average_the_ranks_means_and_weights_give_the_union():
    results = shared_dict()
    spawn(_worker, (free_port(), results))
    for rank in range(WORLD):
        assert (rank, "error") not in results, results[(rank, "error")]
    mean_of_means, _ = _exact((0.5, 0.5), 0.3)
    union, _ = _exact(tuple(n / sum(SIZES) for n in SIZES), 0.3)
    assert abs(mean_of_means - union) > 1e-2 * abs(union)  # the two objectives differ
    for rank in range(WORLD):
        assert abs(results[(rank, "plain")] - mean_of_means) < 1e-12 * abs(mean_of_means)
        assert abs(results[(rank, "weighted")] - union) < 1e-12 * abs(union)
    assert results[(0, "plain")] == results[(1, "plain")]
