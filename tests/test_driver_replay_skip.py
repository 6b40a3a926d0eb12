"""A trajectory method's hyper-step whose replay is not the run that was trained (gradient
clipping in the user's loop) is skipped with a warning instead of applied: its
hypergradient was 5.9x off central differences of the plain loop (replay 65% off, warned,
applied). Without clipping the same loop's hypergradient is the plain loop's derivative."""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg
from hypergradient.hyperoptimizer.stepping import REPLAY_SKIP

DT = torch.float64
torch.manual_seed(0)
X, Y = torch.randn(32, 5, dtype=DT), torch.randn(32, dtype=DT)
XV, YV = torch.randn(16, 5, dtype=DT), torch.randn(16, dtype=DT)
BATCHES = [(X[i * 8 : i * 8 + 8], Y[i * 8 : i * 8 + 8]) for i in range(4)]


def train_loss(m, h, b):
    return ((m(b[0]).reshape(-1) - b[1]) ** 2).mean() + (h["decay"] * m[0].weight ** 2).sum()


def val_loss(m, h, b):
    return ((m(b[0]).reshape(-1) - b[1]) ** 2).mean()


def model0():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    return net.double()


def loop(m, opt, h, step, clip):
    for b in BATCHES:
        opt.zero_grad()
        train_loss(m, h(), b).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
        step(b)


def plain(decay):
    m = model0()
    opt = torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.5)
    loop(m, opt, lambda: {"decay": decay}, lambda b: opt.step(), None)
    with torch.no_grad():
        return float(val_loss(m, None, (XV, YV)))


def run(method, clip):
    m = model0()
    opt = torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.5)
    decay = torch.full((4, 5), 0.02, dtype=DT)
    hopt = hg.HyperOptimizer(
        m,
        {"decay": decay.clone()},
        inner_optimizer=opt,
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=1.0),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(XV, YV),
        method=method,
        inner_steps=4,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loop(m, opt, lambda: hopt.hparams, hopt.step, clip)
    return hopt, decay, [str(w.message) for w in caught]


@pytest.mark.parametrize("make", [hg.Unrolled, hg.DrMAD, hg.ForwardMode])
def test_a_replay_of_another_run_is_skipped(make):
    hopt, decay, caught = run(make(), clip=0.05)
    assert hopt.skipped == 1 and len(hopt.history) == 0
    assert torch.equal(hopt.hparams["decay"], decay)  # nothing applied
    assert any("hyper-step skipped: the replay" in c and "clipping" in c for c in caught)


def test_an_exact_replay_is_applied_and_is_the_plain_loops_derivative():
    hopt, decay, caught = run(hg.Unrolled(), clip=None)
    assert hopt.skipped == 0 and len(hopt.history) == 1
    assert hopt.history[-1].info.replay_error < 1e-12 < REPLAY_SKIP
    got = hopt.history[-1].hypergrad["decay"]
    ref = torch.zeros_like(decay)
    for j in range(decay.numel()):
        e = torch.zeros_like(decay)
        e.view(-1)[j] = 1e-6
        ref.view(-1)[j] = (plain(decay + e) - plain(decay - e)) / 2e-6
    assert float((got - ref).norm() / ref.norm()) < 1e-6
    assert torch.allclose(hopt.hparams["decay"], decay - got)  # applied (outer SGD lr 1)
