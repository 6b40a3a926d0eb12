"""Adversarial checks of the compat layers with argument forms their users write: a bare
tensor for hypergrad's ``Params``, generators (``model.parameters()``) where tuples are
expected.

References: the same call with tuples, and a dense float64 implicit hypergradient."""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg
from hypergradient.compat.hypergrad.approx_hypergrad import (
    conjugate_gradient,
    implicit_grad,
    neumann,
    nystrom,
)

DT = torch.float64
g = torch.Generator().manual_seed(0)
X, Y = torch.randn(100, 10, generator=g, dtype=DT), torch.randn(100, generator=g, dtype=DT)
XV, YV = torch.randn(50, 10, generator=g, dtype=DT), torch.randn(50, generator=g, dtype=DT)
LAM = (torch.full((10,), 0.1, dtype=DT),)
W = (torch.linalg.solve(X.T @ X / 100 + torch.diag(LAM[0]), X.T @ Y / 100),)


def inner_obj(in_params, out_params):
    (w,), (lam,) = in_params, out_params
    return 0.5 * ((X @ w - Y) ** 2).mean() + 0.5 * (lam * w**2).sum()


def outer_obj(in_params, out_params):
    (w,) = in_params
    return 0.5 * ((XV @ w - YV) ** 2).mean()


def dense():
    """d_lam g - (d_lam grad_w f)^T H^{-1} grad_w g, H = X^T X / n + diag(lam)."""
    H = X.T @ X / 100 + torch.diag(LAM[0])
    x = torch.linalg.solve(H, XV.T @ (XV @ W[0] - YV) / 50)
    return -(W[0] * x)  # d_lam grad_w f = diag(w)


@pytest.mark.parametrize(
    "call",
    [
        lambda w, lam: conjugate_gradient(inner_obj, outer_obj, w, lam, 10, 0.1),
        lambda w, lam: neumann(inner_obj, outer_obj, w, lam, 5, 0.5),
        lambda w, lam: nystrom(inner_obj, outer_obj, w, lam, 10, 1e-9),
    ],
    ids=["conjugate_gradient", "neumann", "nystrom"],
)
def test_a_bare_tensor_for_params_is_refused_naming_the_argument(call):
    """tuple(w) split a tensor into its rows: the user's objective got ten scalars and
    failed inside with 'too many values to unpack'."""
    with pytest.raises(hg.ArgumentTypeError, match=r"`in_params` must be a tuple.*\(w,\)"):
        call(W[0], LAM)
    with pytest.raises(hg.ArgumentTypeError, match="`out_params`"):
        call(W, LAM[0])
    with pytest.raises(hg.ArgumentTypeError, match="non-empty"):
        call((), LAM)


def test_generators_of_parameters_are_read_once_and_give_the_tuples_result():
    """nystrom called len() on a generator (TypeError); a function decorated with
    implicit_grad consumed it, and the decorator then took the mixed product over nothing
    (the hypergradient lost its implicit term)."""
    torch.manual_seed(3)
    want = nystrom(inner_obj, outer_obj, W, LAM, 10, 1e-9)
    torch.manual_seed(3)
    got = nystrom(inner_obj, outer_obj, (w for w in W), (lam for lam in LAM), 10, 1e-9)
    assert torch.equal(got[0], want[0])
    assert torch.allclose(got[0], dense(), rtol=1e-7, atol=0)

    @implicit_grad
    def exact_ihvp(inner_obj, outer_obj, in_params, out_params):
        (w,), (lam,) = tuple(in_params), tuple(out_params)
        H = X.T @ X / 100 + torch.diag(lam)
        x = torch.linalg.solve(H, XV.T @ (XV @ w - YV) / 50)
        return (x,), (torch.zeros_like(lam),)

    from_tuples = exact_ihvp(inner_obj, outer_obj, W, LAM)
    from_generators = exact_ihvp(inner_obj, outer_obj, iter(W), out_params=iter(LAM))
    assert torch.allclose(from_tuples[0], dense(), rtol=1e-12, atol=0)
    assert torch.equal(from_generators[0], from_tuples[0])


def test_hippotrainer_refuses_a_hyperparameter_that_is_an_optimizer_setting_or_parameter():
    """A tensor learning rate passed as a hyperparameter (HippoTrainer: "learning rate
    tuning is not supported") was accepted, and every method returned a hypergradient of
    exactly 0 for it: the run looked tuned and never was."""
    from torch import nn

    from hypergradient.compat.hippotrainer import DRMAD, HOAG, T1T2, Neumann

    data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
    for cls in (T1T2, Neumann, HOAG, DRMAD):
        model, lr, theta = nn.Linear(4, 2), torch.tensor(0.1), torch.zeros(1)
        setup = {"model": model, "train_loader": data, "val_loader": data}
        setup["criterion"] = nn.CrossEntropyLoss()
        tensor_lr = torch.optim.SGD(model.parameters(), lr=lr)
        with pytest.raises(ValueError, match=r"hyperparams\['lr'\] is the optimizer's `lr`"):
            cls({"lr": lr}, optimizer=tensor_lr, **setup)
        trains_theta = torch.optim.SGD([*model.parameters(), theta], lr=0.1)
        with pytest.raises(ValueError, match=r"hyperparams\['theta'\] is trained by"):
            cls({"theta": theta}, optimizer=trains_theta, **setup)


def test_hippotrainer_drmad_over_one_step_is_the_exact_unrolled_hypergradient():
    """With T=1 the line w0 -> wT passes through the only step's start, so DrMAD's reverse
    pass is exact reverse mode through one SGD step, here from trained weights (w0 != wT;
    the other tests use a stationary start or a cosine)."""
    from test_compat_hippotrainer import DRMAD, TRAIN, VAL, documented_loop, setup

    model, hyper, _, criterion, hopt = setup(DRMAD, T=1)
    documented_loop(model, criterion, hopt, 3)
    w0 = (model.weight.detach().clone(), model.bias.detach().clone())
    h0 = hyper["log_wd"].detach().clone()
    got = hopt.hyper_grad_on_batches(TRAIN[0], VAL[0])[0]
    assert not torch.equal(hopt.wT[0], w0[0])
    (xt, yt), (xv, yv) = TRAIN[0], VAL[0]
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def f(p, h):
        return bce(xt @ p[0].T + p[1], yt) + 0.5 * (h.exp() * p[0][0] ** 2).sum()

    def g(p, h):
        return bce(xv @ p[0].T + p[1], yv) + 0.5 * (h.exp() * p[0][0] ** 2).sum()

    exact = hg.unrolled(f, g, w0, h0, 1, hg.optim.sgd(lr=0.5))
    assert torch.allclose(got, exact, rtol=1e-12, atol=1e-15)


def test_hippotrainer_differentiates_only_what_the_optimizer_trains():
    """An optimizer over the head only, the body left requiring grad (fine-tuning without
    requires_grad_(False)): the body is a constant of the inner problem. The compat layer
    took every parameter requiring grad as trained, so HOAG solved with the body's Hessian
    too (non-positive curvature, a hypergradient of the wrong sign: 0.036 for -0.0117)."""
    from torch import nn

    from hypergradient.compat.hippotrainer import HOAG, T1T2

    torch.manual_seed(0)
    x, y = torch.randn(60, 4, dtype=DT), torch.randn(60, 1, dtype=DT)
    train, val = (x[:40], y[:40]), (x[40:], y[40:])
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    decay = torch.tensor([0.1], dtype=DT)

    def criterion(out, target):
        return ((out - target) ** 2).mean() + (decay * model[2].weight.square()).sum()

    head = torch.optim.SGD(model[2].parameters(), lr=0.1)
    for _ in range(200):
        head.zero_grad()
        criterion(model(train[0]), train[1]).backward()
        head.step()

    def loss(batch):
        def f(p, h):
            out = torch.func.functional_call(model, {"2.weight": p[0], "2.bias": p[1]}, batch[0])
            return ((out - batch[1]) ** 2).mean() + (h * p[0].square()).sum()

        return f

    params = (model[2].weight.detach(), model[2].bias.detach())
    setup = {"model": model, "optimizer": head, "train_loader": [train], "val_loader": [val]}
    for cls, kw, solver in (
        (HOAG, {"epsilon": 1e-30, "cg_max_iter": 50}, hg.Exact()),
        (T1T2, {}, hg.Identity(0.1)),
    ):
        want = hg.implicit(loss(train), loss(val), params, decay, solver, stationarity=None)
        got = cls({"decay": decay}, criterion=criterion, **setup, **kw)
        assert torch.allclose(got.hyper_grad_on_batches(train, val)[0], want, rtol=1e-10)
    elsewhere = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="trains none of the model's parameters"):
        T1T2({"decay": decay}, criterion=criterion, **(setup | {"optimizer": elsewhere}))


def test_a_one_pass_loader_is_named_as_such_when_it_runs_out():
    """A generator of batches gave its batches once; the next pass found none and the error
    said the loader 'yields no batches' (hypergrad itself looped forever there)."""
    from torch import nn

    from hypergradient.compat.hippotrainer import T1T2
    from hypergradient.compat.hypergrad.solver import BaseSolver

    batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    model = nn.Linear(4, 2)
    hopt = T1T2(
        {"theta": torch.zeros(1)},
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_loader=(b for b in [batch]),
        val_loader=[batch],
        criterion=nn.CrossEntropyLoss(),
    )
    hopt.hyper_step()
    with pytest.raises(ValueError, match="`train_loader` .* one-pass iterator"):
        hopt.hyper_step()

    class Solver(BaseSolver):
        inner_forward = outer_forward = inner_update = outer_update = None

    solver = Solver(
        nn.Linear(4, 2),
        nn.Linear(1, 1),
        (b for b in [batch]),
        [batch],
        1,
        1,
        None,
        None,
        device=torch.device("cpu"),
    )
    next(solver.inner_loader)
    with pytest.raises(ValueError, match="`inner_loader` .* one-pass iterator"):
        next(solver.inner_loader)
