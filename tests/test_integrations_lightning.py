"""The Lightning callback with a real ``lightning.Trainer`` on CPU (tiny model, few steps).

References: the same training written as the documented ``HyperOptimizer`` loop (the
callback's run must be that run: weights, hyperparameters and records, to the last bit, for
an implicit and a trajectory method); the uninterrupted Trainer run (resuming with
``Trainer.fit(ckpt_path=...)`` must reproduce it); the callback's own records (what the
Trainer's logger received); a single-process run on the union of the shards (what two DDP
ranks with gloo must compute, to float64 rounding)."""

from __future__ import annotations

import csv
import json
import os
import re
import textwrap
from pathlib import Path

import pytest
import torch

import hypergradient as hg
from forked import ScriptServer

L = pytest.importorskip("lightning.pytorch")
from hypergradient.integrations.lightning import HypergradientCallback, tuned_values  # noqa: E402

DT = torch.float64
BCE = torch.nn.functional.binary_cross_entropy_with_logits


def data(n, seed, d=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DT)
    w = torch.randn(d, generator=g, dtype=DT)
    return x, (x @ w + 0.7 * torch.randn(n, generator=g, dtype=DT) > 0).to(DT)


TRAIN, VAL, HOLD = data(64, 0), data(40, 1), data(30, 2)


class LogReg(L.LightningModule):
    """Logistic regression with one tuned L2 decay per feature (and dropout on the inputs,
    so that trajectory replays must reproduce the Trainer's random draws)."""

    def __init__(self, dropout=0.0, lr=0.5):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(5, 1).double()
        self.drop, self.lr = torch.nn.Dropout(dropout), lr
        self.decay = hg.Positive(torch.full((5,), 1e-2, dtype=DT))

    def hyperparameters_to_tune(self):
        return {"decay": self.decay}

    def training_loss(self, batch, hparams):
        x, y = batch
        w = self.linear.weight.squeeze(0)
        fit = BCE(self.linear(self.drop(x)).squeeze(1), y)
        return fit + 0.5 * (hparams["decay"] * w**2).sum()

    def validation_loss(self, batch, hparams):
        x, y = batch
        return BCE(self.linear(x).squeeze(1), y)

    def training_step(self, batch, batch_idx):
        return self.training_loss(batch, tuned_values(self))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader(batch_size=16, sharded=False):
    """The training rows in order; ``sharded``: rows ``rank::world`` of each rank (read when
    iterating, once the process group exists; Lightning's own sampler would shuffle)."""
    ds = torch.utils.data.TensorDataset(*TRAIN)
    sampler = Shard(len(ds)) if sharded else None
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler)


class Shard(torch.utils.data.Sampler):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        return iter(range(rank, self.n, world))

    def __len__(self):
        return self.n // 2


def trainer(**kw):
    kw = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        **kw,
    }
    return L.Trainer(**kw)


def callback(method=None, **kw):
    kw.setdefault("val_batch_size", 16)
    kw.setdefault("every_n_steps", 3)
    return HypergradientCallback(
        val_data=VAL,
        method=hg.IFT(hg.CG(maxiter=5), damping=0.1) if method is None else method,
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.1),
        **kw,
    )


def reference(method, steps):
    """The same training as the documented HyperOptimizer loop."""
    module = LogReg()
    opt = torch.optim.SGD(module.parameters(), lr=module.lr)
    hopt = hg.HyperOptimizer(
        module,
        module.hyperparameters_to_tune(),
        inner_optimizer=opt,
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.1),
        train_loss=lambda m, h, b: m.training_loss(b, h),
        val_loss=lambda m, h, b: m.validation_loss(b, h),
        val_data=VAL,
        val_batch_size=16,
        method=method,
        inner_steps=3,
    )
    batches = list(loader())
    for i in range(steps):
        batch = batches[i % len(batches)]
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        hopt.step(batch)
    return module, hopt


METHODS = {
    "ift": lambda: hg.IFT(hg.CG(maxiter=5), damping=0.1),
    "unrolled": lambda: hg.Unrolled(),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_the_trainer_run_is_the_hyperoptimizer_loop(method):
    ref_module, ref = reference(METHODS[method](), 9)
    module, cb = LogReg(), callback(METHODS[method]())
    trainer(max_steps=9, callbacks=[cb]).fit(module, loader())
    assert cb.hopt.hyper_steps == ref.hyper_steps == 3
    assert torch.equal(module.decay.raw, ref_module.decay.raw)
    assert torch.equal(module.linear.weight, ref_module.linear.weight)
    assert [r.val_loss for r in cb.hopt.history] == [r.val_loss for r in ref.history]
    assert not torch.equal(module.decay.value, torch.full((5,), 1e-2, dtype=DT))


def test_a_trajectory_method_replays_the_trainers_own_dropout_masks():
    """The callback records torch's random state before each of the Trainer's forward
    passes: the replay ends on the Trainer's weights to rounding, where replaying with
    other masks would not (checked on the same run without the recorded states)."""
    module, cb = LogReg(dropout=0.5), callback(hg.Unrolled())
    trainer(max_steps=9, callbacks=[cb]).fit(module, loader())
    errors = [r.info.replay_error for r in cb.hopt.history]
    assert len(errors) == 3 and max(errors) < 1e-14
    window = cb.hopt.state_dict()["window"]
    assert window is None  # closed by the last hyper-step


def test_resuming_from_a_trainer_checkpoint_continues_the_same_run(tmp_path):
    """Three epochs of 4 steps straight, or two (checkpoint at the end of the second, in the
    middle of a 3-step window) and a resumed third: the same hyperparameters, weights,
    outer optimizer state and holdout guard."""
    kw = {"holdout_data": HOLD, "holdout_batch_size": 8}
    straight, cb = LogReg(), callback(**kw)
    trainer(max_epochs=3, callbacks=[cb]).fit(straight, loader())
    checkpoint = L.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="last", save_top_k=-1)
    first = callback(**kw)
    trainer(max_epochs=2, callbacks=[first, checkpoint], enable_checkpointing=True).fit(
        LogReg(), loader()
    )
    path = tmp_path / "last.ckpt"
    saved = torch.load(path, weights_only=False)
    assert saved["callbacks"]["HypergradientCallback"]["hopt"]["counters"]["count"] == 8
    resumed, second = LogReg(), callback(**kw)
    trainer(max_epochs=3, callbacks=[second]).fit(resumed, loader(), ckpt_path=path)
    assert second.hopt.hyper_steps == cb.hopt.hyper_steps == 4
    assert torch.equal(resumed.decay.raw, straight.decay.raw)
    assert torch.equal(resumed.linear.weight, straight.linear.weight)
    a, b = cb.hopt.outer_optimizer.state_dict(), second.hopt.outer_optimizer.state_dict()
    assert torch.equal(a["state"][0]["exp_avg"], b["state"][0]["exp_avg"])
    assert second.hopt.best_holdout_loss == cb.hopt.best_holdout_loss is not None


def test_hyper_steps_are_logged_through_the_trainers_logger(tmp_path):
    module, cb = LogReg(), callback()
    log = L.loggers.CSVLogger(tmp_path, name="run")
    trainer(max_steps=9, callbacks=[cb], logger=log, log_every_n_steps=1).fit(module, loader())
    with open(Path(log.log_dir) / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("hypergradient/loss/val")]
    # Lightning writes the last logged values again at the next logging steps: keep the first
    values = [r["hypergradient/loss/val"] for r in rows]
    rows = [r for i, r in enumerate(rows) if i == 0 or values[i] != values[i - 1]]
    assert len(rows) == 3
    for row, record in zip(rows, cb.hopt.history):
        assert float(row["hypergradient/loss/val"]) == pytest.approx(record.val_loss, rel=1e-6)
        for i in range(5):
            want = float(record.hparams["decay"][i])
            assert float(row[f"hypergradient/hparams/decay/{i}"]) == pytest.approx(want, rel=1e-6)
        assert float(row["hypergradient/solver/num_hvps"]) == record.info.num_hvps


def test_gradient_accumulation_counts_optimizer_steps_and_refuses_replays():
    module, cb = LogReg(), callback()
    trainer(max_steps=6, callbacks=[cb], accumulate_grad_batches=2).fit(module, loader())
    assert cb.hopt.hyper_steps == 2 and cb.hopt.loop.count == 6
    with pytest.raises(ValueError, match="accumulate_grad_batches=2"):
        trainer(max_steps=6, callbacks=[callback(hg.Unrolled())], accumulate_grad_batches=2).fit(
            LogReg(), loader()
        )
    with pytest.raises(ValueError, match="gradient_clip_val"):
        trainer(max_steps=6, callbacks=[callback(hg.Unrolled())], gradient_clip_val=1.0).fit(
            LogReg(), loader()
        )


def test_a_diverging_trainer_run_is_warned_with_the_trainers_losses():
    """lr = 1e3 with decay 1e-2: the penalty's gradient step multiplies the weights by
    |1 - 1e3 * 1e-2| = 9 per step. The warning quotes the training losses that the Trainer's
    ``training_step`` returned (the callback passes them on), and the hyper-step is skipped."""
    module, cb = LogReg(lr=1e3), callback(on_divergence="skip")
    with pytest.warns(hg.HypergradientWarning, match=r"diverging.*training losses \[") as got:
        trainer(max_steps=6, callbacks=[cb]).fit(module, loader())
    assert cb.hopt.skipped == 1 and cb.hopt.hyper_steps == 1
    (w,) = [w for w in got if "diverging" in str(w.message)]
    norms = re.search(r"parameter norms \[([^\]]*)\]", str(w.message)).group(1).split(", ")
    flat = torch.cat([p.detach().reshape(-1) for p in module.linear.parameters()])
    assert float(norms[-1]) == pytest.approx(float(flat.norm()), rel=5e-3)  # 3 digits quoted


def test_a_module_without_declarations_is_refused_naming_the_fix():
    class Plain(LogReg):
        hyperparameters_to_tune = None

    with pytest.raises(ValueError, match="hyperparameters_to_tune"):
        trainer(max_steps=3, callbacks=[callback()]).fit(Plain(), loader())

    decay = hg.Positive(torch.full((5,), 1e-2, dtype=DT))

    class External(Plain):  # the callback holds the hyperparameters and the losses
        def training_step(self, batch, batch_idx):
            return self.training_loss(batch, {"decay": decay.value})

    cb = callback(
        hparams={"decay": decay},
        train_loss=lambda m, h, b: m.training_loss(b, h),
        val_loss=lambda m, h, b: m.validation_loss(b, h),
    )
    trainer(max_steps=3, callbacks=[cb]).fit(External(), loader())
    assert cb.hopt.hyper_steps == 1
    assert not torch.equal(decay.value, torch.full_like(decay.value, 1e-2))
    with pytest.raises(ValueError, match="every_n_steps"):
        callback(every_n_steps=0)
    with pytest.raises(hg.ArgumentTypeError, match="`method`"):
        callback(method="ift")


# ------------------------------------------------------------------ DDP (gloo, 2 processes)

DDP_SCRIPT = """
import json, sys
import torch
import lightning.pytorch as L
sys.path.insert(0, {tests!r})
import test_integrations_lightning as T

module, cb = T.LogReg(), T.callback(val_batch_size=None)
trainer = L.Trainer(
    strategy={strategy!r}, accelerator="cpu", devices={devices}, max_steps=6, logger=False,
    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    limit_val_batches=0, num_sanity_val_steps=0, callbacks=[cb], use_distributed_sampler=False,
)
trainer.fit(module, T.loader({batch_size}, sharded={devices} > 1))
out = {{"rank": trainer.global_rank, "raw": module.decay.raw.tolist(),
       "weight": module.linear.weight.reshape(-1).tolist(),
       "val": [r.val_loss for r in cb.hopt.history], "hyper_steps": cb.hopt.hyper_steps}}
with open({out!r} + f".{{trainer.global_rank}}.json", "w") as f:
    json.dump(out, f)
"""


def run_script(server, tmp_path, name, **kw):
    out = str(tmp_path / name)
    tests = str(Path(__file__).resolve().parent)
    script = tmp_path / f"{name}.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(tests=tests, out=out, **kw)))
    env = dict(os.environ, PYTHONPATH=tests, OMP_NUM_THREADS="1")
    done = server.run([str(script)], env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = []
    for rank in range(2):
        path = Path(f"{out}.{rank}.json")
        if path.exists():
            results.append(json.loads(path.read_text()))
    return results


def test_ddp_on_two_cpu_processes_matches_one_process_on_the_union(tmp_path):
    """Two ranks, each with half of every batch (DistributedSampler: rows r::2) and half of
    the validation rows: the averaged objectives are those of one process on the whole
    batch and all validation rows, so the hyperparameters agree to float64 rounding."""
    # each script runs as `python script.py` would, forked from a process that imported
    # torch, Lightning and hypergradient once (tests/forked.py); Lightning starts rank 1 as a
    # fresh `python script.py`
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent), OMP_NUM_THREADS="1")
    with ScriptServer(["torch", "hypergradient", "lightning.pytorch"], env) as server:
        ddp = run_script(server, tmp_path, "ddp", strategy="ddp", devices=2, batch_size=16)
        single = run_script(server, tmp_path, "single", strategy="auto", devices=1, batch_size=32)
    assert len(ddp) == 2 and len(single) == 1
    assert ddp[0]["raw"] == ddp[1]["raw"] and ddp[0]["hyper_steps"] == 2
    ref = torch.tensor(single[0]["raw"], dtype=DT)
    for rank in ddp:
        assert torch.allclose(torch.tensor(rank["raw"], dtype=DT), ref, rtol=1e-10, atol=0)
        assert torch.allclose(
            torch.tensor(rank["weight"], dtype=DT),
            torch.tensor(single[0]["weight"], dtype=DT),
            rtol=1e-10,
            atol=1e-13,
        )
        assert rank["val"] == pytest.approx(single[0]["val"], rel=1e-10)
    assert not torch.equal(ref, torch.full((5,), float(torch.tensor(1e-2).log()), dtype=DT))
