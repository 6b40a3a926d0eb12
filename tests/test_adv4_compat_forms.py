"""HippoTrainer only calls ``hyperparams.values()`` (and ``.items()``), so it runs with an
``nn.ParameterDict`` of hyperparameters, a natural container when the criterion registers
them. The compat layer refused anything but a ``dict``. It now accepts any mapping and an
``nn.ParameterDict``; the hypergradients are those of the closed forms (T1-T2; DRMAD over
one SGD step, where it is exact) and the parameters in the container are updated."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hypergradient.compat.hippotrainer import DRMAD, T1T2

DT = torch.float64
LR = 0.05
g = torch.Generator().manual_seed(0)
X = torch.randn(40, 5, generator=g, dtype=DT)
Y = X @ torch.randn(5, 1, generator=g, dtype=DT) + 0.1 * torch.randn(40, 1, generator=g)
TRAIN, VAL = (X[:20], Y[:20]), (X[20:], Y[20:])


def _loss(batch):
    return lambda w, t: ((batch[0] @ w[:, None] - batch[1]) ** 2).mean() + (t.exp() * w**2).sum()


def _reference(method, w, theta):
    jac = torch.autograd.functional.jacobian
    w, th = w.detach().reshape(-1).clone(), theta.detach().clone()
    f, gv = _loss(TRAIN), _loss(VAL)
    mixed = jac(lambda t: jac(lambda w: f(w, t), w, create_graph=True), th)
    if method is T1T2:  # at w: d_phi g - lr M^T grad_w g
        return jac(lambda t: gv(w, t), th) - LR * mixed.T @ jac(lambda w: gv(w, th), w)
    w1 = w - LR * jac(lambda w: f(w, th), w)  # DRMAD over one step: exact
    return jac(lambda t: gv(w1, t), th) - LR * mixed.T @ jac(lambda w: gv(w, th), w1)


@pytest.mark.parametrize("method", [T1T2, DRMAD])
def test_a_parameter_dict_of_hyperparameters_runs_with_the_exact_hypergradient(method):
    torch.manual_seed(0)
    model = nn.Linear(5, 1, bias=False).double()

    class Criterion(nn.Module):
        def __init__(self):
            super().__init__()
            self.hp = nn.ParameterDict({"theta": nn.Parameter(torch.full((5,), -2.0, dtype=DT))})

        def forward(self, out, target):
            penalty = (self.hp["theta"].exp() * model.weight[0].square()).sum()
            return ((out - target) ** 2).mean() + penalty

    criterion = Criterion()
    hopt = method(
        criterion.hp,
        hyper_lr=1.0,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        train_loader=[TRAIN],
        val_loader=[VAL],
        criterion=criterion,
        **({"T": 1} if method is DRMAD else {}),
    )
    theta = criterion.hp["theta"]
    expected = _reference(method, model.weight, theta)
    before = theta.detach().clone()
    hopt.hyper_step()
    torch.testing.assert_close(before - theta.detach(), expected, rtol=1e-10, atol=1e-13)


def test_other_containers_are_still_refused_naming_the_argument():
    model = nn.Linear(5, 1, bias=False).double()
    with pytest.raises(TypeError, match=r"`hyperparams` must be a non-empty dict"):
        T1T2(
            [torch.zeros(5, dtype=DT)],
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=LR),
            train_loader=[TRAIN],
            val_loader=[VAL],
            criterion=nn.MSELoss(),
        )
