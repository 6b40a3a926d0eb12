"""T1T2 in a loop with ``clip_grad_norm_`` (docs/tutorials/own-training-loop.md).

The tutorial said that T1T2, having no replay, "works with such loops". It differentiates
the plain step ``theta - lr * grad``: with a gradient of norm 8.2 clipped to 0.05 the
hypergradient it applied was about 660 times the exact hypergradient of the clipped step
(float64 autograd through the clipped step; /work/scratch/s14/loops/p15_clip_t1t2.py), here
with a gradient of norm 19.6 about 2600 times. The tutorial now says so, and the driver
warns (the step's ``.grad`` is not the replayed gradient of ``train_loss``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hypergradient as hg

LR, MAXN = 0.1, 0.05
GEN = torch.Generator().manual_seed(0)
X = torch.randn(8, 3, generator=GEN, dtype=torch.float64)
Y = X @ torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64) + 4.0
XV = torch.randn(16, 3, generator=GEN, dtype=torch.float64)
YV = XV @ torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64) + 4.0


def train_loss(m, h, b):
    return ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean() + 0.5 * (h["decay"] * m.weight[0] ** 2).sum()


def val_loss(m, h, b):
    return ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean()


def exact(w0, b0, lam):
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    loss = ((X @ w + b - Y) ** 2).mean() + 0.5 * (lam * w**2).sum()
    gw, gb = torch.autograd.grad(loss, (w, b), create_graph=True)
    clip = torch.clamp(MAXN / (torch.sqrt((gw**2).sum() + gb**2) + 1e-6), max=1.0)
    w1, b1 = w - LR * clip * gw, b - LR * clip * gb
    return torch.autograd.grad(((XV @ w1 + b1 - YV) ** 2).mean(), lam)[0]


def test_t1t2_under_clipping_applies_the_unclipped_steps_hypergradient():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    w0, b0 = model.weight.detach()[0].clone(), model.bias.detach()[0].clone()
    hopt = hg.HyperOptimizer(
        model,
        {"decay": torch.full((3,), 0.1, dtype=torch.float64)},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(XV, YV),
        method=hg.T1T2(),
        inner_steps=1,
    )
    hopt.zero_grad()
    hopt.train_loss((X, Y)).backward()
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAXN))
    with pytest.warns(hg.HypergradientWarning, match="not train_loss's gradient"):
        hopt.step((X, Y))
    applied = 0.1 - hopt.hparams["decay"]
    reference = exact(w0, b0, torch.full((3,), 0.1, dtype=torch.float64, requires_grad=True))
    ratio = float(applied.norm() / reference.norm())
    assert norm > 100 * MAXN  # clipping shrank the step a hundredfold and more
    assert ratio > 100  # the documented caveat: far from the clipped step's hypergradient
