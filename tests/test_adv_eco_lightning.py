"""Adversarial checks of the Lightning callback in Trainer set-ups the other tests do not
reach: resuming with dropout and a shuffling loader, validation loops between epochs.

References: the uninterrupted Trainer run (a resumed run must reproduce it bit for bit)."""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

L = pytest.importorskip("lightning.pytorch")
from hypergradient.integrations.lightning import HypergradientCallback, tuned_values  # noqa: E402
from test_integrations_lightning import TRAIN, VAL, LogReg  # noqa: E402


class Net(LogReg):
    """The suite's logistic regression with dropout on the inputs (its weights drawn without
    moving torch's global stream), and a validation loop."""

    def __init__(self, dropout=0.5, lr=0.5):
        with torch.random.fork_rng(devices=[]):
            super().__init__(dropout, lr)

    def validation_step(self, batch, batch_idx):
        self.log("val", self.validation_loss(batch, tuned_values(self)))


def loaders():
    train = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*TRAIN), batch_size=16, shuffle=True
    )
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*VAL), batch_size=20)
    return train, val


def trainer(**kw):
    kw = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        **kw,
    }
    return L.Trainer(**kw)


def callback(method):
    return HypergradientCallback(
        val_data=VAL,
        val_batch_size=16,
        every_n_steps=3,
        method=method,
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.1),
    )


METHODS = {
    "ift": lambda: hg.IFT(hg.CG(maxiter=5), damping=0.1),
    "unrolled": lambda: hg.Unrolled(),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_resuming_with_dropout_and_shuffling_reproduces_the_uninterrupted_run(tmp_path, method):
    """Three epochs straight, or two (checkpoint after the second epoch's validation, in
    the middle of a window) and a resumed third. The checkpoint's random-number state must
    be in place before the Trainer draws the third epoch's permutation and worker seed (it
    used to be restored after them, at the start of training: other rows, other masks)."""
    warnings.simplefilter("ignore", hg.HypergradientWarning)
    straight, cb = Net(), callback(METHODS[method]())
    torch.manual_seed(5)
    trainer(max_epochs=3, callbacks=[cb]).fit(straight, *loaders())
    first, early = Net(), callback(METHODS[method]())
    checkpoint = L.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="last", save_top_k=-1)
    torch.manual_seed(5)
    trainer(max_epochs=2, callbacks=[early, checkpoint], enable_checkpointing=True).fit(
        first, *loaders()
    )
    assert [r.val_loss for r in early.hopt.history] == [r.val_loss for r in cb.hopt.history][:2]
    resumed, late = Net(), callback(METHODS[method]())
    torch.manual_seed(123)  # whatever the new process drew: the checkpoint decides
    trainer(max_epochs=3, callbacks=[late]).fit(
        resumed, *loaders(), ckpt_path=tmp_path / "last.ckpt"
    )
    assert late.hopt.hyper_steps == cb.hopt.hyper_steps == 4
    assert [r.val_loss for r in late.hopt.history] == [r.val_loss for r in cb.hopt.history]
    assert torch.equal(resumed.decay.raw, straight.decay.raw)
    assert torch.equal(resumed.linear.weight, straight.linear.weight)


class Manual(Net):
    """Manual optimization: ``steps`` optimizer steps per batch, or one step every
    ``every`` batches with the gradients accumulated in between."""

    def __init__(self, steps=1, every=1):
        super().__init__(dropout=0.0)
        self.automatic_optimization = False
        self.steps, self.every = steps, every

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        for _ in range(self.steps):
            loss = self.training_loss(batch, tuned_values(self)) / self.every
            self.manual_backward(loss)
            if (batch_idx + 1) % self.every == 0:
                opt.step()
                opt.zero_grad()


def ordered():
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*TRAIN), batch_size=16)


def test_manual_optimization_counts_optimizer_steps_and_refuses_what_replays_cannot():
    """Two optimizer steps per batch: every_n_steps counts optimizer steps (18 steps, 6
    hyper-steps; it counted batches: 3). A trajectory method cannot replay two steps from
    one recorded batch, nor a step on gradients accumulated over batches: it raises naming
    the reason (it used to replay wrongly, 0.2 relative off, with a warning blaming
    train_loss)."""
    warnings.simplefilter("ignore", hg.HypergradientWarning)
    cb = callback(METHODS["ift"]())
    run = trainer(max_steps=18, callbacks=[cb])
    run.fit(Manual(steps=2), ordered())
    assert run.global_step == cb.hopt.loop.count == 18 and cb.hopt.hyper_steps == 6
    with pytest.raises(ValueError, match="took 2 optimizer steps on one batch"):
        trainer(max_steps=6, callbacks=[callback(hg.Unrolled())]).fit(Manual(steps=2), ordered())
    with pytest.raises(ValueError, match="without an optimizer step under manual optimization"):
        trainer(max_steps=6, callbacks=[callback(hg.Unrolled())]).fit(Manual(every=2), ordered())


class Skips(Net):
    """Automatic optimization skipping the second batch of each epoch (returns None)."""

    def training_step(self, batch, batch_idx):
        return None if batch_idx == 1 else super().training_step(batch, batch_idx)


def test_a_batch_skipped_by_returning_none_is_not_an_inner_step():
    """Lightning still counts an optimizer step for a batch whose training_step returned
    None, but nothing moved (no backward; gradients None). The run must be the run on the
    other batches alone; the callback used to record the skipped batch as a step (the
    Unrolled replay then moved the weights along its gradient: replay error ~0.3)."""
    rows = torch.cat([torch.arange(16), torch.arange(32, 64)])  # all but the second batch
    kept = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*(t[rows] for t in TRAIN)), batch_size=16
    )
    for method in ("unrolled", "ift"):
        skipping, cb = Skips(), callback(METHODS[method]())
        torch.manual_seed(7)
        trainer(max_epochs=2, callbacks=[cb]).fit(skipping, ordered())
        plain, ref = Net(), callback(METHODS[method]())
        torch.manual_seed(7)
        trainer(max_epochs=2, callbacks=[ref]).fit(plain, kept)
        assert cb.hopt.loop.count == ref.hopt.loop.count == 6 and cb.hopt.hyper_steps == 2
        assert torch.equal(skipping.decay.raw, plain.decay.raw)
        assert torch.equal(skipping.linear.weight, plain.linear.weight)


def test_every_hyper_step_reaches_the_logger_with_lightnings_default_logging_interval(tmp_path):
    """With the Trainer's default log_every_n_steps=50 and a hyper-step every 3 steps,
    pl_module.log_dict alone wrote only at Lightning's logging steps (here none of the 4
    hyper-steps). Each record must reach the logger, at the row of its batch (x = step - 1,
    where Lightning puts that batch's training_step metrics), with its values unrounded;
    and stay monitorable through trainer.callback_metrics."""
    import csv

    log = L.loggers.CSVLogger(tmp_path, name="run")
    cb = callback(METHODS["ift"]())
    run = trainer(max_steps=12, callbacks=[cb], logger=log)
    warnings.simplefilter("ignore", hg.HypergradientWarning)
    run.fit(Net(), ordered())
    with open(f"{log.log_dir}/metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("hypergradient/loss/val")]
    assert [int(r["step"]) for r in rows] == [2, 5, 8, 11]
    for row, record in zip(rows, cb.hopt.history):
        assert float(row["hypergradient/loss/val"]) == record.val_loss
        assert float(row["hypergradient/hparams/decay/4"]) == float(record.hparams["decay"][4])
    last = float(run.callback_metrics["hypergradient/loss/val"])
    assert last == pytest.approx(cb.hopt.history[-1].val_loss, rel=1e-6)


def test_records_are_logged_whatever_history_size_and_the_users_sinks_still_receive(tmp_path):
    """history_size=0 keeps no record: the callback read hopt.history after each step and
    logged nothing at all. It now receives each committed record as a sink, after the
    user's own ones."""
    import csv

    log, seen = L.loggers.CSVLogger(tmp_path, name="run"), []
    cb = HypergradientCallback(
        val_data=VAL,
        val_batch_size=16,
        every_n_steps=3,
        method=METHODS["ift"](),
        history_size=0,
        logger=seen.append,
    )
    warnings.simplefilter("ignore", hg.HypergradientWarning)
    trainer(max_steps=12, callbacks=[cb], logger=log).fit(Net(), ordered())
    assert len(cb.hopt.history) == 0 and cb.hopt.hyper_steps == len(seen) == 4
    with open(f"{log.log_dir}/metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("hypergradient/loss/val")]
    assert [float(r["hypergradient/loss/val"]) for r in rows] == [r.val_loss for r in seen]


def test_a_lightning_logger_given_as_a_sink_is_refused_at_construction(tmp_path):
    """Lightning's own TensorBoardLogger passed as the callback's `logger` was accepted and
    only failed when fitting started, without saying where it belongs."""
    lightning_logger = L.loggers.TensorBoardLogger(tmp_path)
    for value in (lightning_logger, [print, lightning_logger]):
        with pytest.raises(hg.ArgumentTypeError, match=r"Trainer\(logger=\.\.\.\)"):
            HypergradientCallback(val_data=VAL, logger=value)


class FrozenBias(Net):
    """The bias frozen; the optimizer built from self.parameters() (Lightning's usual
    configure_optimizers) or, as the reference, from the trained weight alone."""

    def __init__(self, all_parameters):
        super().__init__(dropout=0.0)
        self.linear.bias.requires_grad_(False)
        self.all_parameters = all_parameters

    def configure_optimizers(self):
        params = self.parameters() if self.all_parameters else [self.linear.weight]
        return torch.optim.SGD(params, lr=self.lr)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_frozen_parameter_inside_the_optimizer_is_not_a_trained_one(method):
    """torch's optimizer never moves a tensor without gradient, but the hyper-optimizer took
    every tensor of its param groups as trained: Unrolled replayed steps of the frozen bias
    (replay error 0.2) and IFT solved with the bias's Hessian rows. The run must be the run
    whose optimizer holds the weight alone."""
    warnings.simplefilter("ignore", hg.HypergradientWarning)
    runs = []
    for all_parameters in (True, False):
        module, cb = FrozenBias(all_parameters), callback(METHODS[method]())
        trainer(max_steps=9, callbacks=[cb]).fit(module, ordered())
        runs.append((module, cb))
    (a, cb_a), (b, cb_b) = runs
    assert cb_a.hopt.hyper_steps == cb_b.hopt.hyper_steps == 3
    assert [r.val_loss for r in cb_a.hopt.history] == [r.val_loss for r in cb_b.hopt.history]
    assert torch.equal(a.decay.raw, b.decay.raw)
    assert torch.equal(a.linear.weight, b.linear.weight)
    if method == "unrolled":
        assert max(r.info.replay_error for r in cb_a.hopt.history) < 1e-14
