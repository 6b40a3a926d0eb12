"""HippoTrainer's loop steps the optimizer itself; with a learning rate above
``2 / lambda_max`` (full-batch ridge regression, whose Hessian is known exactly) the
weights grow geometrically and each hyper-step differentiates a run that trains nothing.
The compat layer applied those hypergradients silently (T1T2's hyperparameters reached 7e2,
HOAG's 6e194, before the weights overflowed). It now watches the last steps before each
hyper-step as ``hg.HyperOptimizer`` does (:mod:`hypergradient.hyperoptimizer.divergence`):
sustained growth warns, non-finite weights raise before anything changes."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from hypergradient import HypergradientWarning, NonFiniteHypergradientError
from hypergradient.compat.hippotrainer import HOAG, T1T2, Neumann

DT = torch.float64
g = torch.Generator().manual_seed(0)
X = torch.randn(40, 5, generator=g, dtype=DT)
Y = X @ torch.randn(5, 1, generator=g, dtype=DT) + 0.1 * torch.randn(40, 1, generator=g)
TRAIN, VAL = (X[:20], Y[:20]), (X[20:], Y[20:])
THETA0 = -2.0
HESSIAN = 2 * TRAIN[0].T @ TRAIN[0] / 20 + 2 * torch.eye(5, dtype=DT) * torch.tensor(THETA0).exp()
LAMBDA_MAX = float(torch.linalg.eigvalsh(HESSIAN).max())


def _loop(cls, lr_factor, steps, pass_loss=True):
    torch.manual_seed(0)
    model = nn.Linear(5, 1, bias=False).double()
    theta = torch.full((5,), THETA0, dtype=DT)

    def criterion(out, target):
        return ((out - target) ** 2).mean() + (theta.exp() * model.weight[0].square()).sum()

    hopt = cls(
        {"theta": theta},
        hyper_lr=0.1,
        inner_steps=8,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr_factor / LAMBDA_MAX),
        train_loader=[TRAIN],
        val_loader=[VAL],
        criterion=criterion,
    )
    for _ in range(steps):
        loss = criterion(model(TRAIN[0]), TRAIN[1])
        loss.backward()
        hopt.step(loss if pass_loss else None)
        hopt.zero_grad()
    return hopt, model, theta


@pytest.mark.parametrize("cls", [T1T2, HOAG])
@pytest.mark.parametrize("pass_loss", [True, False])
def test_a_diverging_inner_run_warns_at_the_hyper_step(cls, pass_loss):
    with pytest.warns(HypergradientWarning, match=r"inner run is diverging.*is applied"):
        hopt, model, theta = _loop(cls, 3.5, 8, pass_loss)
    assert hopt.step_count == 8 and len(hopt.history) == 1


@pytest.mark.parametrize("cls", [T1T2, HOAG, Neumann])
def test_a_stable_run_does_not_warn(cls):
    with warnings.catch_warnings():
        warnings.simplefilter("error", HypergradientWarning)
        hopt, model, theta = _loop(cls, 0.5, 16)
    assert len(hopt.history) == 2


def test_non_finite_weights_raise_before_the_hyper_step_changes_anything():
    hopt, model, theta = _loop(T1T2, 0.5, 7)
    before = theta.clone()
    with torch.no_grad():
        model.weight.fill_(float("inf"))
    loss = hopt.criterion(model(TRAIN[0]), TRAIN[1])
    with pytest.raises(NonFiniteHypergradientError, match="not finite"):
        hopt.step(loss)
    assert torch.equal(theta, before) and len(hopt.history) == 0
