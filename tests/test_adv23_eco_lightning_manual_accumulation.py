"""Under manual optimization T1T2 passed, with no warning, a step accumulated over batches.

Lightning's accumulation recipe (``manual_backward(loss / N)``, then ``opt.step()`` and
``opt.zero_grad()`` every N batches) leaves no ``.grad`` by the time the callback hands the
step to the driver, so T1T2's step check had nothing to read: it applied the hypergradient
of the last batch's step (-0.0560) for an accumulated step whose exact one is -0.0649, where
automatic optimization (``accumulate_grad_batches=2``) warned. The callback now keeps the
gradients the optimizer's step used (a pre-step hook) and shows them to the check.
Reference: autograd through the accumulated SGD step, in float64.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.func import functional_call

import hypergradient as hg

L = pytest.importorskip("lightning.pytorch")
from hypergradient.integrations.lightning import HypergradientCallback, tuned_values  # noqa: E402
from test_integrations_lightning import trainer  # noqa: E402

DT, LR = torch.float64, 0.3
BCE = torch.nn.functional.binary_cross_entropy_with_logits
G = torch.Generator().manual_seed(0)
X = torch.randn(260, 6, generator=G, dtype=DT)
Y = (X @ torch.randn(6, generator=G, dtype=DT) > 0).to(DT)
TRAIN, VAL = (X[:64], Y[:64]), (X[160:], Y[160:])


class Temperature(L.LightningModule):
    """A logit temperature (it scales the data term: its hypergradient sees every batch)."""

    def __init__(self, every, automatic=False):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(6, 1).double()
        self.temp = torch.tensor(1.5, dtype=DT)
        self.every, self.automatic_optimization = every, automatic

    def hyperparameters_to_tune(self):
        return {"temp": self.temp}

    def training_loss(self, batch, hparams):
        x, y = batch
        return BCE(hparams["temp"] * self.linear(x).squeeze(1), y)

    def validation_loss(self, batch, hparams):
        x, y = batch
        return BCE(self.linear(x).squeeze(1), y)

    def training_step(self, batch, batch_idx):
        loss = self.training_loss(batch, tuned_values(self))
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        self.manual_backward(loss / self.every)
        if (batch_idx + 1) % self.every == 0:
            opt.step()
            opt.zero_grad()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def loader():
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*TRAIN), batch_size=16)


def exact(module, every):
    """d/d temp of the validation loss after one SGD step on the mean of ``every`` batches'
    gradients, from the initial weights."""
    start = Temperature(every)
    temp = torch.tensor(1.5, dtype=DT, requires_grad=True)
    p = {k: v.detach().clone().requires_grad_(True) for k, v in start.linear.named_parameters()}
    batches = list(loader())[:every]
    f = sum(BCE(temp * functional_call(start.linear, p, (x,)).squeeze(1), y) for x, y in batches)
    grads = torch.autograd.grad(f / every, list(p.values()), create_graph=True)
    after = {k: v - LR * g for (k, v), g in zip(p.items(), grads)}
    val = BCE(functional_call(start.linear, after, (VAL[0],)).squeeze(1), VAL[1])
    return float(torch.autograd.grad(val, temp)[0])


def run(every, automatic=False, **kw):
    module = Temperature(every, automatic)
    cb = HypergradientCallback(
        val_data=VAL, method=hg.T1T2(), every_n_steps=1,
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.0), **kw,
    )  # fmt: skip
    extra = {"accumulate_grad_batches": every} if automatic else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=1, callbacks=[cb], **extra).fit(module, loader())
    ours = [str(w.message) for w in caught if issubclass(w.category, hg.HypergradientWarning)]
    return cb.hopt, ours, module


@pytest.mark.parametrize("automatic", [False, True], ids=["manual", "automatic"])
def test_a_step_accumulated_over_two_batches_warns(automatic):
    hopt, ours, module = run(2, automatic)
    applied = float(hopt.history[-1].hypergrad["temp"])
    assert abs(applied - exact(module, 2)) > 0.1 * abs(exact(module, 2))  # not this step's
    assert len(ours) == 1 and "not train_loss's gradient" in ours[0], ours


def test_accumulated_steps_are_skipped_on_request():
    hopt, ours, _ = run(2, on_divergence="skip")
    assert hopt.hyper_steps == 0 and hopt.skipped == 1 and len(ours) == 1


def test_one_batch_per_step_is_exact_and_silent_and_the_module_sees_no_gradient_after():
    """The gradients shown to the check are taken away again: the module set them to None."""
    hopt, ours, module = run(1)
    applied = float(hopt.history[-1].hypergrad["temp"])
    assert ours == [] and abs(applied - exact(module, 1)) < 1e-12
    assert all(p.grad is None for p in module.parameters())
