"""Under ``precision="bf16-mixed"`` T1T2 warned at every hyper-step that the step's gradient
was not ``train_loss``'s (``on_divergence="skip"``: every hyper-step skipped, nothing tuned).

The driver learns the steps' autocast state from a forward pre-hook on the module, which a
``training_step`` calling its layers directly (``self.linear(x)``, as the tutorial's module
does) never runs: it took the bfloat16 steps for float32 ones, replayed them in float32 and
compared at float32's tolerance (the bfloat16 step was 1.9e-3 away). The callback now passes
the Trainer's autocast dtype (``HyperOptimizer(autocast=...)``), and accepts ``autocast=``
like the other options it passes on. Reference: the documented loop stepping under
``torch.autocast`` with ``autocast=torch.bfloat16``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

L = pytest.importorskip("lightning.pytorch")
from hypergradient.integrations.lightning import HypergradientCallback  # noqa: E402
from test_integrations_lightning import LogReg, trainer  # noqa: E402

BCE = torch.nn.functional.binary_cross_entropy_with_logits
G = torch.Generator().manual_seed(0)
X = torch.randn(104, 6, generator=G)
Y = (X @ torch.randn(6, generator=G) + 0.3 * torch.randn(104, generator=G) > 0).float()
TRAIN, VAL = (X[:64], Y[:64]), (X[64:], Y[64:])


class Direct(LogReg):
    """The suite's logistic regression (its ``training_step`` calls the layer directly), in
    float32 (autocast leaves float64 alone)."""

    def __init__(self):
        L.LightningModule.__init__(self)
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(6, 1)
        self.drop, self.lr = torch.nn.Dropout(0.0), 0.3
        self.decay = hg.Positive(torch.full((6,), 1e-2))


def batches():
    return [(TRAIN[0][i : i + 16], TRAIN[1][i : i + 16]) for i in range(0, 64, 16)]


def loader():
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*TRAIN), batch_size=16)


def outer(hp):
    return torch.optim.Adam(hp, lr=0.1)


def lightning_run(precision, **kw):
    module = Direct()
    cb = HypergradientCallback(
        val_data=VAL, val_batch_size=40, method=hg.T1T2(), every_n_steps=3,
        outer_optimizer=outer, on_divergence="skip", **kw,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=6, callbacks=[cb], precision=precision).fit(module, loader())
    ours = [str(w.message) for w in caught if issubclass(w.category, hg.HypergradientWarning)]
    return cb.hopt, ours


def documented_loop():
    module = Direct()
    hopt = hg.HyperOptimizer(
        module, module.hyperparameters_to_tune(),
        inner_optimizer=torch.optim.SGD(module.parameters(), lr=0.3), outer_optimizer=outer,
        train_loss=lambda m, h, b: m.training_loss(b, h),
        val_loss=lambda m, h, b: m.validation_loss(b, h),
        val_data=VAL, val_batch_size=40, method=hg.T1T2(), inner_steps=3,
        on_divergence="skip", autocast=torch.bfloat16,
    )  # fmt: skip
    for batch in batches() + batches()[:2]:
        hopt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            loss = module.training_loss(batch, {"decay": module.decay.value})
        loss.backward()
        hopt.step(batch)
    return hopt


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])  # (16-mixed: bf16 on CPU)
def test_t1t2_under_mixed_precision_takes_every_hyper_step_as_the_documented_loop(precision):
    hopt, ours = lightning_run(precision)
    assert ours == [] and hopt.skipped == 0 and hopt.hyper_steps == 2
    ref = documented_loop()
    assert ref.skipped == 0 and ref.hyper_steps == 2
    for a, b in zip(hopt.history, ref.history):
        assert torch.allclose(a.hypergrad["decay"], b.hypergrad["decay"], rtol=1e-6, atol=0)
    # the bfloat16 steps: another hypergradient than the float32 run's
    full, _ = lightning_run("32-true")
    first = (hopt.history[0].hypergrad["decay"], full.history[0].hypergrad["decay"])
    assert not torch.allclose(*first, rtol=1e-5, atol=0)


def test_an_autocast_option_is_passed_on():
    """``autocast=False`` says the steps ran in full precision: under bf16-mixed the step
    check then compares at float32's tolerance and skips, as the guess used to."""
    hopt, ours = lightning_run("bf16-mixed", autocast=False)
    assert hopt.skipped == 2 and len(ours) == 2
    assert "not train_loss's gradient" in ours[0]
