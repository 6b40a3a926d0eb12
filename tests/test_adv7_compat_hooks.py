"""HippoTrainer's ``step`` makes the hyperparameters require grad around ``hyper_step``, a
public method a subclass may override (e.g. with HippoTrainer's own body plus logging:
``train_loss, val_loss = self.evaluate(); g = self.hyper_grad(train_loss, val_loss); ...``).
The compat ``step`` called ``hyper_step`` with the hyperparameters not requiring grad, so
such a subclass failed at its first hyper-step ("hyperparams['theta'] does not require
grad"). ``step`` now sets the flags around ``hyper_step`` as HippoTrainer does; the numbers
are the T1-T2 formula on ``evaluate()``'s losses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hypergradient.compat.hippotrainer import T1T2

DT = torch.float64
LR = 0.1
g = torch.Generator().manual_seed(0)
X = torch.randn(40, 3, generator=g, dtype=DT)
Y = X @ torch.randn(3, 1, generator=g, dtype=DT) + 0.1 * torch.randn(40, 1, generator=g)
TRAIN, VAL = [(X[:10], Y[:10]), (X[10:20], Y[10:20])], [(X[20:], Y[20:])]


def _f(w, t, batches):
    return sum(
        ((x @ w - y[:, 0]) ** 2).mean() + t.exp().sum() * (w**2).sum() for x, y in batches
    ) / len(batches)


def _t1t2(w, theta):
    """d_phi g - lr (d_phi grad_w f)^T grad_w g on the whole loaders (evaluate()'s losses)."""
    jac = torch.autograd.functional.jacobian
    w, th = w.detach().reshape(-1).clone(), theta.detach().clone()
    mixed = jac(lambda t: jac(lambda w: _f(w, t, TRAIN), w, create_graph=True), th)
    return jac(lambda t: _f(w, t, VAL), th) - LR * mixed.T @ jac(lambda w: _f(w, th, VAL), w)


class Logged(T1T2):
    def hyper_step(self, train_loss):  # HippoTrainer's body, with a log
        train_loss, val_loss = self.evaluate()
        grads = self.hyper_grad(train_loss, val_loss)
        self.log.append((self.model.weight.detach().clone(), grads[0].detach().clone()))
        for h, gr in zip(self.hyperparams.values(), grads):
            h.data -= self.hyper_lr * gr


def _setup(cls):
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()
    theta = torch.tensor([-1.0], dtype=DT)

    def criterion(out, y):
        return ((out - y) ** 2).mean() + theta.exp() * model.weight.square().sum()

    ho = cls(
        {"theta": theta},
        hyper_lr=0.1,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        train_loader=TRAIN,
        val_loader=VAL,
        criterion=criterion,
    )
    ho.log = []
    return model, theta, criterion, ho


def test_a_subclass_hyper_step_runs_with_the_hyperparameters_requiring_grad():
    model, theta, criterion, ho = _setup(Logged)
    values = [theta.clone()]
    for x, y in TRAIN * 2:
        criterion(model(x), y).backward()
        ho.step(criterion(model(x), y))
        ho.zero_grad()
        values.append(theta.detach().clone())
        assert not theta.requires_grad  # off again between steps
    assert len(ho.log) == 4
    for (w, grad), before, after in zip(ho.log, values, values[1:]):
        ref = _t1t2(w, before)
        assert torch.allclose(grad, ref, rtol=1e-10, atol=1e-14), (grad, ref)
        assert torch.allclose(after, before - 0.1 * ref, rtol=1e-10, atol=1e-14)


def test_the_flags_are_restored_when_a_subclass_hyper_step_raises():
    class Broken(T1T2):
        def hyper_step(self, train_loss):
            assert all(h.requires_grad for h in self.hyperparams.values())
            raise RuntimeError("boom")

    model, theta, criterion, ho = _setup(Broken)
    criterion(model(X[:10]), Y[:10]).backward()
    with pytest.raises(RuntimeError, match="boom"):
        ho.step()
    assert not theta.requires_grad
