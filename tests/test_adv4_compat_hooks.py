"""HippoTrainer's own ``Neumann.hyper_grad``, copied into a subclass (the documented
extension point), passes ``approx_inverse_hvp`` vectors over ``model.parameters()``. With a
model that holds a parameter the optimizer does not train (a gate, which the compat layer
accepts), the compat helper paired them with the trained parameters only and crashed inside
autograd ("Mismatch in shape"). It now accepts both alignments: the untrained entries are
constants of the inner problem (zero), and the hook's hypergradient is the built-in one,
checked against the dense float64 Neumann series."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hypergradient import NonFiniteHypergradientError
from hypergradient.compat.hippotrainer import Neumann

DT = torch.float64
LR, TERMS = 0.05, 3


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 1, bias=False)
        self.gate = nn.Parameter(torch.tensor(0.7))  # held by the model, not trained

    def forward(self, x):
        return self.gate * self.lin(x)


class VerbatimNeumann(Neumann):
    """HippoTrainer 1.0.0's ``Neumann.hyper_grad``, unchanged."""

    def hyper_grad(self, train_loss, val_loss):
        v1 = torch.autograd.grad(val_loss, self.model.parameters(), retain_graph=True)
        d_train_d_w = torch.autograd.grad(train_loss, self.model.parameters(), create_graph=True)
        v2 = self.approx_inverse_hvp(v1, d_train_d_w)
        v3 = torch.autograd.grad(
            d_train_d_w, self.hyperparams.values(), grad_outputs=v2, retain_graph=True
        )
        d_val_d_lambda = torch.autograd.grad(val_loss, self.hyperparams.values(), retain_graph=True)
        return [d - v for d, v in zip(d_val_d_lambda, v3)]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g, dtype=DT)
    y = x @ torch.randn(5, 1, generator=g, dtype=DT) + 0.1 * torch.randn(40, 1, generator=g)
    return (x[:20], y[:20]), (x[20:], y[20:])


def _setup(cls):
    torch.manual_seed(0)
    model = Gated().double()
    theta = torch.full((5,), -2.0, dtype=DT)

    def criterion(out, target):
        return ((out - target) ** 2).mean() + (theta.exp() * model.lin.weight[0].square()).sum()

    train, val = _data()
    hopt = cls(
        {"theta": theta},
        hyper_lr=1.0,
        model=model,
        optimizer=torch.optim.SGD(model.lin.parameters(), lr=LR),
        train_loader=[train],
        val_loader=[val],
        criterion=criterion,
        num_terms=TERMS,
    )
    return model, theta, hopt, train, val


def _dense_series(model, theta, train, val):
    """d_phi g - M^T (lr sum_{j<=k} (I - lr H)^j grad_w g), the gate a constant."""
    gate = model.gate.detach()
    w = model.lin.weight.detach().reshape(-1).clone()

    def loss(batch):
        x, y = batch
        return lambda w, th: ((gate * (x @ w[:, None]) - y) ** 2).mean() + (th.exp() * w**2).sum()

    f, g = loss(train), loss(val)
    th = theta.detach().clone()
    jac = torch.autograd.functional.jacobian
    hess = torch.autograd.functional.hessian(lambda w: f(w, th), w)
    gw, gphi = jac(lambda w: g(w, th), w), jac(lambda t: g(w, t), th)
    mixed = jac(lambda t: jac(lambda w: f(w, t), w, create_graph=True), th)  # [w, theta]
    term, total = gw.clone(), gw.clone()
    for _ in range(TERMS):
        term = term - LR * hess @ term
        total = total + term
    return gphi - mixed.T @ (LR * total)


def test_the_verbatim_hook_matches_the_dense_series_with_an_untrained_parameter():
    model, theta, hopt, train, val = _setup(VerbatimNeumann)
    expected = _dense_series(model, theta, train, val)
    got = hopt.hyper_grad_on_batches(train, val)[0]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    _, _, builtin, _, _ = _setup(Neumann)
    torch.testing.assert_close(builtin.hyper_grad_on_batches(train, val)[0], expected)


def test_approx_inverse_hvp_over_all_parameters_is_zero_on_the_untrained_ones():
    model, theta, hopt, train, val = _setup(Neumann)
    theta.requires_grad_(True)
    loss = hopt.criterion(model(train[0]), train[1])
    params = list(model.parameters())  # [gate, lin.weight]
    f = torch.autograd.grad(loss, params, create_graph=True)
    v = [torch.ones_like(p) for p in params]
    whole = hopt.approx_inverse_hvp(v, f)
    trained = hopt.approx_inverse_hvp(v[1:], f[1:])
    assert [t.shape for t in whole] == [p.shape for p in params]
    assert float(whole[0]) == 0.0
    torch.testing.assert_close(whole[1], trained[0], rtol=0, atol=0)


def test_vectors_of_another_length_are_refused_naming_the_counts():
    model, theta, hopt, train, val = _setup(Neumann)
    theta.requires_grad_(True)
    loss = hopt.criterion(model(train[0]), train[1])
    f = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    with pytest.raises(ValueError, match=r"one tensor per trained parameter \(1\)"):
        hopt.approx_inverse_hvp([torch.ones(1, 5)] * 3, f)


def _lambda_max(model, theta, train):
    gate, (x, y) = model.gate.detach(), train
    w = model.lin.weight.detach().reshape(-1).clone()
    th = theta.detach()

    def f(w):
        return ((gate * (x @ w[:, None]) - y) ** 2).mean() + (th.exp() * w**2).sum()

    return float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(f, w)).max())


@pytest.mark.parametrize("by_reference", [False, True])
def test_a_diverging_series_in_the_hook_raises_and_updates_nothing(by_reference):
    """The hook path (a subclass hook, or a criterion reading the weights through a list of
    its own) summed the series unchecked: with lr = 2.5 / lambda_max the hyperparameters
    moved by 2e5 (1e18 with 40 terms) without a warning, where the built-in path raises."""
    model, theta, hopt, train, val = _setup(Neumann if by_reference else VerbatimNeumann)
    lr = 2.5 / _lambda_max(model, theta, train)
    hopt.optimizer.param_groups[0]["lr"] = lr
    if by_reference:
        weights = list(model.lin.parameters())

        def criterion(out, target):  # reads the weights through its own list
            return ((out - target) ** 2).mean() + (theta.exp() * weights[0][0].square()).sum()

        hopt.criterion = criterion
    before = theta.clone()
    with pytest.raises(NonFiniteHypergradientError, match="diverged"):
        hopt.hyper_step()
    assert torch.equal(theta, before)
    hopt.optimizer.param_groups[0]["lr"] = 0.5 / _lambda_max(model, theta, train)
    hopt.hyper_step()  # converging: applied
    assert not torch.equal(theta, before)
