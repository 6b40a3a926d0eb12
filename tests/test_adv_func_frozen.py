"""Frozen ``nn.Parameter``s passed as parameters are named in a warning.

Adversarial review: fine-tuning a head on a frozen backbone and passing
``dict(model.named_parameters())`` made the frozen weights variables of the inner problem:
``hg.implicit`` returned a hypergradient of the wrong sign (10x off) with only the generic
"not a minimum" warning, and trajectory methods trained the frozen weights. Now a
``HypergradientWarning`` names them and says what to pass; passing the trained parameters
gives the exact hypergradient (closed form: ridge regression on the frozen features).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hypergradient as hg

DT = torch.float64


def _setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)
    for p in net[0].parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(30, 3, generator=g, dtype=DT), torch.randn(30, 1, generator=g, dtype=DT)
    Xv, yv = torch.randn(20, 3, generator=g, dtype=DT), torch.randn(20, 1, generator=g, dtype=DT)
    with torch.no_grad():
        Z = torch.cat([torch.tanh(net[0](X)), torch.ones(30, 1, dtype=DT)], 1)
        Zv = torch.cat([torch.tanh(net[0](Xv)), torch.ones(20, 1, dtype=DT)], 1)
    reg = torch.diag(torch.tensor([1.0] * 5 + [0.0], dtype=DT))

    def head(h):  # the ridge solution: the inner optimum for weight decay exp(h)
        return torch.linalg.solve(2 * Z.T @ Z / 30 + 2 * h.exp() * reg, 2 * Z.T @ y / 30)

    def f(p, h):
        decay = h.exp() * (p["2.weight"] ** 2).sum()
        return ((functional_call(net, p, (X,)) - y) ** 2).mean() + decay

    def g_(p, h):
        return ((functional_call(net, p, (Xv,)) - yv) ** 2).mean()

    h = torch.tensor(-2.0, dtype=DT)
    theta = head(h)
    with torch.no_grad():
        net[2].weight.copy_(theta[:5].T)
        net[2].bias.copy_(theta[5])
    # d/dh of the validation loss at the ridge solution, differentiated in closed form
    hh = h.clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(((Zv @ head(hh) - yv) ** 2).mean(), hh)
    return net, f, g_, h, float(exact)


def test_frozen_parameters_are_named_and_the_trained_ones_give_the_exact_answer():
    net, f, g, h, exact = _setup()
    trained = {k: v for k, v in net.named_parameters() if v.requires_grad}
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)
        out = hg.implicit(f, g, trained, h, hg.Exact())
    assert float(out) == pytest.approx(exact, rel=1e-9)
    with pytest.warns(hg.HypergradientWarning, match=r"params\['0.weight'\] and 1 more.*frozen"):
        hg.implicit(f, g, dict(net.named_parameters()), h, hg.Exact(), stationarity=None)
    with pytest.warns(hg.HypergradientWarning, match=r"params0\['0.weight'\].*frozen"):
        hg.unrolled(f, g, dict(net.named_parameters()), h, 2, hg.optim.sgd(0.1))


def test_plain_tensors_and_trainable_parameters_do_not_warn():
    net, f, g, h, _ = _setup()
    for p in net.parameters():
        p.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)
        hg.unrolled(f, g, dict(net.named_parameters()), h, 2, hg.optim.sgd(0.1))
        plain = {k: v.detach().clone() for k, v in net.named_parameters()}
        hg.unrolled(f, g, plain, h, 2, hg.optim.sgd(0.1))
