"""``load_tuned``: a module loaded by ``load_from_checkpoint`` (no Trainer, no callback) gets
the hyperparameters the callback tuned, which the weights alone do not restore.

Reference: the callback's own hyperparameters when the checkpoint was written (bit for bit),
and the module's initial values when the hook is absent (what Lightning restores alone)."""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg

L = pytest.importorskip("lightning.pytorch")
from hypergradient.integrations.lightning import (  # noqa: E402
    HypergradientCallback,
    load_tuned,
    tuned_values,
)

DT = torch.float64
BCE = torch.nn.functional.binary_cross_entropy_with_logits
g = torch.Generator().manual_seed(0)
X = torch.randn(96, 4, generator=g, dtype=DT)
Y = (X @ torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=DT) > 0).to(DT)


class Gated(L.LightningModule):
    """A tuned decay (training only) and a tuned temperature (used by predictions)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 1).double()
        self.decay = hg.Positive(torch.full((4,), 1e-2, dtype=DT))
        self.temperature = torch.ones((), dtype=DT)

    def hyperparameters_to_tune(self):
        return {"decay": self.decay, "temperature": self.temperature}

    def forward(self, x):
        return self.linear(x).squeeze(1) / self.temperature

    def training_loss(self, batch, hparams):
        x, y = batch
        w = self.linear.weight.squeeze(0)
        out = self.linear(x).squeeze(1) / hparams["temperature"]
        return BCE(out, y) + 0.5 * (hparams["decay"] * w**2).sum()

    def validation_loss(self, batch, hparams):
        x, y = batch
        return BCE(self.linear(x).squeeze(1) / hparams["temperature"], y)

    def training_step(self, batch, batch_idx):
        return self.training_loss(batch, tuned_values(self))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Restoring(Gated):
    def on_load_checkpoint(self, checkpoint):
        load_tuned(self, checkpoint)


SETTINGS = dict(
    logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu"
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tuned.ckpt"
    tuner = HypergradientCallback(
        val_data=(X[64:], Y[64:]),
        every_n_steps=2,
        outer_optimizer=lambda p: torch.optim.Adam(p, lr=0.2),
    )
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X[:64], Y[:64]), 16)
    trainer = L.Trainer(max_epochs=2, callbacks=[tuner], enable_checkpointing=False, **SETTINGS)
    trainer.fit(Restoring(), loader)
    trainer.save_checkpoint(path)
    return path, {k: v.clone() for k, v in tuner.hopt.hparams.items()}


def test_load_from_checkpoint_restores_the_tuned_values(trained):
    path, tuned = trained
    assert tuned["temperature"].item() != 1.0  # the hyper-steps moved it
    restored = Restoring.load_from_checkpoint(path)
    assert torch.equal(restored.decay.value, tuned["decay"])
    assert torch.equal(restored.temperature, tuned["temperature"])
    plain = Gated.load_from_checkpoint(path)  # Lightning alone: the weights, initial values
    assert torch.equal(plain.linear.weight, restored.linear.weight)
    assert plain.temperature.item() == 1.0
    expected = restored.linear(X).squeeze(1) / tuned["temperature"]
    torch.testing.assert_close(restored(X), expected, rtol=0, atol=0)


def test_a_checkpoint_without_tuned_values_is_refused_and_nothing_changes(trained):
    path, _ = trained
    module = Gated()
    before = module.temperature.clone(), module.decay.raw.clone()
    with pytest.raises(ValueError, match="no HypergradientCallback hyperparameters"):
        load_tuned(module, {"state_dict": {}, "callbacks": {"ModelCheckpoint": {}}})
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["callbacks"]["Other"] = checkpoint["callbacks"]["HypergradientCallback"]
    with pytest.raises(ValueError, match="2 "):
        load_tuned(module, checkpoint)
    state = checkpoint["callbacks"]["HypergradientCallback"]["hopt"]["hparams"]
    state["raw"]["temperature"] = torch.ones(3, dtype=DT)  # another shape
    del checkpoint["callbacks"]["Other"]
    with pytest.raises(ValueError):
        load_tuned(module, checkpoint)
    assert torch.equal(module.temperature, before[0])
    assert torch.equal(module.decay.raw, before[1])
