"""hypergradient.compat.hippotrainer: HippoTrainer's loop with only the import changed."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_breast_cancer

import hypergradient as hg
from conftest import to_device
from hypergradient.compat.hippotrainer import DRMAD, HOAG, T1T2, HyperOptimizer, Neumann

DT = torch.float64


def _loaders():
    X, y = load_breast_cancer(return_X_y=True)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    X = torch.as_tensor(X, dtype=DT)[perm]
    y = torch.as_tensor(y, dtype=DT)[perm].unsqueeze(1)
    X = (X - X[:100].mean(0)) / X[:100].std(0)
    train = [(X[:100], y[:100])]  # one full batch: deterministic, so references are exact
    val = [(X[100:300], y[100:300])]
    return train, val


TRAIN, VAL = _loaders()
D = TRAIN[0][0].shape[1]


def setup(cls, device="cpu", **kw):
    torch.manual_seed(0)
    model = to_device(device, torch.nn.Linear(D, 1).double())
    hyper = {"log_wd": to_device(device, torch.full((D,), -3.0, dtype=DT))}
    bce = torch.nn.BCEWithLogitsLoss()

    # HippoTrainer's pattern: the criterion holds the hyperparameters (and the model).
    def criterion(preds, targets):
        return bce(preds, targets) + 0.5 * (hyper["log_wd"].exp() * model.weight[0] ** 2).sum()

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    hopt = cls(
        hyper,
        hyper_lr=0.5,
        inner_steps=10,
        model=model,
        optimizer=optimizer,
        train_loader=to_device(device, TRAIN),
        val_loader=to_device(device, VAL),
        criterion=criterion,
        **kw,
    )
    return model, hyper, optimizer, criterion, hopt


def documented_loop(model, criterion, hopt, epochs):
    """The training loop of HippoTrainer's demo."""
    for _ in range(epochs):
        for inputs, targets in hopt.train_loader:
            outputs = model(inputs)
            loss = criterion(outputs, targets)
            loss.backward()
            hopt.step(loss)
            hopt.zero_grad()


def core_reference(model, hyper, solver):
    """The same hypergradient from the functional core, written independently (on the CPU)."""
    (xt, yt), (xv, yv) = TRAIN[0], VAL[0]
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def f(p, h):
        return bce(xt @ p[0].T + p[1], yt) + 0.5 * (h.exp() * p[0][0] ** 2).sum()

    def g(p, h):
        return bce(xv @ p[0].T + p[1], yv) + 0.5 * (h.exp() * p[0][0] ** 2).sum()

    params = (model.weight.detach().cpu(), model.bias.detach().cpu())
    return hg.implicit(f, g, params, hyper["log_wd"].detach().cpu(), solver)


@pytest.mark.parametrize(
    "cls,kw,solver",
    [
        (T1T2, {}, lambda: hg.Identity(0.5)),
        (Neumann, {"num_terms": 5}, lambda: hg.Neumann(maxiter=5, alpha=0.5)),
        (HOAG, {"epsilon": 1e-20, "cg_max_iter": 7}, lambda: hg.CG(maxiter=7, tol=0.0)),
        (HOAG, {"epsilon": 0.0, "cg_max_iter": 7}, lambda: hg.CG(maxiter=7, tol=0.0)),
    ],
    ids=["t1t2", "neumann", "hoag", "hoag-epsilon-0"],
)
def test_hypergradients_match_the_core(cls, kw, solver, device):
    model, hyper, _, criterion, hopt = setup(cls, device, **kw)
    documented_loop(model, criterion, hopt, 9)  # no hyper-step yet
    assert hopt.step_count == 9 and not hopt.history
    before = hyper["log_wd"].cpu().clone()
    # the 10th step: inner step, then the hyper-step at the new weights
    for inputs, targets in hopt.train_loader:
        criterion(model(inputs), targets).backward()
        hopt.optimizer.step()
        hopt.step_count += 1
        ref = core_reference(model, hyper, solver())
        hopt.hyper_step()
    assert hyper["log_wd"].device == model.weight.device
    assert torch.allclose(hyper["log_wd"].cpu(), before - 0.5 * ref, rtol=1e-10, atol=1e-14)
    assert not hyper["log_wd"].requires_grad  # as HippoTrainer leaves them


@pytest.mark.parametrize(
    "cls,kw",
    [(T1T2, {}), (Neumann, {"num_terms": 10}), (HOAG, {"cg_max_iter": 20}), (DRMAD, {"T": 10})],
    ids=["t1t2", "neumann", "hoag", "drmad"],
)
def test_documented_loop_lowers_validation_loss(cls, kw):
    model, hyper, _, criterion, hopt = setup(cls, **kw)
    _, val0 = hopt.evaluate()
    documented_loop(model, criterion, hopt, 300)
    _, val1 = hopt.evaluate()
    assert len(hopt.history) >= 25
    # validation loss (without the penalty) falls below the untuned run's
    model_u, _, _, crit_u, hopt_u = setup(T1T2)
    hopt_u.inner_steps = 10**9
    documented_loop(model_u, crit_u, hopt_u, 300 if cls is not DRMAD else 300 + 30 * 9)
    bce = torch.nn.BCEWithLogitsLoss()
    with torch.no_grad():
        tuned = float(bce(model(VAL[0][0]), VAL[0][1]))
        untuned = float(bce(model_u(VAL[0][0]), VAL[0][1]))
    assert tuned < untuned, (tuned, untuned)


def test_drmad_hypergradient_points_the_right_way():
    """DrMAD's approximation has positive cosine with the exact unrolled hypergradient."""
    model, hyper, opt, criterion, hopt = setup(DRMAD, T=20)
    documented_loop(model, criterion, hopt, 9)
    w0 = (model.weight.detach().clone(), model.bias.detach().clone())
    h0 = hyper["log_wd"].detach().clone()
    approx = hopt.hyper_grad_on_batches(TRAIN[0], VAL[0])[0]
    assert torch.equal(hopt.w0[0], w0[0]) and torch.equal(hopt.wT[0], model.weight.detach())
    (xt, yt), (xv, yv) = TRAIN[0], VAL[0]
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def f(p, h):
        return bce(xt @ p[0].T + p[1], yt) + 0.5 * (h.exp() * p[0][0] ** 2).sum()

    def g(p, h):
        return bce(xv @ p[0].T + p[1], yv) + 0.5 * (h.exp() * p[0][0] ** 2).sum()

    exact = hg.unrolled(f, g, w0, h0, 20, hg.optim.sgd(lr=0.5))
    cos = float(exact @ approx / (exact.norm() * approx.norm()))
    assert cos > 0.9, cos


def test_validation_loss_without_the_hyperparameter_works():
    torch.manual_seed(0)
    model = torch.nn.Linear(D, 1).double()
    hyper = {"log_wd": torch.full((D,), -3.0, dtype=DT)}
    bce = torch.nn.BCEWithLogitsLoss()
    calls = {"n": 0}

    def criterion(preds, targets):
        calls["n"] += 1
        if calls["n"] % 2 == 0:  # some evaluations without the penalty
            return bce(preds, targets)
        return bce(preds, targets) + 0.5 * (hyper["log_wd"].exp() * model.weight[0] ** 2).sum()

    hopt = Neumann(
        hyper,
        hyper_lr=0.1,
        inner_steps=1,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        train_loader=TRAIN,
        val_loader=VAL,
        criterion=criterion,
        num_terms=3,
    )
    documented_loop(model, criterion, hopt, 5)
    assert len(hopt.history) == 5


def test_bad_input():
    model = torch.nn.Linear(D, 1).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="val_loader"):
        T1T2(
            {"a": torch.zeros(2)},
            model=model,
            optimizer=opt,
            train_loader=TRAIN,
            criterion=torch.nn.MSELoss(),
        )
    with pytest.raises(ValueError, match="not a leaf"):
        T1T2(
            {"a": torch.zeros(2, requires_grad=True) * 2},
            model=model,
            optimizer=opt,
            train_loader=TRAIN,
            val_loader=VAL,
            criterion=torch.nn.MSELoss(),
        )
    with pytest.raises(ValueError, match="num_terms"):
        Neumann(
            {"a": torch.zeros(2)},
            model=model,
            optimizer=opt,
            train_loader=TRAIN,
            val_loader=VAL,
            criterion=torch.nn.MSELoss(),
            num_terms=0,
        )
    assert issubclass(Neumann, HyperOptimizer)


@pytest.mark.parametrize(
    "cls,kw,expected",
    [(T1T2, {}, 0), (Neumann, {"num_terms": 5}, 5), (Neumann, {"num_terms": 1}, 1)],
    ids=["t1t2", "neumann5", "neumann1"],
)
def test_hyper_step_spends_only_the_method_products(cls, kw, expected, products):
    """T1T2 takes no Hessian-vector product and Neumann(num_terms=k) exactly k: no product
    is spent on a residual nothing reads (it used to cost one more per hyper-step)."""
    model, hyper, _, criterion, hopt = setup(cls, **kw)
    documented_loop(model, criterion, hopt, 10)  # the 10th step takes a hyper-step
    assert len(hopt.history) == 1 and products[0] == expected
