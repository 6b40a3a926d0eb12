"""Adversarial checks of the Lightning callback (third round): hyperparameters declared as
plain numbers; the x of the records in the Trainer's logger under manual optimization.

A float, a list or a NumPy array returned by ``hyperparameters_to_tune()`` (or passed as
``hparams=``) crashed in ``on_fit_start`` with ``AttributeError: 'float' object has no
attribute 'device'``; it is refused with an ``ArgumentTypeError`` naming the entry and the
fix, before the Trainer takes a step (the weights are the initial ones).

Under manual optimization the callback wrote each record at ``x = global_step - 1``, but
Lightning writes a batch's own metrics at the number of batches before it: with one step
every 2 batches (Lightning's documented manual accumulation) the records landed at half the
x of their batch (2 and 5 instead of 5 and 11), with 2 steps per batch at twice (past the
end of the run's curves). Reference: the batches counted in ``training_step``, and the row
Lightning wrote for the same batch."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

import hypergradient as hg

L = pytest.importorskip("lightning.pytorch")
from test_adv_eco_lightning import Manual, ordered  # noqa: E402
from test_integrations_lightning import LogReg, callback, loader, trainer  # noqa: E402


@pytest.mark.parametrize(
    "value", [0.01, [0.01] * 5, np.full(5, 0.01)], ids=["float", "list", "ndarray"]
)
def test_a_number_declared_as_a_hyperparameter_is_refused_before_training(value):
    class Declared(LogReg):
        def hyperparameters_to_tune(self):
            return {"decay": value}

    module = Declared()
    before = module.linear.weight.detach().clone()
    with pytest.raises(hg.ArgumentTypeError, match=r"\['decay'\].*tensor or a Constraint"):
        trainer(max_steps=3, callbacks=[callback()]).fit(module, loader())
    assert torch.equal(module.linear.weight, before)


def test_the_hparams_argument_is_checked_at_construction():
    with pytest.raises(hg.ArgumentTypeError, match=r"hparams\['decay'\]"):
        callback(hparams={"decay": 0.01})
    with pytest.raises(hg.ArgumentTypeError, match="`hparams` must be a dict"):
        callback(hparams=[torch.ones(3)])


class Counted(Manual):
    """Manual optimization that counts its batches and logs each batch's index."""

    seen = 0

    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)
        self.seen += 1
        self.log("batch_idx", float(batch_idx), on_step=True, on_epoch=False)


class HyperBatches(L.Callback):
    """After the tuner: the batches (counted from 0 over the run) that took a hyper-step."""

    def __init__(self, tuner):
        self.tuner, self.done, self.batches = tuner, 0, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for _ in range(self.tuner.hopt.hyper_steps - self.done):
            self.batches.append(pl_module.seen - 1)
        self.done = self.tuner.hopt.hyper_steps


@pytest.mark.parametrize(
    "steps,every,want", [(1, 2, [5, 11]), (2, 1, [1, 2, 4, 5, 7, 8, 10, 11]), (1, 1, [2, 5, 8, 11])]
)
def test_records_reach_the_logger_at_their_batchs_x_under_manual_optimization(
    tmp_path, steps, every, want
):
    import warnings

    warnings.simplefilter("ignore", hg.HypergradientWarning)
    log = L.loggers.CSVLogger(tmp_path, name="run")
    tuner = callback(hg.IFT(hg.CG(maxiter=5), damping=0.1), val_batch_size=16)
    seen = HyperBatches(tuner)
    module = Counted(steps=steps, every=every)
    trainer(max_epochs=3, callbacks=[tuner, seen], logger=log, log_every_n_steps=1).fit(
        module, ordered()
    )
    with open(f"{log.log_dir}/metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    own = {int(r["step"]): float(r["batch_idx"]) for r in rows if r.get("batch_idx")}
    hyper = [r for r in rows if r.get("hypergradient/loss/val")]
    assert seen.batches == want and len(hyper) == len(want) == tuner.hopt.hyper_steps
    assert [int(r["step"]) for r in hyper] == want  # (1, 2): was [2, 5]; (2, 1): [2, 5, ..., 23]
    assert [own[x] for x in want] == [float(b % 4) for b in want]  # Lightning's row of the batch
    for row, record in zip(hyper, tuner.hopt.history):
        assert float(row["hypergradient/loss/val"]) == record.val_loss
