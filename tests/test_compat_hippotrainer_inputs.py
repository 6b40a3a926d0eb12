"""compat.hippotrainer: bad input, stale captured hyperparameters, non-finite values.

Bad arguments raise through ``_vocab`` before anything changes; a value computed once from
a hyperparameter (HippoTrainer's ``lambd = theta.exp()``) is refused at construction with
the fix; a non-finite quantity raises naming it and leaves model, optimizer and
hyperparameters as they were.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from torch import nn

import hypergradient as hg
from hypergradient._vocab import ArgumentTypeError
from hypergradient.compat.hippotrainer import DRMAD, HOAG, T1T2, Neumann

DT = torch.float64
_g = torch.Generator().manual_seed(5)
X = torch.randn(24, 3, generator=_g, dtype=DT)
Y = X @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=DT) + 0.1 * torch.randn(24, 1, generator=_g)
TRAIN, VAL = [(X[:12], Y[:12])], [(X[12:], Y[12:])]


def parts(lr=0.1, momentum=0.0):
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    hyper = {"log_wd": torch.zeros(3, dtype=DT)}

    def criterion(pred, target):
        return ((pred - target) ** 2).mean() + (hyper["log_wd"].exp() * model.weight**2).sum()

    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    return model, hyper, criterion, optimizer


def build(cls=T1T2, hyper_lr=0.1, **kw):
    model, hyper, criterion, optimizer = parts()
    return cls(
        hyper,
        hyper_lr=hyper_lr,
        model=model,
        optimizer=optimizer,
        train_loader=TRAIN,
        val_loader=VAL,
        criterion=criterion,
        **kw,
    )


# ---------------------------------------------------------------- hyper_lr (defect 11)


@pytest.mark.parametrize(
    "value,error,match",
    [
        (float("nan"), ValueError, "finite"),
        (-0.1, ValueError, ">= 0"),
        ("a", ArgumentTypeError, "real number"),
        (True, ArgumentTypeError, "bool"),
        (None, ArgumentTypeError, "real number"),
        (torch.tensor([0.1, -0.1, 0.1], dtype=DT), ValueError, ">= 0"),
        (torch.tensor([0.1, math.inf, 0.1], dtype=DT), ValueError, "finite"),
        (torch.ones(2, dtype=DT), ValueError, "broadcast"),
        (torch.ones(3, dtype=torch.long), ArgumentTypeError, "floating"),
    ],
)
def test_bad_hyper_lr_is_refused_before_anything_changes(value, error, match):
    model, hyper, criterion, optimizer = parts()
    hyper["log_wd"].requires_grad_(True)
    with pytest.raises(error, match=match) as info:
        T1T2(hyper, value, 1, model, optimizer, TRAIN, VAL, criterion)
    assert "hyper_lr" in str(info.value)
    assert hyper["log_wd"].requires_grad  # untouched: the check ran first
    hopt = build()
    with pytest.raises(error, match=match):
        hopt.hyper_lr = value  # assignment is checked too
    assert hopt.hyper_lr == 0.1


def test_hyper_lr_scalars_and_tensors_as_upstream_allows():
    for value in (0, 0.5, np.float32(0.25), torch.tensor(0.5), torch.tensor([0.5])):
        assert isinstance(build(hyper_lr=value).hyper_lr, float)
    per_coordinate = torch.tensor([0.0, 0.1, 1.0], dtype=DT)
    hopt = build(hyper_lr=per_coordinate)
    g = hopt.hyper_grad_on_batches(TRAIN[0], VAL[0])[0]
    hopt.hyper_step()
    assert torch.allclose(hopt.hyperparams["log_wd"], -per_coordinate * g, rtol=1e-12)
    assert hopt.hyperparams["log_wd"][0] == 0  # a zero rate leaves its coordinate


@pytest.mark.parametrize(
    "cls,kw,name",
    [
        (T1T2, {"inner_steps": 0}, "inner_steps"),
        (T1T2, {"inner_steps": 1.5}, "inner_steps"),
        (Neumann, {"num_terms": 0}, "num_terms"),
        (HOAG, {"epsilon": -1e-8}, "epsilon"),
        (HOAG, {"cg_max_iter": 0}, "cg_max_iter"),
        (DRMAD, {"T": 0}, "T"),
        (DRMAD, {"weight_decay": -1.0}, "weight_decay"),
    ],
)
def test_bad_method_arguments_name_themselves(cls, kw, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        build(cls, **kw)


def test_bad_set_up():
    model, hyper, criterion, optimizer = parts()
    with pytest.raises(ArgumentTypeError, match="optimizer"):
        T1T2(hyper, 0.1, 1, model, "sgd", TRAIN, VAL, criterion)
    with pytest.raises(ArgumentTypeError, match="criterion"):
        T1T2(hyper, 0.1, 1, model, optimizer, TRAIN, VAL, 3)
    with pytest.raises(ArgumentTypeError, match="val_loader"):
        T1T2(hyper, 0.1, 1, model, optimizer, TRAIN, 5, criterion)
    with pytest.raises(ArgumentTypeError, match="hyperparams"):
        T1T2({}, 0.1, 1, model, optimizer, TRAIN, VAL, criterion)
    with pytest.raises(ValueError, match="model parameter 'weight'"):
        T1T2({"w": model.weight}, 0.1, 1, model, optimizer, TRAIN, VAL, criterion)


# ---------------------------------------------------------------- stale captured values


def _notebook_criterion(model, lambd):
    class Loss(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.lambd = lambd

        def forward(self, pred, target):
            return ((pred - target) ** 2).mean() + self.lambd * (self.model.weight**2).sum()

    return Loss()


LAMBD = None  # a notebook-style global, set by the test below


def _global_criterion(pred, target):
    return ((pred - target) ** 2).mean() + LAMBD.sum()


@pytest.mark.parametrize("where", ["module", "closure", "global", "partial", "dict", "model"])
def test_a_value_computed_once_from_a_hyperparameter_is_refused(where):
    global LAMBD
    model, _, _, optimizer = parts()
    theta = torch.zeros(1, dtype=DT, requires_grad=True)
    lambd = theta.exp()
    mse = nn.MSELoss()

    def closure(pred, target):
        return mse(pred, target) + lambd.sum()

    def with_weights(pred, target, weights):
        return mse(pred, target) + weights["wd"].sum()

    criterion, path = {
        "module": (_notebook_criterion(model, lambd), "criterion.lambd"),
        "closure": (closure, "criterion:lambd"),
        "global": (_global_criterion, "LAMBD"),
        "partial": (functools.partial(with_weights, weights={"wd": 2 * lambd}), "['wd']"),
        "dict": (_notebook_criterion(model, {"a": [lambd]}), "criterion.lambd['a'][0]"),
        "model": (mse, "model.scale"),
    }[where]
    LAMBD = lambd
    if where == "model":
        model.scale = lambd  # a plain attribute of the model
    with pytest.raises(ValueError, match="inside the criterion's forward") as info:
        Neumann({"theta": theta}, 0.1, 1, model, optimizer, TRAIN, VAL, criterion)
    assert path in str(info.value) and "hyperparams['theta']" in str(info.value)
    assert "grad_fn=ExpBackward0" in str(info.value) or "MulBackward0" in str(info.value)
    assert theta.requires_grad


def test_values_computed_in_forward_or_from_other_tensors_are_accepted():
    model, _, _, optimizer = parts()
    theta = torch.zeros(1, dtype=DT, requires_grad=True)
    unrelated = torch.ones(1, dtype=DT, requires_grad=True) * 3  # non-leaf, not from theta
    scale = model.weight.sum() * 0  # non-leaf from a model parameter

    def criterion(pred, target):
        return ((pred - target) ** 2).mean() * unrelated.detach() * (1 + scale.detach()) + (
            theta.exp() * (model.weight**2).sum()
        )

    hopt = T1T2({"theta": theta}, 0.1, 1, model, optimizer, TRAIN, VAL, criterion)
    hopt.hyper_step()
    assert float(theta) != 0.0 and math.isfinite(float(theta))


# ---------------------------------------------------------------- non-finite values


def test_drmad_nan_training_loss_is_named_and_everything_is_restored():
    model, hyper, criterion, optimizer = parts(lr=0.05, momentum=0.9)
    calls = {"n": 0}

    def flaky(pred, target):
        calls["n"] += 1
        value = criterion(pred, target)
        return value * math.nan if calls["n"] == 4 else value

    hopt = DRMAD(hyper, 0.1, 1, model, optimizer, TRAIN, VAL, flaky, T=5)
    for _ in range(2):  # momentum buffers exist before the failing hyper-step
        optimizer.zero_grad()
        criterion(model(X), Y).backward()
        optimizer.step()
    calls["n"] = 0
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    h0 = hyper["log_wd"].clone()
    with pytest.raises(hg.NonFiniteHypergradientError) as info:
        hopt.hyper_step()
    message = str(info.value)
    assert "training loss of DRMAD's training step 4 of 5" in message
    assert "restored" in message and "not finite" in message
    assert info.value.quantity.startswith("the training loss of DRMAD's training step 4")
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for p, b in zip(model.parameters(), buffers):
        assert torch.equal(optimizer.state[p]["momentum_buffer"], b)
        assert p.grad is None
    assert torch.equal(hyper["log_wd"], h0) and hopt.history == []
    assert hopt.w0 is None and hopt.wT is None


def test_drmad_diverging_weights_are_named():
    model, hyper, criterion, optimizer = parts(lr=math.inf)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    hopt = DRMAD(hyper, 0.1, 1, model, optimizer, TRAIN, VAL, criterion, T=3)
    with pytest.raises(hg.NonFiniteHypergradientError, match="After DRMAD's training step 1 of 3"):
        hopt.hyper_step()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("cls", [T1T2, Neumann, HOAG])
def test_nan_validation_batch_raises_and_updates_nothing(cls):
    model, hyper, criterion, optimizer = parts()
    bad_val = [(X[12:], torch.full_like(Y[12:], math.nan))]
    hopt = cls(hyper, 0.1, 1, model, optimizer, TRAIN, bad_val, criterion)
    with pytest.raises(hg.NonFiniteHypergradientError) as info:
        hopt.hyper_step()
    assert f"{cls.__name__}'s hyper-step after step 0" in str(info.value)
    assert "outer_loss" in str(info.value) and "params['weight']" in str(info.value)
    assert torch.equal(hyper["log_wd"], torch.zeros(3, dtype=DT))
    assert not hyper["log_wd"].requires_grad


def test_a_hook_that_returns_garbage_is_caught():
    class Wrong(T1T2):
        def hyper_grad(self, train_loss, val_loss):
            return self.answer

    hopt = build(Wrong)
    hopt.answer = []
    with pytest.raises(ValueError, match="0 tensor"):
        hopt.hyper_step()
    hopt.answer = [torch.ones(2, dtype=DT)]
    with pytest.raises(ValueError, match="shape"):
        hopt.hyper_step()
    hopt.answer = [torch.tensor([1.0, math.nan, 0.0], dtype=DT)]
    with pytest.raises(hg.NonFiniteHypergradientError, match="Nothing was updated"):
        hopt.hyper_step()
    assert torch.equal(hopt.hyperparams["log_wd"], torch.zeros(3, dtype=DT))


def test_hook_inputs_are_checked():
    hopt = build(Neumann)
    loss = hopt.criterion(hopt.model(X), Y)
    with pytest.raises(ValueError, match="requires_grad_"):
        hopt.hyper_grad(loss, loss)  # built while the hyperparameters did not require grad
    with pytest.raises(ArgumentTypeError, match="val_loss"):
        hopt._hyperparams_requires_grad_(True)
        hopt.hyper_grad(loss, torch.ones(3, dtype=DT))
