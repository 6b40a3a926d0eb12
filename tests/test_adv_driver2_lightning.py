"""The Lightning callback with a learning-rate scheduler: Lightning steps it before
``on_train_batch_end``, where the callback takes its hyper-step; the hyper-step must still
differentiate the step taken, with its learning rate (it read the next one: with
``StepLR(step_size=3, gamma=0.1)`` and ``every_n_steps=3``, T1T2 was 10x too small).
Reference: the same Trainer run without the scheduler (identical up to the hyper-step)."""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

L = pytest.importorskip("lightning.pytorch")
from hypergradient.integrations.lightning import HypergradientCallback  # noqa: E402
from test_integrations_lightning import VAL, LogReg, loader  # noqa: E402


class Scheduled(LogReg):
    def __init__(self, interval):
        super().__init__()
        self.interval = interval

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.interval is None:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.interval}}


def _first_hypergrad(method, interval, batch_size=16):
    cb = HypergradientCallback(
        val_data=VAL,
        every_n_steps=4 if interval == "epoch" else 3,
        method=method,
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.0),
        log=False,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=4 if interval == "epoch" else 3,
        num_sanity_val_steps=0,
        callbacks=[cb],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Scheduled(interval), loader(batch_size))
    assert cb.hopt.hyper_steps == 1
    return cb.hopt.history[0].hypergrad["decay"]


@pytest.mark.parametrize("method", ["T1T2", "IFT"])
def test_step_scheduler(method):
    make = hg.T1T2 if method == "T1T2" else (lambda: hg.IFT(damping=0.1))
    ref = _first_hypergrad(make(), None)
    got = _first_hypergrad(make(), "step")
    assert ref.abs().max() > 0
    assert torch.equal(got, ref)


def test_epoch_scheduler_on_the_last_batch():
    """64 rows in batches of 16: the 4th step ends the epoch, and an epoch scheduler
    (StepLR(step_size=3) counts epochs: stepped once, no change) is stepped first; a
    gamma applied there would be read by the hyper-step."""

    class EveryEpoch(Scheduled):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=self.lr)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    ref = _first_hypergrad(hg.T1T2(), "epoch")  # the Scheduled module: epoch StepLR(3)
    cb = HypergradientCallback(
        val_data=VAL,
        every_n_steps=4,
        method=hg.T1T2(),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.0),
        log=False,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=4,
        num_sanity_val_steps=0,
        callbacks=[cb],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(EveryEpoch("epoch"), loader(16))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05)  # stepped
    assert torch.equal(cb.hopt.history[0].hypergrad["decay"], ref)
