"""HyperOptimizer refuses invalid values: at construction (batch sizes, optimizer-setting
links, hyperparameters that are model parameters, hparams that are not a non-empty dict
on the model's device) and after every outer step (a Positive driven to 0 or inf, an
Interval saturated, a tuned learning rate below 0 is never written into the torch
optimizer). Defect families 6 and 10 (driver part)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hypergradient as hg
from hypergradient._vocab import ArgumentTypeError
from hypergradient.constraints import HyperparameterDomainError
from test_hyperoptimizer_support import (
    DT,
    VAL,
    Constant,
    assert_same,
    batches,
    build,
    everything,
    mlp,
    run,
    train_loss,
    val_loss,
)


@pytest.mark.parametrize(
    "name, value, error",
    [
        ("val_batch_size", 0, ValueError),
        ("val_batch_size", -1, ValueError),
        ("val_batch_size", 1.5, ArgumentTypeError),
        ("val_batch_size", "8", ArgumentTypeError),
        ("val_batch_size", True, ArgumentTypeError),
        ("train_batch_size", -1, ValueError),
        ("inner_steps", 0, ValueError),
        ("inner_steps", 2.0, ArgumentTypeError),
        ("seed", -1, ValueError),
        ("history_size", -1, ValueError),
        ("nonfinite", "ignore", ValueError),
        ("method", "IFT", ArgumentTypeError),
        ("train_loss", None, ArgumentTypeError),
        ("logger", 3, ArgumentTypeError),
    ],
)
def test_bad_arguments_are_refused_at_construction(name, value, error):
    kw = {name: value}
    if name == "train_batch_size":
        kw["train_data"] = VAL
    with pytest.raises(error, match=f"`{name}`"):
        build(**kw)


def test_numpy_integers_are_accepted_as_sizes():
    _, hopt = build(val_batch_size=np.int64(8), inner_steps=np.int32(2), seed=np.int64(3))
    assert hopt.val_sampler.batch_size == 8 and type(hopt.val_sampler.batch_size) is int
    assert hopt.inner_steps == 2 and len(hopt.val_sampler.next()[0]) == 8


def test_a_batch_size_with_an_iterable_is_refused():
    with pytest.raises(ValueError, match="val_batch_size.*batches itself"):
        build(val_data=[VAL, VAL], val_batch_size=8)


def _step_raising(hopt, model, batch, match, error=HyperparameterDomainError):
    hopt.zero_grad()
    hopt.train_loss(batch).backward()
    before = everything(model, hopt)
    with pytest.raises(error, match=match):
        hopt.step(batch)
    assert_same(before, everything(model, hopt))


def _sgd(lr):
    return lambda hp: torch.optim.SGD(hp, lr=lr)


@pytest.mark.parametrize(
    "decay, push, match",
    [
        (hg.Positive(torch.tensor(0.01, dtype=DT)), 1e4, r"hparams\['decay'\] reached 0"),
        (hg.Positive(torch.tensor(0.01, dtype=DT)), -1e4, r"hparams\['decay'\] reached inf"),
        (hg.Interval(torch.tensor(0.01, dtype=DT)), -1e4, r"'decay'\] saturated.*Interval"),
        (torch.tensor(0.01, dtype=DT), np.inf, r"hypergradient of hparams\['decay'\]"),
    ],
    ids=["positive-0", "positive-inf", "interval", "plain-inf"],
)
def test_an_outer_step_out_of_the_domain_is_rolled_back_and_raises(decay, push, match):
    model, hopt = build(
        Constant({"decay": push}), decay=decay, outer_optimizer=_sgd(1.0), inner_steps=2
    )
    steps = batches(2)
    run(hopt, steps[:1])
    error = hg.NonFiniteHypergradientError if push == np.inf else HyperparameterDomainError
    _step_raising(hopt, model, steps[1], match, error)


def test_a_tuned_learning_rate_below_zero_is_never_written_into_the_optimizer():
    model = mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.3)
    lr = torch.tensor(0.3, dtype=DT)

    def make(push):
        return hg.HyperOptimizer(
            model,
            {"decay": torch.tensor(0.01, dtype=DT), "lr": lr},
            inner_optimizer=inner,
            outer_optimizer=_sgd(1.0),
            train_loss=train_loss,
            val_loss=val_loss,
            val_data=VAL,
            method=Constant({"decay": 0.0, "lr": push}, tunes_optimizer=True),
            inner_steps=1,
            optimizer_hparams={"lr": "lr"},
        )

    hopt = make(1.0)  # lr 0.3 - 1.0 < 0
    _step_raising(hopt, model, batches(1)[0], r"hparams\['lr'\] must be >= 0 as the inner")
    assert inner.param_groups[0]["lr"] == 0.3 and float(lr) == 0.3
    hopt = make(-0.1)  # the control: a valid value is written
    run(hopt, batches(1))
    assert inner.param_groups[0]["lr"] == float(lr) == pytest.approx(0.4, abs=1e-15)


def _links(optimizer_hparams, inner="sgd", lr=None, method=None):
    model = mlp()
    if inner == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
    lr = torch.tensor(0.1, dtype=DT) if lr is None else lr
    return hg.HyperOptimizer(
        model,
        {"decay": torch.tensor(0.01, dtype=DT), "lr": lr},
        inner_optimizer=opt,
        outer_optimizer=_sgd(0.1),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=VAL,
        method=hg.Unrolled() if method is None else method,
        optimizer_hparams=optimizer_hparams,
    )


LINKS = {
    "momentum with Adam": (
        lambda: _links({"momentum": "lr"}, inner="adam"),
        "'momentum' is not a numeric setting of the inner Adam",
    ),
    "betas": (lambda: _links({"betas": "lr"}, inner="adam"), "'betas' is not a numeric"),
    "nesterov": (lambda: _links({"nesterov": "lr"}), "'nesterov' is not a numeric setting"),
    "unknown name": (lambda: _links({"lr": "nope"}), "'nope' is not in hparams"),
    "not a scalar": (
        lambda: _links({"lr": "lr"}, lr=torch.full((2,), 0.1, dtype=DT)),
        r"must be a scalar, got shape \(2,\)",
    ),
    "negative lr": (
        lambda: _links({"lr": "lr"}, lr=torch.tensor(-0.1, dtype=DT)),
        "must be >= 0 as the inner optimizer's `lr`",
    ),
    "implicit method": (
        lambda: _links({"momentum": "lr"}, method=hg.IFT()),
        "tune them with hg.Unrolled",
    ),
    "not a dict": (lambda: _links(["lr"]), "`optimizer_hparams` must be a dict"),
}


@pytest.mark.parametrize("case", list(LINKS))
def test_optimizer_setting_links_are_validated_against_the_inner_optimizer(case):
    make, match = LINKS[case]
    with pytest.raises(ValueError, match=match):
        make()


def test_no_setting_is_written_before_the_links_are_valid():
    model = mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    with pytest.raises(ValueError):
        hg.HyperOptimizer(
            model,
            {"lr": torch.tensor(0.05, dtype=DT), "m": torch.full((2,), 0.5, dtype=DT)},
            inner_optimizer=inner,
            outer_optimizer=_sgd(0.1),
            train_loss=train_loss,
            val_loss=val_loss,
            val_data=VAL,
            method=hg.Unrolled(),
            optimizer_hparams={"lr": "lr", "momentum": "m"},  # the second is not a scalar
        )
    assert inner.param_groups[0]["lr"] == 0.3 and inner.param_groups[0]["momentum"] == 0.9


def _with_hparams(hparams, model=None):
    model = mlp() if model is None else model
    return hg.HyperOptimizer(
        model,
        hparams,
        inner_optimizer=torch.optim.SGD(model[0].parameters(), lr=0.1),  # model[-1] frozen
        outer_optimizer=_sgd(0.1),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=VAL,
    )


SHARED = "is \\(or shares memory with\\) a parameter"
HPARAMS = {
    "parameter": (lambda m: {"decay": m[0].weight}, ValueError, SHARED),
    "view of a parameter": (lambda m: {"decay": m[0].weight.detach()}, ValueError, SHARED),
    "frozen parameter": (lambda m: {"decay": m[-1].weight.detach()}, ValueError, SHARED),
    "None": (lambda m: None, ArgumentTypeError, "`hparams` must be a dict"),
    "list": (lambda m: [torch.zeros(2, dtype=DT)], ArgumentTypeError, "must be a dict"),
    "empty": (lambda m: {}, ValueError, "`hparams` is empty"),
    "float": (lambda m: {"decay": 0.1}, ArgumentTypeError, "a tensor or a Constraint"),
    "device": (
        lambda m: {"decay": torch.zeros(2, dtype=DT, device="meta")},
        ValueError,
        "is on meta.*create it there",
    ),
    "twice": (
        lambda m: dict.fromkeys("ab", torch.zeros(2, dtype=DT)),
        ValueError,
        r"hparams\['b'\] is the same tensor as hparams\['a'\]",
    ),
}


@pytest.mark.parametrize("case", list(HPARAMS))
def test_hyperparameters_that_are_not_separate_leaves_on_the_device_are_refused(case):
    hparams, error, match = HPARAMS[case]
    model = mlp()
    with pytest.raises(error, match=match):
        _with_hparams(hparams(model), model)


@pytest.mark.parametrize("method", [hg.T1T2, hg.IFT])
def test_an_ascending_inner_optimizer_is_refused(method):
    # maximize=True: T1T2 applied the hypergradient of the opposite step (cosine -1 with the
    # one-step reference, silently); the implicit solvers met negative curvature every time.
    from test_hyperoptimizer_support import VAL, batches, build, mlp, train_loss, val_loss, weights

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, maximize=True)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['maximize'\] is True"):
        hg.HyperOptimizer(
            model,
            {
                "decay": hg.Positive(
                    torch.full(tuple(weights(model).shape), 1e-2, dtype=torch.float64)
                )
            },
            inner_optimizer=opt,
            outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.05),
            train_loss=train_loss,
            val_loss=val_loss,
            val_data=VAL,
            method=method(),
        )
    model, hopt = build(method(), inner_steps=1)  # set after construction: refused at the step
    hopt.inner_optimizer.param_groups[0]["maximize"] = True
    before = {k: v.clone() for k, v in hopt.hparams.items()}
    b = batches(1)[0]
    hopt.zero_grad()
    hopt.train_loss(b).backward()
    with pytest.raises(ValueError, match="maximize"):
        hopt.step(b)
    assert all(torch.equal(before[k], v) for k, v in hopt.hparams.items())
