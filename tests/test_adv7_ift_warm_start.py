"""``hg.IFT`` is :class:`~hypergradient.Implicit` with a default solver, and the docs
(``docs/which-method.md``: "``IFT`` / ``Implicit`` in a ``HyperOptimizer``: ``hg.RecycledCG()``
with ``warm_start=True``") advise its warm start, but ``IFT(..., warm_start=True)`` raised
``TypeError: unexpected keyword argument 'warm_start'`` (and ``residual=`` likewise)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hypergradient as hg


def _run(method, steps=9):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(1)
    X, y = (
        torch.randn(30, 3, generator=g, dtype=torch.float64),
        torch.randint(0, 2, (30,), generator=g),
    )
    ce = nn.CrossEntropyLoss()

    def train_loss(m, h, batch):
        return ce(m(batch[0]), batch[1]) + h["w"] * sum((p**2).sum() for p in m.parameters())

    def val_loss(m, h, batch):
        return ce(m(batch[0]), batch[1])

    hopt = hg.HyperOptimizer(
        model,
        {"w": torch.tensor(0.05, dtype=torch.float64)},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9),
        outer_optimizer=lambda r: torch.optim.SGD(r, lr=0.01),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(X, y),
        method=method,
        inner_steps=3,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        for i in range(steps):
            batch = (X[(i % 3) * 10 : (i % 3) * 10 + 10], y[(i % 3) * 10 : (i % 3) * 10 + 10])
            hopt.zero_grad()
            hopt.train_loss(batch).backward()
            hopt.step(batch)
    return hopt


@pytest.mark.parametrize("solver", [lambda: hg.CG(maxiter=50, tol=1e-10), hg.RecycledCG])
def test_ift_takes_warm_start_as_implicit_does(solver):
    ift = _run(hg.IFT(solver(), damping=1.0, warm_start=True))  # was a TypeError
    imp = _run(hg.Implicit(solver(), damping=1.0, warm_start=True))
    assert [r.info.stats["warm_start"] for r in ift.history][:2] == ["none", "used"]
    for a, b in zip(ift.history, imp.history, strict=True):
        assert torch.equal(a.hypergrad["w"], b.hypergrad["w"])
    state = ift.state_dict()["method"]["state"]
    assert torch.equal(state["x"], ift.history[-1].info.solution)


def test_ift_residual_false_and_defaults_unchanged():
    off = _run(hg.IFT(damping=1.0, residual=False, seed=0), steps=3).history[-1].info
    on = _run(hg.IFT(damping=1.0, seed=0), steps=3).history[-1].info
    assert off.residual_norm is None and off.extra_hvps == on.extra_hvps - 1  # no residual
    assert on.residual_norm is not None
    assert "warm_start" not in hg.IFT().config() and "residual" not in hg.IFT().config()
    with pytest.raises(TypeError, match="warm_start"):
        hg.IFT(warm_start="yes")
