"""A run starting to diverge within the window, its loss oscillating as it grows.

Momentum SGD (beta 0.9) on a tanh MLP at 0.85 times the stability limit
``2 (1 + beta) / lambda_max`` of the start: the last losses of 30 steps are
``[1.52, 0.99, 1.35, 6.98]`` (and 1e31 twenty steps later), so the dip defeats the "grew 3x
at each step" rule, and the hypergradient, exact for that run (lr: -5.6e3 where the run at
0.7 times the limit gives 2.19), was returned and applied without a word by Unrolled,
ForwardMode and DrMAD. A loss that ends at its highest, at least ten times its lowest,
while the sensitivity (adjoint or probe tangent) grew at least 100-fold, is now reported.
References: central differences of the plain loop; the run at 0.7 gets no warning.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import hypergradient as hg
from hypergradient.methods import growth

DT, BETA = torch.float64, 0.9
torch.manual_seed(0)
NET = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)
GEN = torch.Generator().manual_seed(0)
X, Y = torch.randn(32, 4, generator=GEN, dtype=DT), torch.randn(32, 1, generator=GEN, dtype=DT)
XV, YV = torch.randn(16, 4, generator=GEN, dtype=DT), torch.randn(16, 1, generator=GEN, dtype=DT)
P0 = {k: v.detach().clone() for k, v in NET.named_parameters()}
STEPS = 30


def inner(p, h):
    decay = 0.5 * h["decay"] * sum((q**2).sum() for q in p.values())
    return F.mse_loss(functional_call(NET, p, (X,)), Y) + decay


def outer(p, h):
    return F.mse_loss(functional_call(NET, p, (XV,)), YV)


def limit():
    """``2 (1 + beta) / lambda_max`` of the training loss's Hessian at the start."""
    flat = torch.cat([v.reshape(-1) for v in P0.values()])

    def loss(vec):
        leaves, i = {}, 0
        for k, v in P0.items():
            leaves[k] = vec[i : i + v.numel()].view_as(v)
            i += v.numel()
        return F.mse_loss(functional_call(NET, leaves, (X,)), Y)

    lam = float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat)).max())
    return 2 * (1 + BETA) / lam


LIMIT = limit()


def plain(lr, decay=1e-3):
    """The validation loss after the run, by a plain loop (torch.optim.SGD)."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)
    model.load_state_dict(NET.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=BETA)
    for _ in range(STEPS):
        opt.zero_grad()
        loss = F.mse_loss(model(X), Y) + 0.5 * decay * sum((q**2).sum() for q in model.parameters())
        loss.backward()
        opt.step()
    return F.mse_loss(model(XV), YV).item()


def call(method, factor):
    h = {"lr": torch.tensor(factor * LIMIT, dtype=DT), "decay": torch.tensor(1e-3, dtype=DT)}
    opt = hg.optim.sgd(lr=h["lr"], momentum=BETA)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g, info = method(inner, outer, P0, h, STEPS, opt, return_info=True)
    return float(g["lr"]), info, [str(w.message) for w in caught if "of no use" in str(w.message)]


METHODS = {
    "unrolled": hg.unrolled,
    "forward_mode": hg.forward_mode,
    "drmad_exact": lambda *a, **k: hg.drmad(*a, anchors=STEPS - 1, max_deviation=None, **k),
}


def central(factor, rel=1e-7):
    lr = factor * LIMIT
    return (plain(lr * (1 + rel)) - plain(lr * (1 - rel))) / (2 * rel * lr)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_onset_of_divergence_is_reported(name):
    got, info, unstable = call(METHODS[name], 0.85)
    assert got == pytest.approx(central(0.85), rel=1e-3)  # exact for the run: -5.6e3
    assert abs(got) > 1e3
    losses = info.inner_losses
    assert losses[-1] == max(losses) and losses[-3] < losses[-4]  # a dip before the rise
    assert info.status == hg.Status.DIVERGED and info.stats["unstable"]
    assert "starting to diverge" in info.stats["diverging"]
    assert len(unstable) == 1


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_healthy_run_just_below_is_not_flagged(name):
    got, info, unstable = call(METHODS[name], 0.7)
    assert got == pytest.approx(central(0.7), rel=1e-5)  # 2.19
    assert info.status == hg.Status.FIXED_BUDGET and not unstable


def hyperoptimize(method, factor):
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)
    model.load_state_dict(NET.state_dict())
    lr = factor * LIMIT
    h = {"lr": torch.tensor(lr, dtype=DT), "decay": torch.tensor(1e-3, dtype=DT)}
    hopt = hg.HyperOptimizer(
        model, h, inner_optimizer=torch.optim.SGD(model.parameters(), lr=lr, momentum=BETA),
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=1e-3),
        train_loss=lambda m, h, b: F.mse_loss(m(b[0]), b[1])
        + 0.5 * h["decay"] * sum((q**2).sum() for q in m.parameters()),
        val_loss=lambda m, h, b: F.mse_loss(m(b[0]), b[1]), val_data=(XV, YV), method=method,
        inner_steps=STEPS, optimizer_hparams={"lr": "lr"}, on_divergence="skip",
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(STEPS):
            hopt.zero_grad()
            hopt.train_loss((X, Y)).backward()
            hopt.step((X, Y))
    return hopt, [str(w.message) for w in caught if "of no use" in str(w.message)]


@pytest.mark.parametrize("method", [hg.Unrolled, hg.ForwardMode])
def test_the_hyper_optimizer_skips_the_onset_and_applies_the_healthy_run(method):
    hopt, unstable = hyperoptimize(method(), 0.85)
    assert hopt.skipped == 1 and hopt.hyper_steps == 0 and len(unstable) == 1
    assert float(hopt.hparams["lr"]) == 0.85 * LIMIT  # -5.6e3 not applied
    hopt, unstable = hyperoptimize(method(), 0.7)
    assert hopt.skipped == 0 and hopt.hyper_steps == 1 and not unstable


def test_the_rule_on_exact_sequences():
    assert growth.loss_rising([1.0, 0.5, 0.25, 2.5]) is not None  # 10x its lowest, its highest
    assert growth.loss_rising([1.0, 0.5, 0.25, 2.4]) is None  # below 10x
    assert growth.loss_rising([5.0, 0.25, 4.0, 3.5]) is None  # not its highest at the end
    assert growth.loss_rising([-1.0, -2.0, 16.0]) is not None  # a rise of 9 |lowest|
    assert growth.loss_rising([-1.0, -2.0, 15.5]) is None
    assert growth.loss_rising([1.0, 0.0, 3.0]) is None  # a lowest of 0 has no scale


class _Info:
    def __init__(self, losses):
        self.inner_losses, self.status, self.stats = losses, hg.Status.FIXED_BUDGET, {}


@pytest.mark.parametrize(
    ("losses", "stats", "flagged"),
    [
        ([1.0, 0.3, 3.0], {"adjoint_growth": 100.0}, True),
        ([1.0, 0.3, 3.0], {"adjoint_growth": 99.0}, False),  # the loss alone: noise
        ([1.0, 0.3, 3.0], {"tangent_growth": 100.0}, True),
        ([1.0, 0.3, 2.0], {"tangent_growth": 1e5}, False),  # the sensitivity alone
        ([1.0, 0.3, 0.2], {"adjoint_growth": 1e6}, True),  # chaotic: the first rule
    ],
)
def test_both_signals_are_needed(losses, stats, flagged):
    info = _Info(losses)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        growth.report_unstable(info, stats, 3)
    assert (info.status == hg.Status.DIVERGED) is flagged
    assert len(caught) == int(flagged)
