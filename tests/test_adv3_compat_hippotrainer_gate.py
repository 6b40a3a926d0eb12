"""HippoTrainer's README: "model hyperparameters (e.g., gate coefficients)". A gate is
naturally an ``nn.Parameter`` of the model, left out of the optimizer. The compat layer
refused every model parameter as a hyperparameter ("must not be trained by `optimizer`"),
even one the optimizer does not train. It is a hyperparameter the model holds: accepted, and
its hypergradient is exact (T1-T2 formula, dense float64 implicit solve, autograd through
DRMAD's one SGD step). A model parameter the optimizer trains is still refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hypergradient.compat.hippotrainer import DRMAD, HOAG, T1T2

DT = torch.float64
LR = 0.1


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)
        self.gate = nn.Parameter(torch.zeros(5))

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)) * torch.sigmoid(self.gate))


def _setup(cls, **kw):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 4, generator=g, dtype=DT), torch.randint(0, 3, (30,), generator=g)
    xv, yv = torch.randn(15, 4, generator=g, dtype=DT), torch.randint(0, 3, (15,), generator=g)
    torch.manual_seed(0)
    model = Gated().double()
    weights = [p for n, p in model.named_parameters() if n != "gate"]

    def criterion(out, target):  # the weights read through the model, at every call
        l2 = sum(w.square().sum() for n, w in model.named_parameters() if n != "gate")
        return F.cross_entropy(out, target) + 0.5 * l2

    hopt = cls(
        {"gate": model.gate},
        hyper_lr=1.0,
        model=model,
        optimizer=torch.optim.SGD(weights, lr=LR),
        train_loader=[(x, y)],
        val_loader=[(xv, yv)],
        criterion=criterion,
        **kw,
    )
    return model, weights, criterion, hopt, (x, y), (xv, yv)


def _flat_loss(model, weights, batch):
    names = [n for n, _ in model.named_parameters() if n != "gate"]
    sizes = [w.numel() for w in weights]

    def loss(flat, gate):
        parts = dict(zip(names, [t.view_as(w) for t, w in zip(flat.split(sizes), weights)]))
        out = torch.func.functional_call(model, {**parts, "gate": gate}, (batch[0],))
        return F.cross_entropy(out, batch[1]) + 0.5 * flat.square().sum()

    return loss


def _pieces(model, weights, train, val):
    w = torch.cat([p.detach().reshape(-1) for p in weights]).requires_grad_(True)
    gate = model.gate.detach().clone().requires_grad_(True)
    f, g = _flat_loss(model, weights, train), _flat_loss(model, weights, val)
    gv = g(w, gate)
    gw, gphi = torch.autograd.grad(gv, (w, gate))
    fw = torch.autograd.grad(f(w, gate), w, create_graph=True)[0]
    return w, gate, gw, gphi, fw, f


def test_t1t2_and_hook_on_a_gate_parameter():
    model, weights, criterion, hopt, train, val = _setup(T1T2)
    w, gate, gw, gphi, fw, _ = _pieces(model, weights, train, val)
    ref = gphi - torch.autograd.grad(fw, gate, grad_outputs=LR * gw)[0]
    assert torch.allclose(hopt.hyper_grad_on_batches(train, val)[0], ref, rtol=1e-12, atol=1e-15)
    hopt._hyperparams_requires_grad_(True)
    hook = hopt.hyper_grad(*hopt._losses(train, val))[0]
    hopt._hyperparams_requires_grad_(False)
    assert torch.allclose(hook, ref, rtol=1e-12, atol=1e-15)


def test_hoag_on_a_gate_parameter_is_the_dense_implicit_hypergradient():
    model, weights, criterion, hopt, train, val = _setup(HOAG, cg_max_iter=100, epsilon=1e-28)
    w, gate, gw, gphi, fw, f = _pieces(model, weights, train, val)
    h = torch.autograd.functional.hessian(lambda v: f(v, gate.detach()), w.detach())
    assert torch.linalg.eigvalsh(h).min() > 0
    ref = gphi - torch.autograd.grad(fw, gate, grad_outputs=torch.linalg.solve(h, gw))[0]
    got = hopt.hyper_grad_on_batches(train, val)[0]
    assert torch.allclose(got, ref, rtol=1e-8, atol=1e-12)


def test_documented_loop_tunes_the_gate_and_drmad_one_step_is_exact():
    model, weights, criterion, hopt, train, val = _setup(DRMAD, T=1)
    w0 = torch.cat([p.detach().reshape(-1) for p in weights])
    gate0 = model.gate.detach().clone()
    got = hopt.hyper_grad_on_batches(train, val)[0]
    f, g = _flat_loss(model, weights, train), _flat_loss(model, weights, val)
    w = w0.clone().requires_grad_(True)
    gate = gate0.clone().requires_grad_(True)
    w1 = w - LR * torch.autograd.grad(f(w, gate), w, create_graph=True)[0]
    ref = torch.autograd.grad(g(w1, gate), gate)[0]
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-15)
    assert model.gate.grad is None
    for _ in range(3):  # HippoTrainer's loop: the gate moves, nothing else breaks
        loss = criterion(model(train[0]), train[1])
        loss.backward()
        hopt.step(loss)
        hopt.zero_grad()
    assert not torch.equal(model.gate.detach(), gate0) and model.gate.grad is None


def test_a_model_parameter_the_optimizer_trains_is_still_refused():
    model = Gated()
    data = [(torch.randn(6, 4), torch.randint(0, 3, (6,)))]
    with pytest.raises(ValueError, match=r"model parameter 'gate', which `optimizer` trains"):
        T1T2(
            {"gate": model.gate},
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            train_loader=data,
            val_loader=data,
            criterion=nn.CrossEntropyLoss(),
        )
