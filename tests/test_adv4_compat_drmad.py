"""HippoTrainer's ``DRMAD`` trains ``T`` steps and reverses along the straight line
``w0 -> wT``. With a learning rate above ``2 / lambda_max`` the steps oscillate and grow
(finite), and the compat layer applied the resulting hypergradient silently: the
hyperparameters moved by 4.5e13 over 30 steps at ``lr = 2.5 / lambda_max``. ``hg.DrMAD``
measures the run's path deviation and warns above ``MAX_DEVIATION``; the compat layer
called it with the check off. It now measures the path of the steps it takes (one norm
per step) and warns in the same words."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from hypergradient import HypergradientWarning
from hypergradient.compat.hippotrainer import DRMAD

DT = torch.float64


def _setup(lr_factor, T):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g, dtype=DT)
    y = x @ torch.randn(5, 1, generator=g, dtype=DT) + 0.1 * torch.randn(40, 1, generator=g)
    train, val = (x[:20], y[:20]), (x[20:], y[20:])
    torch.manual_seed(0)
    model = nn.Linear(5, 1, bias=False).double()
    theta = torch.full((5,), -2.0, dtype=DT)

    def criterion(out, target):
        return ((out - target) ** 2).mean() + (theta.exp() * model.weight[0].square()).sum()

    hessian = 2 * train[0].T @ train[0] / 20 + 2 * torch.diag(theta.exp())
    lr = lr_factor / float(torch.linalg.eigvalsh(hessian).max())
    hopt = DRMAD(
        {"theta": theta},
        hyper_lr=1.0,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        train_loader=[train],
        val_loader=[val],
        criterion=criterion,
        T=T,
    )
    return hopt, theta


@pytest.mark.parametrize(("lr_factor", "T"), [(2.2, 10), (2.5, 30)])
def test_an_oscillating_or_diverging_run_warns(lr_factor, T):
    hopt, theta = _setup(lr_factor, T)
    with pytest.warns(HypergradientWarning, match="path deviation"):
        hopt.hyper_step()


def test_a_smooth_run_does_not_warn():
    hopt, theta = _setup(0.5, 10)
    before = theta.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", HypergradientWarning)
        hopt.hyper_step()
    assert not torch.equal(theta, before)
