"""compat.hippotrainer: HippoTrainer's hook and helpers, against dense float64 references.

The hook ``hyper_grad(train_loss, val_loss)`` (on loss tensors) and the hyper-step (through
``hg.implicit`` and the library's solvers) are two independent computations of the same
hypergradient; both are checked against dense Hessians and mixed Jacobians.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hypergradient.compat.hippotrainer import DRMAD, HOAG, T1T2, HyperOptimizer, Neumann

DT = torch.float64
P, LR = 5, 0.1
_g = torch.Generator().manual_seed(3)
XT = torch.randn(40, P, generator=_g, dtype=DT)
XV = torch.randn(30, P, generator=_g, dtype=DT)
W_TRUE = torch.randn(P, 1, generator=_g, dtype=DT)
YT = XT @ W_TRUE + 0.5 * torch.randn(40, 1, generator=_g, dtype=DT)
YV = XV @ W_TRUE + 0.5 * torch.randn(30, 1, generator=_g, dtype=DT)
TRAIN, VAL = (XT, YT), (XV, YV)


def make(cls=T1T2, **kw):
    """Ridge regression with per-feature log decays, held by the criterion (by reference)."""
    torch.manual_seed(0)
    model = nn.Linear(P, 1).double()
    hyper = {"log_wd": torch.linspace(-1.0, 0.0, P, dtype=DT)}

    def criterion(pred, target):
        penalty = 0.5 * (hyper["log_wd"].exp() * model.weight[0] ** 2).sum()
        return ((pred - target) ** 2).mean() + penalty

    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(5):  # move away from the initialization, without hyper-steps
        optimizer.zero_grad()
        criterion(model(XT), YT).backward()
        optimizer.step()
    optimizer.zero_grad()
    hopt = cls(
        hyper,
        hyper_lr=0.3,
        model=model,
        optimizer=optimizer,
        train_loader=[TRAIN],
        val_loader=[VAL],
        criterion=criterion,
        **kw,
    )
    return hopt


def dense(hopt):
    """Hessian H, mixed Jacobian M = d(grad_theta f)/dh, grad_theta g and d_h g (float64)."""
    model = hopt.model
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    h = hopt.hyperparams["log_wd"].detach()

    def loss(t, h, X, Y):
        pred = X @ t[:P].reshape(P, 1) + t[P:]
        return ((pred - Y) ** 2).mean() + 0.5 * (h.exp() * t[:P] ** 2).sum()

    def f(t, h):
        return loss(t, h, XT, YT)

    def g(t, h):
        return loss(t, h, XV, YV)

    H = torch.func.hessian(f)(theta, h)
    M = torch.func.jacrev(torch.func.grad(f), argnums=1)(theta, h)
    return H, M, torch.func.grad(g)(theta, h), torch.func.grad(g, argnums=1)(theta, h)


def reference(hopt, kind):
    H, M, gt, direct = dense(hopt)
    n = H.shape[0]
    if kind == "t1t2":
        x = LR * gt
    elif kind == "neumann":
        A = torch.eye(n, dtype=DT) - LR * H
        x = LR * sum(torch.linalg.matrix_power(A, j) for j in range(hopt.num_terms + 1)) @ gt
    else:
        x = torch.linalg.solve(H, gt)
    return direct - M.T @ x


def hook(hopt):
    """HippoTrainer's hook on the criterion's losses, as its tests call it."""
    hopt._hyperparams_requires_grad_(True)
    try:
        train_loss = hopt.criterion(hopt.model(XT), YT)
        val_loss = hopt.criterion(hopt.model(XV), YV)
        return hopt.hyper_grad(train_loss, val_loss)
    finally:
        hopt._hyperparams_requires_grad_(False)


CASES = [
    (T1T2, {}, "t1t2"),
    (Neumann, {"num_terms": 4}, "neumann"),
    (HOAG, {"epsilon": 1e-28, "cg_max_iter": P + 1}, "exact"),
]


@pytest.mark.parametrize("cls,kw,kind", CASES, ids=["t1t2", "neumann", "hoag"])
def test_hook_and_hyper_step_agree_with_the_dense_reference(cls, kw, kind):
    ref = reference(make(cls, **kw), kind)
    by_hook = hook(make(cls, **kw))[0]
    by_step = make(cls, **kw).hyper_grad_on_batches(TRAIN, VAL)[0]
    assert torch.allclose(by_hook, ref, rtol=1e-9, atol=1e-13)
    assert torch.allclose(by_step, ref, rtol=1e-9, atol=1e-13)
    # and hyper_step applies it: h <- h - hyper_lr * hypergradient
    hopt = make(cls, **kw)
    before = hopt.hyperparams["log_wd"].clone()
    hopt.hyper_step()
    assert torch.allclose(hopt.hyperparams["log_wd"], before - 0.3 * ref, rtol=1e-9, atol=1e-13)
    assert hopt.history[-1]["hypergrad_norm"] == pytest.approx(float(ref.norm()), rel=1e-9)


class UpstreamStyleT1T2(HyperOptimizer):
    """A user's subclass written for HippoTrainer: only the documented hook."""

    def hyper_grad(self, train_loss, val_loss):
        params = list(self.model.parameters())
        hyper = list(self.hyperparams.values())
        v1 = torch.autograd.grad(val_loss, params, retain_graph=True)
        d_train = torch.autograd.grad(train_loss, params, create_graph=True)
        v2 = torch.autograd.grad(d_train, hyper, grad_outputs=v1, retain_graph=True)
        direct = torch.autograd.grad(val_loss, hyper, retain_graph=True)
        return [d - v for d, v in zip(direct, v2)]


def test_a_subclass_hook_is_called_by_the_hyper_step_with_the_losses():
    hopt = make(UpstreamStyleT1T2)
    H, M, gt, direct = dense(hopt)
    expected = direct - M.T @ gt  # HippoTrainer's T1T2: no learning-rate factor
    before = hopt.hyperparams["log_wd"].clone()
    hopt.step()  # inner_steps=1: optimizer.step() (no gradients: no change), then a hyper-step
    assert torch.allclose(hopt.hyperparams["log_wd"], before - 0.3 * expected, rtol=1e-10)
    assert not hopt.hyperparams["log_wd"].requires_grad


def test_overridden_helpers_are_used_by_the_hyper_step():
    calls = []

    class LookAheadNeumann(Neumann):  # H^{-1} ~ lr I: the T1T2 hypergradient
        def approx_inverse_hvp(self, v, f):
            calls.append("approx_inverse_hvp")
            return [LR * t for t in v]

    class CountingHOAG(HOAG):
        def conjugate_gradient(self, matvec_fn, b, x0=None):
            calls.append("conjugate_gradient")
            return super().conjugate_gradient(matvec_fn, b, x0)

    t1t2 = reference(make(T1T2), "t1t2")
    got = make(LookAheadNeumann, num_terms=3).hyper_grad_on_batches(TRAIN, VAL)[0]
    assert torch.allclose(got, t1t2, rtol=1e-10)
    exact = reference(make(HOAG), "exact")
    got = make(CountingHOAG, epsilon=1e-28, cg_max_iter=P + 1).hyper_grad_on_batches(TRAIN, VAL)
    assert torch.allclose(got[0], exact, rtol=1e-9)
    assert calls == ["approx_inverse_hvp", "conjugate_gradient"]


def test_neumann_approx_inverse_hvp_is_the_series():
    hopt = make(Neumann, num_terms=6)
    H, _, gt, _ = dense(hopt)
    params = list(hopt.model.parameters())
    hopt._hyperparams_requires_grad_(True)
    d_train = torch.autograd.grad(hopt.criterion(hopt.model(XT), YT), params, create_graph=True)
    v = [gt[:P].reshape(1, P), gt[P:]]
    got = torch.cat([t.reshape(-1) for t in hopt.approx_inverse_hvp(v, d_train)])
    A = torch.eye(P + 1, dtype=DT) - LR * H
    series = LR * sum(torch.linalg.matrix_power(A, j) for j in range(7)) @ gt
    assert torch.allclose(got, series, rtol=1e-12)
    # HippoTrainer's recursion rescales its partial sum by lr at every term: not the series
    partial, term = gt, gt
    for _ in range(6):
        term = A @ term
        partial = LR * (partial + term)
    assert (got - partial).norm() > 0.5 * got.norm()


def test_hoag_conjugate_gradient_and_hessian_vector_product():
    hopt = make(HOAG, epsilon=1e-26, cg_max_iter=8)
    Q = torch.randn(8, 8, generator=torch.Generator().manual_seed(1), dtype=DT)
    A = Q @ Q.T + 0.5 * torch.eye(8, dtype=DT)
    b = torch.arange(1.0, 9.0, dtype=DT)
    x = hopt.conjugate_gradient(lambda v: A @ v, b)
    assert torch.allclose(x, torch.linalg.solve(A, b), rtol=1e-9)
    # HippoTrainer's stopping rule ||r||^2 < epsilon: a start that meets it is returned
    hopt.epsilon = 1e-2
    assert torch.equal(hopt.conjugate_gradient(lambda v: A @ v, b, x0=x), x)
    # H v by two backward passes, against the dense Hessian
    H, _, _, _ = dense(hopt)
    params = list(hopt.model.parameters())
    loss = hopt.criterion(hopt.model(XT), YT)
    vec = [torch.ones(1, P, dtype=DT), torch.full((1,), 2.0, dtype=DT)]
    hv = hopt.hessian_vector_product(loss, params, vec)
    expected = H @ torch.cat([vec[0].reshape(-1), vec[1]])
    assert torch.allclose(torch.cat([t.reshape(-1) for t in hv]), expected, rtol=1e-12)
    assert all(not t.requires_grad for t in hv)


def test_evaluate_is_differentiable_and_restores_the_mode():
    hopt = make(T1T2)
    _, _, _, direct = dense(hopt)
    hopt.model.eval()
    hopt._hyperparams_requires_grad_(True)
    train, val = hopt.evaluate()
    assert not hopt.model.training  # restored (HippoTrainer leaves it in eval mode)
    (grad,) = torch.autograd.grad(val, [hopt.hyperparams["log_wd"]])
    assert torch.allclose(grad, direct, rtol=1e-12)
    expected = hopt.criterion(hopt.model(XT), YT).detach()
    assert float(train.detach()) == pytest.approx(float(expected), rel=1e-14)


def test_the_batch_form_of_hyper_grad_is_deprecated_but_works():
    hopt = make(T1T2)
    expected = hopt.hyper_grad_on_batches(TRAIN, VAL)[0]
    with pytest.warns(DeprecationWarning, match="hyper_grad_on_batches"):
        got = hopt.hyper_grad(TRAIN, VAL)[0]
    assert torch.equal(got, expected)


def test_drmad_stores_its_weights_and_matches_the_reverse_pass():
    """DRMAD's reverse pass equals exact reverse mode when w0 = wT (a stationary start)."""
    hopt = make(DRMAD, T=4)
    # train the model to the inner optimum, where SGD steps do not move it
    opt = torch.optim.SGD(hopt.model.parameters(), lr=LR)
    for _ in range(3000):
        opt.zero_grad()
        hopt.criterion(hopt.model(XT), YT).backward()
        opt.step()
    H, M, gt, direct = dense(hopt)
    got = hopt.hyper_grad_on_batches(TRAIN, VAL)[0]
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(hopt.w0, hopt.wT))
    # reverse mode through 4 steps at a fixed point: a_t = (I - lr H)^t gt
    A = torch.eye(P + 1, dtype=DT) - LR * H
    x = LR * sum(torch.linalg.matrix_power(A, j) for j in range(4)) @ gt
    assert torch.allclose(got, direct - M.T @ x, rtol=1e-8, atol=1e-12)
