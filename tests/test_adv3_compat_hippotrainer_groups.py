"""Param groups of different learning rates (a common fine-tuning set-up: a small rate for
the body, a larger one for the head).

T1-T2's look-ahead step is the optimizer's own, ``theta - lr_group * grad f``: the compat
layer took group 0's rate for every parameter (4x off on the second hyperparameter below).
DRMAD's reverse pass is SGD with one rate: different rates are refused, before any change.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hypergradient.compat.hippotrainer import DRMAD, T1T2

DT = torch.float64
LRS = (0.5, 0.01)


def _setup(cls, lrs=LRS, **kw):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=g, dtype=DT), torch.randint(0, 3, (40,), generator=g)
    xv, yv = torch.randn(20, 5, generator=g, dtype=DT), torch.randint(0, 3, (20,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    theta = torch.tensor([-2.0, -1.0], dtype=DT)

    def criterion(out, target):
        body, head = model[0].weight.square().sum(), model[2].weight.square().sum()
        return F.cross_entropy(out, target) + theta[0].exp() * body + theta[1].exp() * head

    groups = [
        {"params": model[0].parameters(), "lr": lrs[0]},
        {"params": model[2].parameters(), "lr": lrs[1]},
    ]
    opt = torch.optim.SGD(groups, momentum=0.9)
    hopt = cls(
        {"theta": theta},
        hyper_lr=0.1,
        model=model,
        optimizer=opt,
        train_loader=[(x, y)],
        val_loader=[(xv, yv)],
        criterion=criterion,
        **kw,
    )
    return model, theta, opt, hopt, (x, y), (xv, yv)


def _reference(model, theta, train, val, lrs):
    """d_theta g - (d_theta grad_w f)^T (diag(lr) grad_w g): each parameter's own rate."""
    params = list(model.parameters())
    per_param = [lrs[0], lrs[0], lrs[1], lrs[1]]
    th = theta.detach().clone().requires_grad_(True)

    def loss(batch):
        body, head = params[0].square().sum(), params[2].square().sum()
        return F.cross_entropy(model(batch[0]), batch[1]) + th[0].exp() * body + th[1].exp() * head

    g = loss(val)
    gw = torch.autograd.grad(g, params, retain_graph=True)
    gth = torch.autograd.grad(g, th)[0]
    fw = torch.autograd.grad(loss(train), params, create_graph=True)
    mixed = torch.autograd.grad(fw, th, grad_outputs=[lr * v for lr, v in zip(per_param, gw)])
    return gth - mixed[0]


@pytest.mark.parametrize("lrs", [LRS, (0.01, 0.5), (0.3, 0.0)])
def test_t1t2_takes_each_groups_learning_rate(lrs):
    model, theta, opt, hopt, train, val = _setup(T1T2, lrs)
    ref = _reference(model, theta, train, val, lrs)
    builtin = hopt.hyper_grad_on_batches(train, val)[0]
    assert torch.allclose(builtin, ref, rtol=1e-12, atol=1e-15)
    hopt._hyperparams_requires_grad_(True)
    hook = hopt.hyper_grad(*hopt._losses(train, val))[0]
    hopt._hyperparams_requires_grad_(False)
    assert torch.allclose(hook, ref, rtol=1e-12, atol=1e-15)


def test_t1t2_reads_the_groups_rates_a_scheduler_set():
    model, theta, opt, hopt, train, val = _setup(T1T2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda e: 0.5**e, lambda e: 2.0**e])
    opt.step()  # (no gradients: nothing moves) keeps the scheduler's order warning quiet
    sched.step()
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs == [0.25, 0.02]
    ref = _reference(model, theta, train, val, lrs)
    assert torch.allclose(hopt.hyper_grad_on_batches(train, val)[0], ref, rtol=1e-12)


def test_t1t2_with_one_rate_is_unchanged():
    model, theta, opt, hopt, train, val = _setup(T1T2, (0.2, 0.2))
    ref = _reference(model, theta, train, val, (0.2, 0.2))
    assert torch.allclose(hopt.hyper_grad_on_batches(train, val)[0], ref, rtol=1e-12)


def test_drmad_refuses_different_rates_before_anything_changes():
    model, theta, opt, hopt, train, val = _setup(DRMAD, T=2)
    loss = hopt.criterion(model(train[0]), train[1])
    loss.backward()
    weights = [p.detach().clone() for p in model.parameters()]
    h0 = theta.clone()
    with pytest.raises(ValueError, match=r"DRMAD.*one learning rate.*param groups"):
        hopt.hyper_step()
    assert all(torch.equal(a, p) for a, p in zip(weights, model.parameters()))
    assert torch.equal(theta, h0) and hopt.w0 is None and not opt.state
    assert all(p.grad is not None for p in model.parameters())  # the user's gradients kept


def _frozen_first_group(cls, **kw):
    """Group 0: a frozen body (requires_grad=False) at lr 0.001; group 1: the head at 0.1."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 5, generator=g, dtype=DT), torch.randint(0, 3, (40,), generator=g)
    xv, yv = torch.randn(20, 5, generator=g, dtype=DT), torch.randint(0, 3, (20,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    model[0].requires_grad_(False)
    theta = torch.tensor([-1.0], dtype=DT)

    def criterion(out, target):
        return F.cross_entropy(out, target) + theta.exp() * model[2].weight.square().sum()

    groups = [
        {"params": model[0].parameters(), "lr": 0.001},
        {"params": model[2].parameters(), "lr": 0.1},
    ]
    hopt = cls(
        {"theta": theta},
        hyper_lr=0.1,
        model=model,
        optimizer=torch.optim.SGD(groups),
        train_loader=[(x, y)],
        val_loader=[(xv, yv)],
        criterion=criterion,
        **kw,
    )
    return model, theta, hopt, (x, y), (xv, yv)


def _head_loss(model, batch):
    def loss(w, b, t):
        out = torch.tanh(model[0](batch[0])) @ w.T + b
        return F.cross_entropy(out, batch[1]) + t.exp() * w.square().sum()

    return loss


def test_a_frozen_first_group_does_not_set_the_rate():
    """The compat layer read param_groups[0]['lr'] (0.001, the frozen body's) as the
    look-ahead and DRMAD's step: T1-T2's implicit term 100x too small, DRMAD's reverse pass
    that of other steps."""
    model, theta, hopt, train, val = _frozen_first_group(T1T2)
    w, b = (model[2].weight.detach().clone().requires_grad_(True), model[2].bias.detach().clone())
    b.requires_grad_(True)
    th = theta.clone().requires_grad_(True)
    f, g = _head_loss(model, train), _head_loss(model, val)
    gv = g(w, b, th)
    gw = torch.autograd.grad(gv, (w, b), retain_graph=True)
    gth = torch.autograd.grad(gv, th)[0]
    fw = torch.autograd.grad(f(w, b, th), (w, b), create_graph=True)
    ref = gth - torch.autograd.grad(fw, th, grad_outputs=[0.1 * v for v in gw])[0]
    assert torch.allclose(hopt.hyper_grad_on_batches(train, val)[0], ref, rtol=1e-12, atol=1e-15)

    model, theta, hopt, train, val = _frozen_first_group(DRMAD, T=1)
    w0, b0 = model[2].weight.detach().clone(), model[2].bias.detach().clone()
    got = hopt.hyper_grad_on_batches(train, val)[0]
    w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    th = theta.clone().requires_grad_(True)
    f, g = _head_loss(model, train), _head_loss(model, val)
    gw, gb = torch.autograd.grad(f(w, b, th), (w, b), create_graph=True)
    ref = torch.autograd.grad(g(w - 0.1 * gw, b - 0.1 * gb, th), th)[0]
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-15)
