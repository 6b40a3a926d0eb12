"""A criterion that reads the weights through a list made before training,

    weights = list(model.parameters())
    def criterion(out, target):
        return F.cross_entropy(out, target) + theta.exp() * sum(w.square().sum() for w in weights)

works in HippoTrainer (its hooks differentiate with respect to ``model.parameters()``, the
same objects). The compat hyper-steps evaluate the criterion at copies of the weights
swapped into the model's attributes, which the list does not see: the penalty was a
constant, so its curvature left the Hessian and the only path from ``theta`` to the
training gradient was cut (T1-T2 returned ``d_theta g`` alone). Now the hyper-steps of
T1T2/Neumann/HOAG differentiate the losses' graphs at the real parameters when the
criterion reads one by reference (found once, at the first hyper-step), and DRMAD, whose
reverse pass cannot, refuses it before anything changes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hypergradient.compat.hippotrainer import DRMAD, HOAG, T1T2, Neumann

DT = torch.float64
LR = 0.1


def _setup(cls, **kw):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 4, generator=g, dtype=DT), torch.randint(0, 3, (30,), generator=g)
    xv, yv = torch.randn(15, 4, generator=g, dtype=DT), torch.randint(0, 3, (15,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    theta = torch.tensor([-1.0], dtype=DT)
    weights = list(model.parameters())  # made once, before training

    def criterion(out, target):
        return F.cross_entropy(out, target) + theta.exp() * sum(w.square().sum() for w in weights)

    opt = torch.optim.SGD(model.parameters(), lr=LR)
    hopt = cls(
        {"theta": theta},
        hyper_lr=0.5,
        model=model,
        optimizer=opt,
        train_loader=[(x, y)],
        val_loader=[(xv, yv)],
        criterion=criterion,
        **kw,
    )
    return model, theta, opt, criterion, hopt, (x, y), (xv, yv)


def _pieces(model, theta, train, val):
    params = list(model.parameters())
    w = torch.cat([p.detach().reshape(-1) for p in params]).requires_grad_(True)
    th = theta.detach().clone().requires_grad_(True)
    names = [k for k, _ in model.named_parameters()]
    sizes = [p.numel() for p in params]

    def loss(flat, t, batch):
        parts = dict(zip(names, [v.view_as(p) for v, p in zip(flat.split(sizes), params)]))
        out = torch.func.functional_call(model, parts, (batch[0],))
        return F.cross_entropy(out, batch[1]) + t.exp() * flat.square().sum()

    gv = loss(w, th, val)
    gw, gth = torch.autograd.grad(gv, (w, th))
    fw = torch.autograd.grad(loss(w, th, train), w, create_graph=True)[0]
    hess = torch.autograd.functional.hessian(lambda v: loss(v, th.detach(), train), w.detach())
    return gw, gth, fw, th, hess


def test_t1t2_sees_a_penalty_on_a_list_of_the_weights():
    model, theta, opt, criterion, hopt, train, val = _setup(T1T2)
    gw, gth, fw, th, _ = _pieces(model, theta, train, val)
    ref = gth - torch.autograd.grad(fw, th, grad_outputs=LR * gw)[0]
    for _ in range(2):  # the first call finds the reference, the second uses the answer
        got = hopt.hyper_grad_on_batches(train, val)[0]
        assert torch.allclose(got, ref, rtol=1e-12, atol=1e-15)
    assert hopt._reference in {k for k, _ in model.named_parameters()}


@pytest.mark.parametrize(
    "cls, kw",
    [(HOAG, {"cg_max_iter": 200, "epsilon": 1e-28}), (Neumann, {"num_terms": 2000})],
)
def test_implicit_methods_see_it_the_dense_solve(cls, kw):
    model, theta, opt, criterion, hopt, train, val = _setup(cls, **kw)
    gw, gth, fw, th, hess = _pieces(model, theta, train, val)
    assert torch.linalg.eigvalsh(hess).min() > 0
    ref = gth - torch.autograd.grad(fw, th, grad_outputs=torch.linalg.solve(hess, gw))[0]
    got = hopt.hyper_grad_on_batches(train, val)[0]
    assert torch.allclose(got, ref, rtol=1e-8, atol=1e-12)


def test_drmad_refuses_it_and_restores_its_training_steps():
    model, theta, opt, criterion, hopt, train, val = _setup(DRMAD, T=2)
    loss = criterion(model(train[0]), train[1])
    loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    h0 = theta.clone()
    with pytest.raises(ValueError, match=r"reads the model parameter '[02]\.(weight|bias)'.*DRMAD"):
        hopt.step(loss)  # the optimizer's own step happens, then the hyper-step refuses
    stepped = [p.detach().clone() for p in model.parameters()]
    assert all(torch.allclose(s, b - LR * g) for s, b, g in zip(stepped, before, grads))
    assert torch.equal(theta, h0) and hopt.w0 is None and theta.grad is None
    assert all(torch.equal(a, p) for a, p in zip(stepped, model.parameters()))


def test_a_criterion_reading_through_the_model_keeps_the_core_path():
    model, theta, opt, criterion, hopt, train, val = _setup(T1T2)
    hopt.criterion = lambda out, t: (
        F.cross_entropy(out, t) + theta.exp() * sum(p.square().sum() for p in model.parameters())
    )
    gw, gth, fw, th, _ = _pieces(model, theta, train, val)
    ref = gth - torch.autograd.grad(fw, th, grad_outputs=LR * gw)[0]
    assert torch.allclose(hopt.hyper_grad_on_batches(train, val)[0], ref, rtol=1e-12)
    assert hopt._reference is None
