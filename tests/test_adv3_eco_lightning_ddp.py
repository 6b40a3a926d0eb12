"""The Lightning callback under ``strategy="ddp"`` (2 gloo ranks on CPU) with validation and
holdout rows that do not split evenly between the ranks.

Reference: one process on the whole batches and all the rows. 41 validation rows split
21/20 and 31 holdout rows 16/15: the average of the ranks' mean losses weighed rank 0's rows
1/42 and rank 1's 1/40, so the hypergradient was 0.6% off and the reported validation and
holdout losses differed in the third digit; each rank's mean is now weighted by its share
of the rows, and the run agrees with the single process to float64 rounding.

The callback's own sinks (``logger=[CSVLogger(path)]``) were called on every rank: two
processes rewriting one CSV file crashed the run (``FileNotFoundError`` on its temporary
file) or wrote each record twice. Only global rank 0 writes them now, as Lightning's
loggers: one row per hyper-step, equal to the records.

Resuming under DDP: every rank loads rank 0's checkpoint, and with shards of 21 and 20 rows
rank 1 took over rank 0's validation sampler, whose draws (``randperm(21)``) had advanced its
generator otherwise: the resumed run drew other validation rows than the uninterrupted one
(in repro/lt_ddp_resume.py, a second hyper-step's validation loss of 1.028 instead of
0.896). Each rank now redraws its own sampler's position; the resumed run is the
uninterrupted one, bit for bit."""

from __future__ import annotations

import csv
import json
import os
import textwrap
from pathlib import Path

import pytest
import torch

from forked import ScriptServer

pytest.importorskip("lightning.pytorch")

SCRIPT = """
import json, sys
import torch
import lightning.pytorch as L
sys.path.insert(0, {tests!r})
import test_integrations_lightning as T
from hypergradient.integrations import CSVLogger

val, hold = T.data(41, 1), T.data(31, 2)
module = T.LogReg()
cb = T.HypergradientCallback(
    val_data=val, val_batch_size=None, every_n_steps=3, holdout_data=hold,
    method=T.hg.IFT(T.hg.CG(maxiter=5), damping=0.1),
    outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.1),
    logger=CSVLogger({out!r} + ".csv"),
)
trainer = L.Trainer(
    strategy={strategy!r}, accelerator="cpu", devices={devices}, max_steps=6, logger=False,
    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    limit_val_batches=0, num_sanity_val_steps=0, callbacks=[cb], use_distributed_sampler=False,
)
trainer.fit(module, T.loader({batch_size}, sharded={devices} > 1))
out = {{
    "raw": module.decay.raw.tolist(),
    "val": [r.val_loss for r in cb.hopt.history],
    "holdout": [r.holdout_loss for r in cb.hopt.history],
    "hypergrad": [r.hypergrad["decay"].tolist() for r in cb.hopt.history],
}}
with open({out!r} + f".{{trainer.global_rank}}.json", "w") as f:
    json.dump(out, f)
"""


TESTS = str(Path(__file__).resolve().parent)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=TESTS, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def server():
    """Each script runs as ``python script.py`` would, forked from a process that imported
    torch, Lightning and hypergradient once (tests/forked.py); Lightning starts rank 1 as a
    fresh ``python script.py``."""
    with ScriptServer(["torch", "hypergradient", "lightning.pytorch"], _env()) as running:
        yield running


def run(server, tmp_path, name, script=SCRIPT, **kw):
    out = str(tmp_path / name)
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(script.format(tests=TESTS, out=out, **kw)))
    done = server.run([str(path)], env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    paths = [Path(f"{out}.{rank}.json") for rank in range(2)]
    return [json.loads(p.read_text()) for p in paths if p.exists()]


@pytest.fixture(scope="module")
def runs(server, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    ddp = run(server, tmp_path, "ddp", strategy="ddp", devices=2, batch_size=16)
    (single,) = run(server, tmp_path, "single", strategy="auto", devices=1, batch_size=32)
    return ddp, single, tmp_path


def test_uneven_validation_and_holdout_shards_match_one_process_on_all_rows(runs):
    ddp, single, _ = runs
    assert len(ddp) == 2 and len(single["hypergrad"]) == 2
    want = torch.tensor(single["hypergrad"], dtype=torch.float64)
    for rank in ddp:
        got = torch.tensor(rank["hypergrad"], dtype=torch.float64)
        assert float((got - want).norm() / want.norm()) < 1e-12  # was 5.8e-3
        assert rank["val"] == pytest.approx(single["val"], rel=1e-12, abs=0)
        assert rank["holdout"] == pytest.approx(single["holdout"], rel=1e-12, abs=0)
        assert rank["raw"] == pytest.approx(single["raw"], rel=1e-12, abs=0)
    assert ddp[0]["raw"] == ddp[1]["raw"]


def test_the_callbacks_own_sinks_are_written_once_by_rank_zero(runs):
    ddp, _, tmp_path = runs
    with open(tmp_path / "ddp.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["hyper_step"]) for r in rows] == [1, 2]  # was a crash, or each row twice
    assert [float(r["loss/val"]) for r in rows] == ddp[0]["val"]  # written as repr: exact
    assert [float(r["loss/holdout"]) for r in rows] == ddp[0]["holdout"]


RESUME = """
import json, sys
import torch
import lightning.pytorch as L
sys.path.insert(0, {tests!r})
import test_integrations_lightning as T


def fit(epochs, save=False, ckpt=None):
    module = T.LogReg(dropout=0.3)
    cb = T.HypergradientCallback(
        val_data=T.data(41, 1), val_batch_size=8, every_n_steps=3,
        method=T.hg.IFT(T.hg.CG(maxiter=5), damping=0.1),
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.1),
    )
    saving = [L.callbacks.ModelCheckpoint(dirpath={tmp!r}, filename="last")] if save else []
    trainer = L.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=epochs, logger=False,
        enable_checkpointing=save, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[cb, *saving],
        use_distributed_sampler=False,
    )
    torch.manual_seed(0)
    trainer.fit(module, T.loader(16, sharded=True), ckpt_path=ckpt)
    return trainer.global_rank, {{
        "raw": module.decay.raw.tolist(),
        "weight": module.linear.weight.reshape(-1).tolist(),
        "val": [r.val_loss for r in cb.hopt.history],
    }}


rank, straight = fit(3)
fit(2, save=True)
_, resumed = fit(3, ckpt={tmp!r} + "/last.ckpt")
with open({out!r} + f".{{rank}}.json", "w") as f:
    json.dump({{"straight": straight, "resumed": resumed}}, f)
"""


def test_resuming_with_uneven_shards_reproduces_the_uninterrupted_run(server, tmp_path):
    """Three epochs of 2 steps per rank straight, or two (checkpoint in the middle of the
    second window) and a resumed third; dropout in the training loss."""
    ranks = run(server, tmp_path, "resume", script=RESUME, tmp=str(tmp_path))
    assert len(ranks) == 2
    for both in ranks:
        a, b = both["straight"], both["resumed"]
        assert len(a["val"]) == 2 and b["val"] == a["val"]  # the 2nd used other rows
        assert b["raw"] == a["raw"] and b["weight"] == a["weight"]
