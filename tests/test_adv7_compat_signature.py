"""HippoTrainer's ``DRMAD.__init__`` spells out its signature, ``(hyperparams, hyper_lr,
inner_steps, model, optimizer, train_loader, val_loader, criterion, weight_decay, T)``, so
``DRMAD(h, 1e-3, 1, model, opt, train, val, criterion, 0.0, 5)`` is valid HippoTrainer code.
The compat class took ``weight_decay`` and ``T`` by keyword only and refused it ("takes from
2 to 9 positional arguments but 11 were given"). Positional arguments now reach the same
hypergradient as keywords: over one step (T=1) DrMAD is the exact unrolled one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hypergradient.compat.hippotrainer import DRMAD

DT = torch.float64
LR = 0.1
g = torch.Generator().manual_seed(0)
X = torch.randn(20, 3, generator=g, dtype=DT)
Y = torch.randn(20, 1, generator=g, dtype=DT)
TRAIN, VAL = (X[:10], Y[:10]), (X[10:], Y[10:])


def _f(w, t, batch):
    x, y = batch
    return ((x @ w - y[:, 0]) ** 2).mean() + t.exp().sum() * (w**2).sum()


def _setup(positional):
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()
    theta = torch.tensor([-1.0], dtype=DT)

    def criterion(out, y):
        return ((out - y) ** 2).mean() + theta.exp() * model.weight.square().sum()

    opt = torch.optim.SGD(model.parameters(), lr=LR)
    args = ({"theta": theta}, 1e-3, 1, model, opt, [TRAIN], [VAL], criterion)
    ho = DRMAD(*args, 0.0, 1) if positional else DRMAD(*args, weight_decay=0.0, T=1)
    return model, theta, ho


@pytest.mark.parametrize("positional", [True, False])
def test_weight_decay_and_t_by_position(positional):
    model, theta, ho = _setup(positional)
    assert (ho.T, ho.weight_decay, ho.hyper_lr, ho.inner_steps) == (1, 0.0, 1e-3, 1)
    w0 = model.weight.detach().reshape(-1).clone().requires_grad_()
    th = theta.clone().requires_grad_()
    w1 = w0 - LR * torch.autograd.grad(_f(w0, th, TRAIN), w0, create_graph=True)[0]
    ref = torch.autograd.grad(_f(w1, th, VAL), th)[0]
    got = ho.hyper_grad_on_batches(TRAIN, VAL)[0]
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-14), (got, ref)


def test_a_bad_positional_t_is_named():
    with pytest.raises(ValueError, match="T"):
        model = nn.Linear(3, 1)
        DRMAD(
            {"t": torch.zeros(1)},
            1e-3,
            1,
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            [TRAIN],
            [VAL],
            lambda o, y: ((o - y) ** 2).mean(),
            0.0,
            0,
        )
