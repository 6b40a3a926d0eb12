"""HippoTrainer scores the validation loss of a hyper-step in eval mode (its ``evaluate()``
calls ``model.eval()`` before the validation pass): no dropout, BatchNorm's running
statistics. The compat layer scored it in the model's training mode (dropout masks and batch
statistics on the validation batch), silently another hypergradient; and a subclass that
overrides the hook ``hyper_grad`` got losses built by calling the model, so every hyper-step
also fed the training AND the validation batch into BatchNorm's running statistics.

References: the T1-T2 formula and the dense float64 implicit solve with the validation loss
in eval mode; DRMAD over one step against autograd through the SGD step.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hypergradient.compat.hippotrainer import DRMAD, HOAG, T1T2, Neumann

DT = torch.float64


def _data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 5, generator=g, dtype=DT), torch.randint(0, 3, (48,), generator=g)
    xv = torch.randn(24, 5, generator=g, dtype=DT) + 1.5  # shifted: batch stats != running
    yv = torch.randint(0, 3, (24,), generator=g)
    return (x, y), (xv, yv)


def _model(dropout: float) -> nn.Module:
    torch.manual_seed(1)
    layers = [nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(dropout), nn.Linear(6, 3)]
    model = nn.Sequential(*layers).double()
    with torch.no_grad():  # running statistics of some earlier training
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.train()


class Penalized(nn.Module):
    """Cross-entropy + exp(theta) * ||weights||^2, the hyperparameter read in forward."""

    def __init__(self, model: nn.Module, theta: torch.Tensor):
        super().__init__()
        self.model, self.theta = model, theta

    def forward(self, out, target):
        l2 = sum(p.square().sum() for p in self.model.parameters())
        return F.cross_entropy(out, target) + self.theta.exp() * l2


def _setup(cls, dropout=0.0, **kw):
    train, val = _data()
    model = _model(dropout)
    theta = torch.tensor([0.0], dtype=DT)  # strong penalty: the Hessian is positive definite
    hopt = cls(
        {"theta": theta},
        hyper_lr=0.0,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        train_loader=[train],
        val_loader=[val],
        criterion=Penalized(model, theta),
        **kw,
    )
    return model, theta, hopt, train, val


def _pieces(model, theta, train, val):
    """grad_w g, d_theta g (validation in eval mode), and grad_w f with its graph (train
    mode, buffers untouched), at the model's weights; flat."""
    names = [k for k, _ in model.named_parameters()]
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).requires_grad_(True)
    th = theta.detach().clone().requires_grad_(True)

    def loss(flat, t, batch, eval_mode):
        params, start = {}, 0
        for k, p in zip(names, model.parameters()):
            params[k] = flat[start : start + p.numel()].view_as(p)
            start += p.numel()
        buffers = {k: b.clone() for k, b in model.named_buffers()}
        model.train(not eval_mode)
        out = torch.func.functional_call(model, {**params, **buffers}, (batch[0],))
        model.train()
        l2 = sum(p.square().sum() for p in params.values())
        return F.cross_entropy(out, batch[1]) + t.exp() * l2

    g = loss(w, th, val, True)
    gw, gth = torch.autograd.grad(g, (w, th))
    f = loss(w, th, train, False)
    fw = torch.autograd.grad(f, w, create_graph=True)[0]
    return w, th, gw, gth, fw, lambda v: loss(v, th.detach(), train, False)


def _t1t2_reference(model, theta, train, val, lr):
    w, th, gw, gth, fw, _ = _pieces(model, theta, train, val)
    return gth - torch.autograd.grad(fw, th, grad_outputs=lr * gw)[0]


def _implicit_reference(model, theta, train, val):
    w, th, gw, gth, fw, f = _pieces(model, theta, train, val)
    h = torch.autograd.functional.hessian(f, w.detach())
    x = torch.linalg.solve(h, gw)
    assert torch.linalg.eigvalsh(h).min() > 0
    return gth - torch.autograd.grad(fw, th, grad_outputs=x)[0]


def test_t1t2_validation_loss_in_eval_mode_with_dropout_and_batchnorm():
    model, theta, hopt, train, val = _setup(T1T2, dropout=0.5)
    stats = {k: b.clone() for k, b in model.named_buffers()}
    got = [hopt.hyper_grad_on_batches(train, val)[0] for _ in range(3)]
    ref = _t1t2_reference(model, theta, train, val, 0.05)
    for g in got:  # deterministic: no dropout on the validation batch
        assert torch.allclose(g, ref, rtol=1e-12, atol=1e-14)
    assert all(torch.equal(b, stats[k]) for k, b in model.named_buffers())
    assert model.training and model[3].training  # the modes are put back


@pytest.mark.parametrize(
    "cls, kw", [(HOAG, {"cg_max_iter": 200, "epsilon": 1e-30}), (Neumann, {"num_terms": 3000})]
)
def test_implicit_methods_validation_in_eval_mode_match_the_dense_solve(cls, kw):
    model, theta, hopt, train, val = _setup(cls, **kw)
    got = hopt.hyper_grad_on_batches(train, val)[0]
    ref = _implicit_reference(model, theta, train, val)
    assert torch.allclose(got, ref, rtol=1e-7, atol=1e-10)


def test_a_hook_subclass_gets_eval_mode_validation_and_leaves_the_buffers_alone():
    calls = []

    class MyT1T2(T1T2):
        def hyper_grad(self, train_loss, val_loss):
            calls.append((train_loss.item(), val_loss.item()))
            return super().hyper_grad(train_loss, val_loss)

    model, theta, hopt, train, val = _setup(MyT1T2, dropout=0.5)
    stats = {k: b.clone() for k, b in model.named_buffers()}
    hopt.hyper_step()
    hopt.hyper_step()
    assert len(calls) == 2 and calls[0][1] == calls[1][1]  # no dropout on validation
    assert all(torch.equal(b, stats[k]) for k, b in model.named_buffers())
    builtin = T1T2.hyper_grad_on_batches(hopt, train, val)  # the class's own path
    ref = _t1t2_reference(model, theta, train, val, 0.05)
    assert torch.allclose(builtin[0], ref, rtol=1e-12, atol=1e-14)


def test_drmad_one_step_validation_in_eval_mode_is_exact_and_leaves_hyper_grad_alone():
    model, theta, hopt, train, val = _setup(DRMAD, T=1)
    w0 = [p.detach().clone() for p in model.parameters()]
    theta.grad = None
    got = hopt.hyper_grad_on_batches(train, val)[0]
    assert theta.grad is None  # the training step's backward did not write into it
    # reference: autograd through the one SGD step, validation in eval mode at the buffers
    # the training step left (its forward updated the running statistics)
    names = [k for k, _ in model.named_parameters()]
    th = theta.detach().clone().requires_grad_(True)
    params = [p.clone().requires_grad_(True) for p in w0]
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    crit = Penalized(model, th)

    def run(ps, batch, eval_mode):
        model.train(not eval_mode)
        state = {**dict(zip(names, ps)), **{k: b.clone() for k, b in buffers.items()}}
        out = torch.func.functional_call(model, state, (batch[0],))
        l2 = sum(p.square().sum() for p in ps)
        model.train()
        return F.cross_entropy(out, batch[1]) + crit.theta.exp() * l2

    grads = torch.autograd.grad(run(params, train, False), params, create_graph=True)
    w1 = [p - 0.05 * g for p, g in zip(params, grads)]
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(w1, hopt.wT))
    ref = torch.autograd.grad(run(w1, val, True), th)[0]
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-13)
