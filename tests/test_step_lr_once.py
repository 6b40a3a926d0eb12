"""A hyper-step computes the inner step's rate (``build.inner_lr``) once: the zero-rate check
and the Problem share it through the step's Transaction (``build.step_lr``); a new step
(another transaction) computes it again, so a schedule's new rate is seen."""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg
from hypergradient.hyperoptimizer import build, stepping


def _run(monkeypatch, method, steps=20, schedule=False):
    calls, rates = [], []
    real = build.inner_lr
    for module in (build, stepping):  # (stepping imports it by name)
        monkeypatch.setattr(module, "inner_lr", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    x, y = torch.randn(32, 5), torch.randn(32, 1)
    xv, yv = torch.randn(32, 5), torch.randn(32, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hopt = hg.HyperOptimizer(
        model,
        {"decay": hg.Positive(torch.tensor(1e-2))},
        method=method,
        inner_optimizer=opt,
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.01),
        train_loss=lambda m, h, b: (
            ((m(b[0]) - b[1]) ** 2).mean() + h["decay"] * (m.weight**2).sum()
        ),
        val_loss=lambda m, h, b: ((m(b[0]) - b[1]) ** 2).mean(),
        val_data=(xv, yv),
        inner_steps=5,
    )
    method_call = type(method).__call__
    monkeypatch.setattr(
        type(method), "__call__", lambda s, p: rates.append(p.lr) or method_call(s, p)
    )
    for t in range(steps):
        if schedule and t == 12:
            opt.param_groups[0]["lr"] = 0.05
        hopt.zero_grad()
        hopt.train_loss((x, y)).backward()
        hopt.step((x, y))
    return calls, rates, hopt


def test_t1t2_computes_the_rate_once_per_hyper_step(monkeypatch):
    calls, rates, hopt = _run(monkeypatch, hg.T1T2(), schedule=True)
    assert len(hopt.history) == 4 and len(calls) == 4  # was 8: zero-rate check and Problem
    got = [float(torch.as_tensor(r).flatten()[0]) for r in rates]
    assert got == pytest.approx([0.1, 0.1, 0.05, 0.05])


def test_default_ift_computes_the_rate_once_per_hyper_step(monkeypatch):
    calls, rates, hopt = _run(monkeypatch, hg.IFT())
    assert len(hopt.history) == 4 and len(calls) == 4
    assert rates == [0.1] * 4


def test_a_zero_rate_step_is_still_skipped(monkeypatch):
    """The shared rate is the one the check reads: a step at lr 0 skips with its warning."""
    calls, rates, hopt = _run(monkeypatch, hg.T1T2(), steps=0)
    hopt.inner_optimizer.param_groups[0]["lr"] = 0.0
    x, y = torch.randn(32, 5), torch.randn(32, 1)
    with pytest.warns(hg.HypergradientWarning, match="learning rate 0"):
        for _ in range(5):
            hopt.zero_grad()
            hopt.train_loss((x, y)).backward()
            hopt.step((x, y))
    assert len(hopt.history) == 0 and rates == []
