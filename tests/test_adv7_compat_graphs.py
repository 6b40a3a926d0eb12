"""HippoTrainer's public helpers differentiate the graphs they are given. Called with a
gradient computed without ``create_graph=True`` (or a loss computed under ``no_grad``),
HippoTrainer raised autograd's "does not require grad"; the compat helpers treated every
Hessian product as zero and returned a number: ``Neumann.approx_inverse_hvp(v, f)`` gave
``lr * (num_terms + 1) * v`` (0.4 for every entry, where the series is 0.28-0.34),
``HOAG.hessian_vector_product`` zeros, and the hook ``hyper_grad`` the direct term alone.
They now refuse such inputs naming the argument; with a graph the numbers are the dense
references'."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hypergradient.compat.hippotrainer import HOAG, T1T2, Neumann

DT = torch.float64
LR, TERMS = 0.1, 3
g = torch.Generator().manual_seed(0)
X = torch.randn(20, 3, generator=g, dtype=DT)
Y = torch.randn(20, 1, generator=g, dtype=DT)


def _setup(cls, **kw):
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    theta = torch.tensor([0.1], dtype=DT)

    def criterion(out, y):
        return ((out - y) ** 2).mean() + theta * model.weight.square().sum()

    ho = cls(
        {"theta": theta},
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        train_loader=[(X, Y)],
        val_loader=[(X, Y)],
        criterion=criterion,
        **kw,
    )
    return model, theta, criterion, ho


def _dense_hessian(model, theta):
    def f(z):
        w, b = z[:3], z[3]
        return ((X @ w + b - Y[:, 0]) ** 2).mean() + theta * (w**2).sum()

    z = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    return torch.autograd.functional.hessian(lambda z: f(z).sum(), z)


def test_approx_inverse_hvp_needs_the_gradients_graph():
    model, theta, criterion, ho = _setup(Neumann, num_terms=TERMS)
    params = list(model.parameters())
    loss = criterion(model(X), Y)
    v = [torch.ones_like(p) for p in params]
    with pytest.raises(ValueError, match="`f` carries no autograd graph"):
        ho.approx_inverse_hvp(v, torch.autograd.grad(loss, params, retain_graph=True))
    got = ho.approx_inverse_hvp(v, torch.autograd.grad(loss, params, create_graph=True))
    step = torch.eye(4, dtype=DT) - LR * _dense_hessian(model, theta)
    ref = (
        LR
        * sum(torch.linalg.matrix_power(step, j) for j in range(TERMS + 1))
        @ torch.ones(4, dtype=DT)
    )
    assert torch.allclose(torch.cat([t.reshape(-1) for t in got]), ref, rtol=1e-12)


def test_hessian_vector_product_needs_the_losses_graph():
    model, theta, criterion, ho = _setup(HOAG)
    params = list(model.parameters())
    vec = [torch.ones_like(p) for p in params]
    with torch.no_grad():
        loss = criterion(model(X), Y)
    with pytest.raises(ValueError, match="`loss` carries no autograd graph"):
        ho.hessian_vector_product(loss, params, vec)
    got = ho.hessian_vector_product(criterion(model(X), Y), params, vec)
    ref = _dense_hessian(model, theta) @ torch.ones(4, dtype=DT)
    assert torch.allclose(torch.cat([t.reshape(-1) for t in got]), ref, rtol=1e-12)


@pytest.mark.parametrize("cls", [T1T2, Neumann, HOAG])
def test_the_hook_refuses_losses_without_a_graph(cls):
    model, theta, criterion, ho = _setup(cls)
    theta.requires_grad_(True)
    val = criterion(model(X), Y)
    with torch.no_grad():
        train = criterion(model(X), Y)
    with pytest.raises(ValueError, match="`train_loss` carries no autograd graph"):
        ho.hyper_grad(train, val)
