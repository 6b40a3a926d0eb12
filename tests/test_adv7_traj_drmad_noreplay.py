"""HyperOptimizer with ``DrMAD(replay=False)`` and an inner optimizer that keeps buffers.

The method reverses from the model's weights and needs a stateless optimizer; with
``SGD(momentum=0.9)`` or Adam the construction succeeded and the error came at the first
hyper-step, after ``inner_steps`` steps of training. It is now refused at construction,
before anything runs; plain SGD still works.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hypergradient as hg

DT = torch.float64
GEN = torch.Generator().manual_seed(0)
X, Y = torch.randn(32, 5, generator=GEN, dtype=DT), torch.randn(32, 1, generator=GEN, dtype=DT)
mse = nn.functional.mse_loss


def build(model, inner):
    return hg.HyperOptimizer(
        model,
        {"wd": torch.tensor(1e-3, dtype=DT)},
        inner_optimizer=inner,
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.1),
        train_loss=lambda m, h, b: mse(m(b[0]), b[1]) + h["wd"] * (m.weight**2).sum(),
        val_loss=lambda m, h, b: mse(m(b[0]), b[1]),
        val_data=(X, Y),
        method=hg.DrMAD(replay=False),
        inner_steps=3,
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps: torch.optim.Adam(ps, lr=0.01),
    ],
    ids=["momentum", "adam"],
)
def test_an_optimizer_with_buffers_is_refused_at_construction(make):
    torch.manual_seed(0)
    model = nn.Linear(5, 1).double()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"replay=False.*stateless.*hg.DrMAD\(\)"):
        build(model, make(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_plain_sgd_takes_its_hyper_steps():
    torch.manual_seed(0)
    model = nn.Linear(5, 1).double()
    hopt = build(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(3):
        hopt.zero_grad()
        hopt.train_loss((X, Y)).backward()
        hopt.step((X, Y))
    assert hopt.hyper_steps == 1 and torch.isfinite(hopt.history[-1].hypergrad["wd"])
