"""T1T2 inside HyperOptimizer differentiates the step taken, with that step's dropout masks.

T1T2 is one unrolled step for plain SGD. Its inner loss was evaluated at the hyper-step
with fresh dropout masks, not those of the step: per-example weights (learning to reweight)
got a hypergradient 106% off the derivative of the step the optimizer took. The driver now
records the step's random-number state for T1T2 too and evaluates the inner loss under it.
Reference: autograd through one SGD step written by hand in float64, with the real masks.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergradient as hg

DT = torch.float64
LR = 0.1


def problem():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 5, generator=g, dtype=DT), torch.randn(16, 2, generator=g, dtype=DT)
    xv, yv = torch.randn(16, 5, generator=g, dtype=DT), torch.randn(16, 2, generator=g, dtype=DT)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 2)
    ).double()
    return model, (x, y), (xv, yv)


def weights(ex):
    return torch.ones(16, dtype=DT).index_put((torch.arange(4),), ex, accumulate=True)


def train_loss(m, h, b):
    per_example = (m(b[0]) - b[1]).pow(2).sum(1)
    return (per_example * weights(h["ex"])).mean() + h["pen"] * (m[0].weight ** 2).sum()


def val_loss(m, h, b):
    was = m.training
    m.eval()
    try:
        return F.mse_loss(m(b[0]), b[1])
    finally:
        m.train(was)


HPARAMS = {"pen": torch.tensor(1e-2, dtype=DT), "ex": torch.zeros(4, dtype=DT)}


def by_hand(model0, batch, val, seed):
    """d val(theta - lr grad f(theta; masks of seed)) / d (pen, ex), float64 autograd."""
    m = copy.deepcopy(model0)
    p0 = {n: p.detach().clone().requires_grad_(True) for n, p in m.named_parameters()}
    bufs = {n: b.clone() for n, b in m.named_buffers()}
    h = {k: v.clone().requires_grad_(True) for k, v in HPARAMS.items()}
    torch.manual_seed(seed)
    out = torch.func.functional_call(m, {**p0, **bufs}, (batch[0],))
    f = ((out - batch[1]).pow(2).sum(1) * weights(h["ex"])).mean()
    f = f + h["pen"] * (p0["0.weight"] ** 2).sum()
    grads = torch.autograd.grad(f, list(p0.values()), create_graph=True)
    p1 = {n: p - LR * g for (n, p), g in zip(p0.items(), grads)}
    m.eval()
    v = F.mse_loss(torch.func.functional_call(m, {**p1, **bufs}, (val[0],)), val[1])
    return dict(zip(h, torch.autograd.grad(v, list(h.values()))))


@pytest.mark.parametrize("announced", [False, True], ids=["step", "begin_end_step"])
def test_t1t2_uses_the_steps_dropout_masks(announced):
    model0, batch, val = problem()
    model = copy.deepcopy(model0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    hopt = hg.HyperOptimizer(
        model,
        {k: v.clone() for k, v in HPARAMS.items()},
        inner_optimizer=opt,
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=val,
        method=hg.T1T2(),
        inner_steps=1,
    )
    torch.manual_seed(5)
    if announced:  # a loop stepping the optimizer itself (Lightning's order)
        hopt.begin_step()
        opt.zero_grad()
        train_loss(model, hopt.hparams, batch).backward()
        opt.step()
        hopt.end_step(batch)
    else:
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        hopt.step(batch)
    want = by_hand(model0, batch, val, seed=5)
    got = hopt.history[-1].hypergrad
    for k in HPARAMS:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-13)
