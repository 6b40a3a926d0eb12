"""HippoTrainer's ``DRMAD`` trains ``T`` steps inside each hyper-step and reverses along
the straight line ``w0 -> wT``. With a learning rate above ``2 / lambda_max`` (ridge
regression, whose Hessian is known exactly) those steps grow geometrically and the compat
layer applied the resulting hypergradient silently (hyperparameters moved by 1.2e10 at
``lr = 3.5 / lambda_max``, ``T = 10``). Its training steps are now watched as
``hg.HyperOptimizer`` watches its inner run (:mod:`hypergradient.hyperoptimizer.divergence`):
sustained growth warns. A healthy stochastic run (minibatches of 4, whose path zigzags)
does not warn."""

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


@pytest.mark.parametrize(("lr_factor", "T"), [(3.5, 10), (4.0, 5)])
def test_an_oscillating_or_diverging_run_warns(lr_factor, T):
    hopt, theta = _setup(lr_factor, T)
    with pytest.warns(HypergradientWarning, match=r"DRMAD's \d+ training steps.*is diverging"):
        hopt.hyper_step()


def test_a_slower_divergence_sustained_over_the_run_warns():
    """lr = 2.5 / lambda_max: the weights grow 1.5x per step, below the watch's 2x, and the
    hyperparameters moved by 4.5e13 over 30 steps; the loss grew 1e10x and still grows (the
    trajectory methods' rule; the watch's own steady-growth rule, loss 1.4x and norm 1.15x a
    step, may say it first)."""
    hopt, theta = _setup(2.5, 30)
    with pytest.warns(HypergradientWarning, match=r"DRMAD's 30 training steps.*diverg"):
        hopt.hyper_step()


def test_a_smooth_run_does_not_warn():
    hopt, theta = _setup(0.5, 10)
    before = theta.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", HypergradientWarning)
        hopt.hyper_step()
    assert not torch.equal(theta, before)


def test_a_healthy_minibatch_run_does_not_warn():
    hopt, theta = _setup(0.5, 10)
    x, y = hopt.train_loader[0]
    hopt.train_loader[:] = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 20, 4)]
    hopt._train = type(hopt._train)(hopt.train_loader, "train_loader")
    with warnings.catch_warnings():
        warnings.simplefilter("error", HypergradientWarning)
        for _ in range(3):
            hopt.hyper_step()
