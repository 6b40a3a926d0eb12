"""A rolled-back step puts back every tensor the inner optimizer stepped, also those outside
the model (a criterion's learnable temperature trained by the same optimizer,
``SGD(list(model.parameters()) + [temperature])``): it used to restore the model's weights
and the optimizer's state (the temperature's momentum included) but leave the temperature
moved by the undone step. Reference: the state before the call, bit for bit."""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg
from test_hyperoptimizer_support import assert_same, everything

DT = torch.float64
g = torch.Generator().manual_seed(0)
X, Y = torch.randn(32, 5, generator=g, dtype=DT), torch.randn(32, generator=g, dtype=DT)


@pytest.mark.parametrize(
    "method", [hg.IFT(hg.CG(maxiter=5), damping=1.0), hg.Unrolled(), hg.T1T2()], ids=str
)
def test_rollback_restores_a_tensor_outside_the_model(method):
    temp = torch.nn.Parameter(torch.tensor(1.0, dtype=DT))
    calls = {"n": 0}

    def train_loss(m, h, b):
        fit = ((m(b[0]).reshape(-1) * temp - b[1]) ** 2).mean()
        return fit + (h["decay"] * m.weight.reshape(-1) ** 2).sum()

    def val_loss(m, h, b):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("validation failed")
        return ((m(b[0]).reshape(-1) - b[1]) ** 2).mean()

    torch.manual_seed(1)
    model = torch.nn.Linear(5, 1).double()
    opt = torch.optim.SGD(list(model.parameters()) + [temp], lr=0.1, momentum=0.9)
    hopt = hg.HyperOptimizer(
        model,
        {"decay": torch.full((5,), 0.01, dtype=DT)},
        inner_optimizer=opt,
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.1),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(X, Y),
        method=method,
        inner_steps=2,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)  # CG maxiter, replay
        for i in range(4):
            b = (X[i * 8 : (i + 1) * 8], Y[i * 8 : (i + 1) * 8])
            hopt.zero_grad()
            hopt.train_loss(b).backward()
            if i < 3:
                hopt.step(b)
                continue
            before = everything(model, hopt)
            temp_before, grad_before = temp.detach().clone(), temp.grad.clone()
            with pytest.raises(RuntimeError, match="validation failed"):
                hopt.step(b)
    # Unrolled's replay leaves the temperature at its current value (it is not a trained
    # parameter of the model), so its first window's replay is off by more than the bound
    # and that hyper-step is skipped (stepping.REPLAY_SKIP); the others apply it
    assert calls["n"] == 2 and hopt.hyper_steps + hopt.skipped == 1
    assert_same(before, everything(model, hopt))
    assert torch.equal(temp.detach(), temp_before) and torch.equal(temp.grad, grad_before)
