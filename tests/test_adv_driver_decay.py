"""Implicit hyper-steps under an inner optimizer with ``weight_decay`` (an L2 term it adds
to the gradient): its fixed points are the stationary points of ``train_loss + wd / 2
||theta||^2``, so the hypergradient is ``-(d_phi grad f)^T (H + diag(wd))^{-1} grad g``.

Reference: ridge regression with a bias and per-feature decays ``lam`` in ``train_loss``,
float64, at the exact minimizer of the decayed objective; the Hessian and mixed derivative
are built densely and the system solved by ``torch.linalg.solve``. Before the fix the driver
handed the methods ``train_loss`` alone (158 % relative error, no warning).
"""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg

DT = torch.float64
N, D = 60, 6
_g = torch.Generator().manual_seed(3)
X, XV = torch.randn(N, D, generator=_g, dtype=DT), torch.randn(40, D, generator=_g, dtype=DT)
Y, YV = torch.randn(N, generator=_g, dtype=DT) + 1.0, torch.randn(40, generator=_g, dtype=DT)
LAM = torch.linspace(0.05, 0.4, D, dtype=DT)


def train_loss(m, h, batch):
    x, y = batch
    penalty = 0.5 * (h["lam"] * m.weight.reshape(-1) ** 2).sum()
    return 0.5 * ((m(x).reshape(-1) - y) ** 2).mean() + penalty


def val_loss(m, h, batch):
    x, y = batch
    return 0.5 * ((m(x).reshape(-1) - y) ** 2).mean()


def reference(wd_weight, wd_bias):
    """Minimizer of the decayed objective over z = [w, b] and the exact hypergradient with
    respect to raw = log(lam)."""
    Z, ZV = torch.cat([X, torch.ones(N, 1, dtype=DT)], 1), torch.cat([XV, torch.ones(40, 1)], 1)
    decay = torch.cat([LAM + wd_weight, torch.tensor([wd_bias], dtype=DT)])
    A = Z.T @ Z / N + torch.diag(decay)
    z = torch.linalg.solve(A, Z.T @ Y / N)
    grad_g = ZV.T @ (ZV @ z - YV) / 40
    v = torch.linalg.solve(A, grad_g)
    return z, -(v[:D] * z[:D]) * LAM  # d_lam grad_w f = diag(w); d lam / d raw = lam


def hyper_step(inner_factory, method, wd_weight, wd_bias):
    z, ref = reference(wd_weight, wd_bias)
    model = torch.nn.Linear(D, 1).double()
    with torch.no_grad():
        model.weight.copy_(z[:D].unsqueeze(0))
        model.bias.fill_(float(z[D]))
    inner = inner_factory(model, wd_weight, wd_bias)
    hopt = hg.HyperOptimizer(
        model,
        {"lam": hg.Positive(LAM.clone())},
        inner_optimizer=inner,
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=1e-12),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(XV, YV),
        method=method,
        inner_steps=1,
    )
    hopt.zero_grad()
    hopt.train_loss((X, Y)).backward()
    hopt.step((X, Y))
    return hopt.history[-1].hypergrad["lam"], ref


def groups(model, wd_weight, wd_bias):
    return [
        {"params": [model.weight], "weight_decay": wd_weight},
        {"params": [model.bias], "weight_decay": wd_bias},
    ]


INNER = {
    "sgd": lambda m, a, b: torch.optim.SGD(groups(m, a, b), lr=1e-15),
    "sgd-momentum": lambda m, a, b: torch.optim.SGD(groups(m, a, b), lr=1e-15, momentum=0.9),
    "adam": lambda m, a, b: torch.optim.Adam(groups(m, a, b), lr=1e-15),
    "rmsprop": lambda m, a, b: torch.optim.RMSprop(groups(m, a, b), lr=1e-15),
}


@pytest.mark.parametrize("inner", list(INNER))
@pytest.mark.parametrize("decays", [(0.3, 0.0), (0.2, 0.7)], ids=["weight-only", "per-group"])
def test_ift_includes_the_inner_optimizers_weight_decay(inner, decays):
    got, ref = hyper_step(INNER[inner], hg.IFT(hg.CG(maxiter=50, tol=1e-13)), *decays)
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-14)


def test_hoag_includes_the_inner_optimizers_weight_decay():
    method = hg.HOAG(maxiter=100, tol=1e-12, decay=1.0)
    got, ref = hyper_step(INNER["sgd"], method, 0.3, 0.1)
    assert torch.allclose(got, ref, rtol=1e-7, atol=1e-12)


def test_a_decoupled_decay_is_no_l2_term():
    """AdamW's decay is not added to the gradient: the problem is train_loss alone (the
    reference without decay, at that reference's minimizer)."""
    factory = lambda m, a, b: torch.optim.AdamW(m.parameters(), lr=1e-15, weight_decay=0.0)  # noqa: E731
    got, ref = hyper_step(factory, hg.IFT(hg.CG(maxiter=50, tol=1e-13)), 0.0, 0.0)
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-14)
    model = torch.nn.Linear(D, 1).double()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.5)
    assert hg.hyperoptimizer.build.coupled_decays(inner, list(model.parameters())) is None


def test_t1t2_stays_the_exact_one_step_hypergradient_with_weight_decay():
    """The decay term has no mixed derivative: T1T2 is still the exact derivative of one
    decayed SGD step (autograd through ``theta - lr (grad f + wd theta)``)."""
    lr, wd = 0.2, 0.4
    torch.manual_seed(0)
    model = torch.nn.Linear(D, 1).double()
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    hopt = hg.HyperOptimizer(
        model,
        {"lam": hg.Positive(LAM.clone())},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=1e-12),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(XV, YV),
        method=hg.T1T2(),
        inner_steps=1,
    )
    hopt.zero_grad()
    hopt.train_loss((X, Y)).backward()
    hopt.step((X, Y))
    raw = LAM.log().requires_grad_(True)
    w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    f = 0.5 * ((X @ w.T + b).reshape(-1) - Y).pow(2).mean() + 0.5 * (raw.exp() * w[0] ** 2).sum()
    gw, gb = torch.autograd.grad(f, (w, b), create_graph=True)
    w1, b1 = w - lr * (gw + wd * w), b - lr * (gb + wd * b)
    g = 0.5 * ((XV @ w1.T + b1).reshape(-1) - YV).pow(2).mean()
    (exact,) = torch.autograd.grad(g, raw)
    assert torch.allclose(hopt.history[-1].hypergrad["lam"], exact, rtol=1e-10, atol=1e-16)


def test_a_tree_model_gets_the_decay_of_each_leafs_group():
    """A dict of tensors as the model, groups in another order than the dict's."""
    z, ref = reference(0.25, 0.6)
    params = {"w": z[:D].clone().requires_grad_(True), "b": z[D:].clone().requires_grad_(True)}
    inner = torch.optim.SGD(
        [{"params": [params["b"]], "weight_decay": 0.6}, {"params": [params["w"]]}],
        lr=1e-15,
        weight_decay=0.25,
    )

    def tl(p, h, batch):
        x, y = batch
        return 0.5 * ((x @ p["w"] + p["b"] - y) ** 2).mean() + 0.5 * (h["lam"] * p["w"] ** 2).sum()

    def vl(p, h, batch):
        x, y = batch
        return 0.5 * ((x @ p["w"] + p["b"] - y) ** 2).mean()

    hopt = hg.HyperOptimizer(
        params,
        {"lam": hg.Positive(LAM.clone())},
        inner_optimizer=inner,
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=1e-12),
        train_loss=tl,
        val_loss=vl,
        val_data=(XV, YV),
        method=hg.IFT(hg.CG(maxiter=50, tol=1e-13)),
        inner_steps=1,
    )
    inner.zero_grad()
    tl(params, hopt.hparams, (X, Y)).backward()
    hopt.step((X, Y))
    assert torch.allclose(hopt.history[-1].hypergrad["lam"], ref, rtol=1e-9, atol=1e-14)
