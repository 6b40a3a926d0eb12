"""Adversarial review of ``hg.optim``: functional twins of torch optimizers.

``from_torch(torch.optim.Adam(..., decoupled_weight_decay=True))`` returned a twin with an
L2 (coupled) decay, so a trajectory method replayed another update rule than the one that
ran (one step from ones with lr 0.1, decay 0.5: 0.90 instead of torch's 0.85), silently.
It is refused now, naming the flag; the coupled twin still steps exactly as torch.
"""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg
from hypergradient._vocab import ArgumentTypeError

DT = torch.float64


def one_step(opt: torch.optim.Optimizer, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    p.grad = g.clone()
    opt.step()
    return p.detach().clone()


def test_adam_with_decoupled_decay_has_no_twin():
    p = torch.ones(3, dtype=DT, requires_grad=True)
    opt = torch.optim.Adam([p], lr=0.1, weight_decay=0.5, decoupled_weight_decay=True)
    with pytest.raises(ArgumentTypeError, match="decoupled_weight_decay"):
        hg.optim.from_torch(opt, [p])
    inner = torch.nn.Linear(2, 1).double()
    with pytest.raises(ValueError, match="decoupled_weight_decay"):
        hg.HyperOptimizer(
            inner,
            {"d": hg.Positive(0.1)},
            inner_optimizer=torch.optim.Adam(
                inner.parameters(), lr=0.1, weight_decay=0.5, decoupled_weight_decay=True
            ),
            outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.1),
            train_loss=lambda m, h, b: (m(b[0]) - b[1]).pow(2).mean() * h["d"],
            val_loss=lambda m, h, b: (m(b[0]) - b[1]).pow(2).mean(),
            val_data=(torch.ones(4, 2, dtype=DT), torch.ones(4, 1, dtype=DT)),
            method=hg.Unrolled(),
            inner_steps=2,
        )


@pytest.mark.parametrize("wd", [0.0, 0.5])
def test_the_coupled_adam_twin_steps_as_torch(wd):
    g = torch.tensor([0.2, -0.1, 0.3], dtype=DT)
    p = torch.ones(3, dtype=DT, requires_grad=True)
    opt = torch.optim.Adam([p], lr=0.1, weight_decay=wd)
    twin, state, step = hg.optim.from_torch(opt, [p])
    assert state is None and step == 0
    (mine,), _ = twin.update([p.detach().clone()], [g], twin.init([p]), 0)
    assert float((mine - one_step(opt, p, g)).abs().max()) < 1e-15
