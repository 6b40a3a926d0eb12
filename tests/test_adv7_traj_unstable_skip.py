"""HyperOptimizer: a trajectory method's unstable run honours ``on_divergence``.

Adam with ``betas=(0, 0.999)`` at lr 0.3 over a 200-step window of a tanh MLP: the loss stays
bounded, so the hyper-optimizer's watch (losses, parameter norms) sees nothing, but the
replay's adjoint grows ~4e13-fold and the hypergradient in lr is ~1.7e13. With
``on_divergence="skip"`` it was applied all the same; now the hyper-step is skipped with a
warning (and applied with the method's warning under the default ``"warn"``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hypergradient as hg

DT = torch.float64
GEN = torch.Generator().manual_seed(0)
X = torch.randn(64, 5, generator=GEN, dtype=DT)
Y = torch.sin(X.sum(1, keepdim=True))
XV = torch.randn(32, 5, generator=GEN, dtype=DT)
YV = torch.sin(XV.sum(1, keepdim=True))
mse = nn.functional.mse_loss


def run(on_divergence, lr=0.3, beta1=0.0, steps=200, method=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    hopt = hg.HyperOptimizer(
        model,
        {"lr": torch.tensor(lr, dtype=DT)},
        inner_optimizer=torch.optim.Adam(model.parameters(), lr=lr, betas=(beta1, 0.999)),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.0),
        train_loss=lambda m, h, b: mse(m(b[0]), b[1]),
        val_loss=lambda m, h, b: mse(m(b[0]), b[1]),
        val_data=(XV, YV),
        method=method or hg.Unrolled(),
        inner_steps=steps,
        optimizer_hparams={"lr": "lr"},
        on_divergence=on_divergence,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            hopt.zero_grad()
            hopt.train_loss((X, Y)).backward()
            hopt.step((X, Y))
    return hopt, [str(w.message) for w in caught]


@pytest.mark.parametrize("method", [hg.Unrolled(), hg.DrMAD(anchors=199)], ids=["unr", "drmad"])
def test_skip_skips_the_unstable_runs_hyper_step(method):
    hopt, messages = run("skip", method=method)
    assert hopt.skipped == 1 and hopt.hyper_steps == 0 and len(hopt.history) == 0
    assert any("hyper-step skipped" in m and "grew" in m for m in messages)


def test_warn_applies_it_with_the_methods_warning():
    hopt, messages = run("warn")
    assert hopt.skipped == 0 and hopt.hyper_steps == 1
    record = hopt.history[-1]
    assert record.info.status == hg.Status.DIVERGED
    assert abs(float(record.hypergrad["lr"])) > 1e9
    assert any("of no use" in m for m in messages)


@pytest.mark.parametrize("lr", [0.01, 0.1])
def test_a_healthy_window_is_applied_silently(lr):
    hopt, messages = run("skip", lr=lr, beta1=0.9, steps=50)
    assert hopt.skipped == 0 and hopt.hyper_steps == 1
    assert hopt.history[-1].info.status == hg.Status.FIXED_BUDGET
    assert not [m for m in messages if "of no use" in m or "skipped" in m]
