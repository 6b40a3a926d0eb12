"""Adversarial checks of the Lightning callback (round 8): a NaN holdout score left the
previous score in ``trainer.callback_metrics`` for a monitor (EarlyStopping,
ModelCheckpoint) to read."""

from __future__ import annotations

import math

import pytest
import torch

import hypergradient as hg

L = pytest.importorskip("lightning.pytorch")
from hypergradient.integrations.lightning import HypergradientCallback  # noqa: E402
from test_integrations_lightning import TRAIN, VAL, LogReg  # noqa: E402


@pytest.mark.filterwarnings("ignore")
def test_a_nan_holdout_score_reaches_callback_metrics_as_nan():
    seen = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            value = trainer.callback_metrics.get("hypergradient/loss/holdout")
            seen.append(None if value is None else float(value))

    calls = []

    def holdout_loss(m, h, b):
        calls.append(1)
        value = 3.0 * m.validation_loss(b, h)
        return value * math.nan if len(calls) == 2 else value

    tuner = HypergradientCallback(
        val_data=VAL,
        every_n_steps=2,
        method=hg.IFT(hg.CG(maxiter=5), damping=0.1),
        holdout_data=VAL,
        holdout_loss=holdout_loss,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[tuner, Watch()],
        max_steps=6,
    )
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*TRAIN), batch_size=16)
    trainer.fit(LogReg(), loader)
    scores = [r.holdout_loss for r in tuner.hopt.history]
    assert math.isnan(scores[1]) and all(math.isfinite(s) for s in scores[::2])
    f32 = [torch.tensor(s, dtype=torch.float32).item() for s in scores]
    assert seen[0] is None and seen[1] == seen[2] == f32[0] and seen[5] == f32[2]
    assert math.isnan(seen[3]) and math.isnan(seen[4])  # was the stale f32[0]
