"""A HippoTrainer user's optimizer often carries an L2 ``weight_decay``
(``optim.SGD(model.parameters(), lr=..., weight_decay=...)``). Its steps converge to a
stationary point of ``criterion + weight_decay / 2 * ||w||^2``, so the implicit
hypergradient there solves with ``H + weight_decay I``; ``hg.HyperOptimizer`` adds the term.
The compat ``Neumann`` and ``HOAG`` solved with the criterion's Hessian alone: on a ridge
problem trained to that fixed point (``weight_decay=0.5``) they returned -0.02291 where the
dense solve gives -0.01519. Both the hyper-step and HippoTrainer's hook now add the term
(per param group; a decoupled decay, ``AdamW``'s, is no L2 term and is left out)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hypergradient.compat.hippotrainer import HOAG, T1T2, Neumann

DT = torch.float64
D, LR = 4, 0.05
g = torch.Generator().manual_seed(0)
X = torch.randn(30, D, generator=g, dtype=DT)
Y = torch.randn(30, 1, generator=g, dtype=DT)
XV = torch.randn(20, D, generator=g, dtype=DT)
YV = torch.randn(20, 1, generator=g, dtype=DT)


def _f(w, b, th, x, y):
    return ((x @ w + b - y[:, 0]) ** 2).mean() + th.exp().sum() * (w**2).sum()


def _reference(w, b, th, decays, method):
    """Dense float64: d_phi g - M^T x with x = (H + diag(decays))^{-1} grad g (T1T2: lr grad g)."""
    jac = torch.autograd.functional.jacobian
    z = torch.cat([w, b]).detach()

    def f(z, t):
        return _f(z[:D], z[D], t, X, Y)

    def gv(z, t):
        return _f(z[:D], z[D], t, XV, YV)

    th = th.detach()
    hess = torch.autograd.functional.hessian(lambda z: f(z, th), z) + torch.diag(decays)
    mixed = jac(lambda t: jac(lambda z: f(z, t), z, create_graph=True), th)
    grad_g = jac(lambda z: gv(z, th), z)
    x = LR * grad_g if method is T1T2 else torch.linalg.solve(hess, grad_g)
    return jac(lambda t: gv(z, t), th) - mixed.T @ x


def _setup(method, optimizer):
    torch.manual_seed(0)
    model = nn.Linear(D, 1).double()
    theta = torch.tensor([-1.0], dtype=DT)

    def criterion(out, y):
        return ((out - y) ** 2).mean() + theta.exp() * model.weight.square().sum()

    opt = optimizer(model)
    # 1,000 Neumann terms (step lr 0.05): the series has converged, the hypergradients are
    # bitwise those of 4,000 terms (measured for the three optimizers), at a quarter the cost
    kw = {Neumann: {"num_terms": 1000}, HOAG: {"epsilon": 0.0, "cg_max_iter": D + 1}}
    ho = method(
        {"theta": theta},
        hyper_lr=0.0,
        model=model,
        optimizer=opt,
        train_loader=[(X, Y)],
        val_loader=[(XV, YV)],
        criterion=criterion,
        **kw.get(method, {}),
    )
    for _ in range(1000):  # towards the fixed point of the optimizer's steps
        opt.zero_grad()
        criterion(model(X), Y).backward()
        opt.step()
    return model, theta, criterion, ho


OPTIMIZERS = {
    "sgd": (lambda m: torch.optim.SGD(m.parameters(), lr=LR, weight_decay=0.5), [0.5] * 5),
    "groups": (
        lambda m: torch.optim.SGD(
            [
                {"params": [m.weight], "weight_decay": 0.5},
                {"params": [m.bias], "weight_decay": 0.2},
            ],
            lr=LR,
        ),
        [0.5] * 4 + [0.2],
    ),
    "adamw": (lambda m: torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=0.5), [0.0] * 5),
}


@pytest.mark.parametrize("method", [Neumann, HOAG, T1T2])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_hyper_step_and_hook_use_the_optimizers_l2_decay(method, opt):
    make, decays = OPTIMIZERS[opt]
    model, theta, criterion, ho = _setup(method, make)
    w, b = model.weight.detach().reshape(-1), model.bias.detach()
    ref = _reference(w, b, theta, torch.tensor(decays, dtype=DT), method)
    step = ho.hyper_grad_on_batches((X, Y), (XV, YV))[0]
    theta.requires_grad_(True)
    hook = ho.hyper_grad(criterion(model(X), Y), criterion(model(XV), YV))[0]
    theta.requires_grad_(False)
    for got in (step, hook):
        assert torch.allclose(got, ref, rtol=1e-7, atol=1e-12), (got, ref)


def test_the_decay_changes_the_answer_here():
    """The problem is one where leaving the term out is visibly wrong (-0.0229 vs -0.0152)."""
    model, theta, _, ho = _setup(HOAG, OPTIMIZERS["sgd"][0])
    w, b = model.weight.detach().reshape(-1), model.bias.detach()
    with_decay = _reference(w, b, theta, torch.full((5,), 0.5, dtype=DT), HOAG)
    without = _reference(w, b, theta, torch.zeros(5, dtype=DT), HOAG)
    assert (with_decay - without).abs().item() > 1e-3
    got = ho.hyper_grad_on_batches((X, Y), (XV, YV))[0]
    assert torch.allclose(got, with_decay, rtol=1e-7)


# DRMAD trains its T steps with the optimizer (its L2 decay included) and reversed them
# with weight_decay=0 by default: on a problem where DrMAD is exact for any T (constant
# Hessian and mixed term), 0.50464 where the unrolled hypergradient is 0.50178. Its
# default is now the optimizer's own decay.
DR_LR, DR_WD, DR_T = 0.1, 0.3, 3


def _unrolled(phi, w0):
    w = w0.clone().requires_grad_()
    for _ in range(DR_T):
        grad = torch.autograd.grad(_shift_loss(w, phi, X, Y), w, create_graph=True)[0]
        w = w - DR_LR * (grad + DR_WD * w)
    return _shift_loss(w, phi, XV, YV)


def _shift_loss(w, phi, x, y):
    return ((x @ w - y) ** 2).mean() + ((w - phi) ** 2).sum()


def _drmad(optimizer, **kw):
    from hypergradient.compat.hippotrainer import DRMAD

    torch.manual_seed(0)
    model = nn.Linear(D, 1, bias=False).double()
    phi = torch.full((D, 1), 0.5, dtype=DT)

    def criterion(out, y):
        return ((out - y) ** 2).mean() + (model.weight.T - phi).square().sum()

    ho = DRMAD(
        {"phi": phi},
        hyper_lr=0.0,
        model=model,
        optimizer=optimizer(model),
        train_loader=[(X, Y)],
        val_loader=[(XV, YV)],
        criterion=criterion,
        T=DR_T,
        **kw,
    )
    return model, phi, ho


def _sgd(m):
    return torch.optim.SGD(m.parameters(), lr=DR_LR, weight_decay=DR_WD)


@pytest.mark.parametrize("kw", [{}, {"weight_decay": DR_WD}])
def test_drmad_reverses_the_optimizers_decay_by_default(kw):
    model, phi, ho = _drmad(_sgd, **kw)
    w0 = model.weight.detach().T.clone()
    got = ho.hyper_grad_on_batches((X, Y), (XV, YV))[0]
    p = phi.clone().requires_grad_()
    ref = torch.autograd.grad(_unrolled(p, w0), p)[0]
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-13), (got, ref)
    # an explicit weight_decay=0 is still the reverse pass without it (here: not exact)
    model, phi, ho = _drmad(_sgd, weight_decay=0.0)
    assert not torch.allclose(ho.hyper_grad_on_batches((X, Y), (XV, YV))[0], ref, rtol=1e-3)


def test_drmad_refuses_groups_of_different_decays_before_training():
    def groups(m):
        half = nn.Linear(D, 1, bias=True).double()  # a second trained tensor: its bias
        m.extra = half
        return torch.optim.SGD(
            [
                {"params": [m.weight], "weight_decay": 0.3},
                {"params": half.parameters(), "weight_decay": 0.1},
            ],
            lr=DR_LR,
        )

    model, phi, ho = _drmad(groups)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="one L2 weight_decay"):
        ho.hyper_grad_on_batches((X, Y), (XV, YV))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not ho.optimizer.state  # no step taken
    ho.weight_decay = 0.3  # an explicit coefficient is taken as given
    ho.hyper_grad_on_batches((X, Y), (XV, YV))
