"""HippoTrainer's hyper-step reads ``self.train_loader`` and ``self.val_loader`` each time
(``evaluate()``), so a user may assign new ones between epochs (a new validation split, a
curriculum). The compat layer drew its hyper-step batches from cycles built at construction:
after ``ho.val_loader = new``, ``evaluate()`` used the new loader and every hyper-step still
the old one, silently. The cycles now follow the attributes; the hypergradient is the T1-T2
formula on the new batches."""

from __future__ import annotations

import torch
from torch import nn

from hypergradient.compat.hippotrainer import T1T2

DT = torch.float64
LR = 0.1
g = torch.Generator().manual_seed(0)
X = torch.randn(40, 3, generator=g, dtype=DT)
Y = torch.randn(40, 1, generator=g, dtype=DT)


def _f(w, t, batch):
    x, y = batch
    return ((x @ w - y[:, 0]) ** 2).mean() + t.exp().sum() * (w**2).sum()


def _t1t2(w, theta, train, val):
    jac = torch.autograd.functional.jacobian
    w, th = w.detach().reshape(-1).clone(), theta.detach().clone()
    mixed = jac(lambda t: jac(lambda w: _f(w, t, train), w, create_graph=True), th)
    return jac(lambda t: _f(w, t, val), th) - LR * mixed.T @ jac(lambda w: _f(w, th, val), w)


def test_loaders_assigned_later_feed_the_next_hyper_steps():
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()
    theta = torch.tensor([-1.0], dtype=DT)

    def criterion(out, y):
        return ((out - y) ** 2).mean() + theta.exp() * model.weight.square().sum()

    old_train, old_val = (X[:10], Y[:10]), (X[10:20], Y[10:20])
    new_train, new_val = (X[20:30], Y[20:30]), (X[30:], Y[30:])
    ho = T1T2(
        {"theta": theta},
        hyper_lr=1.0,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        train_loader=[old_train],
        val_loader=[old_val],
        criterion=criterion,
    )
    for train, val in ((old_train, old_val), (new_train, new_val)):
        ho.train_loader, ho.val_loader = [train], [val]
        criterion(model(train[0]), train[1]).backward()
        before = theta.clone()
        ho.optimizer.step()  # the step ho.step takes, then its hyper-step by hand
        w = model.weight.detach().clone()
        ho.hyper_step()
        ho.zero_grad()
        ref = _t1t2(w, before, train, val)
        assert torch.allclose(theta, before - ref, rtol=1e-10, atol=1e-14), (theta, before - ref)
