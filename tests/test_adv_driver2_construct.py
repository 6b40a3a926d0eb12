"""A HyperOptimizer constructor that raises leaves the user's inner optimizer as it was.

Optimizer-setting links (``optimizer_hparams={"lr": "lr"}``) are written into the inner
optimizer's param groups at construction; the data-parallel consistency check that follows
can still refuse the configuration (the ranks' hyperparameters differ). The refusal used
to leave each rank's optimizer with its own linked learning rate written in: the user's
``lr`` was gone, and a loop that caught the error and carried on trained with it.
"""

from __future__ import annotations

import traceback

import torch
import torch.distributed as dist

import hypergradient as hg
from ranks import WORLD, free_port, init_gloo, shared_dict, spawn

DT = torch.float64


def _loss(m, h, b):
    return ((m(b[0]).reshape(-1) - b[1]) ** 2).mean()


def _worker(rank, port, results):
    try:
        init_gloo(rank, port)
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1).double()
        x, y = torch.randn(8, 3, dtype=DT), torch.randn(8, dtype=DT)
        inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
        groups = inner.param_groups
        before = [dict(g) for g in groups]
        weights = [p.detach().clone() for p in model.parameters()]
        try:
            hg.HyperOptimizer(
                model,
                # a per-rank value: refused by the consistency check
                {"lr": hg.Positive(torch.tensor(0.1 * (1 + rank), dtype=DT))},
                inner_optimizer=inner,
                outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.1),
                train_loss=_loss,
                val_loss=_loss,
                val_data=(x, y),
                method=hg.Unrolled(),
                optimizer_hparams={"lr": "lr"},
                inner_steps=2,
                process_group=dist.group.WORLD,
            )
        except ValueError as err:
            results[(rank, "error")] = str(err)
        results[(rank, "same groups")] = inner.param_groups is groups and all(
            g is b_g for g, b_g in zip(inner.param_groups, groups)
        )
        results[(rank, "settings")] = [
            {k: v for k, v in g.items() if k != "params"} for g in inner.param_groups
        ]
        results[(rank, "before")] = [{k: v for k, v in g.items() if k != "params"} for g in before]
        results[(rank, "params lists")] = all(
            g["params"] is b["params"] for g, b in zip(inner.param_groups, before)
        )
        results[(rank, "weights")] = all(
            torch.equal(p, w) for p, w in zip(model.parameters(), weights)
        )
    except BaseException:  # noqa: BLE001 - reported to the parent
        results[(rank, "crash")] = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_refused_construction_leaves_the_linked_settings_unwritten():
    results = shared_dict()
    spawn(_worker, (free_port(), results))
    for rank in range(WORLD):
        assert (rank, "crash") not in results, results[(rank, "crash")]
        assert "differ" in results.get((rank, "error"), ""), results
        assert results[(rank, "settings")] == results[(rank, "before")]
        assert results[(rank, "settings")][0]["lr"] == 0.05  # not the linked 0.1 * (1 + rank)
        assert results[(rank, "same groups")] and results[(rank, "params lists")]
        assert results[(rank, "weights")]


def test_begin_step_refused_changes_nothing():
    """begin_step() of a step that takes a hyper-step, under torch.inference_mode(), or
    after add_param_group: raises before it opens a window or records anything."""
    import pytest

    from test_hyperoptimizer_support import assert_same, batches, build, everything, run

    for make_bad in ("inference", "add_param_group"):
        model, hopt = build(hg.Unrolled(), inner_steps=1)
        run(hopt, batches(2))  # hyper-steps: the next window opens at the next step
        assert hopt.hyper_steps == 2 and hopt.loop.window is None
        before = everything(model, hopt)
        if make_bad == "inference":
            with torch.inference_mode(), pytest.raises(ValueError, match="inference_mode"):
                hopt.begin_step()
        else:
            extra = torch.nn.Parameter(torch.zeros(2, dtype=DT))
            model.register_parameter("extra", extra)
            hopt.inner_optimizer.add_param_group({"params": [extra]})
            with pytest.raises(ValueError, match="newly trained: \\['extra'\\]"):
                hopt.begin_step()
            hopt.inner_optimizer.param_groups.pop()
            del model.extra
        assert hopt.loop.window is None and hopt.loop.rng_pending is None
        assert_same(before, everything(model, hopt))
