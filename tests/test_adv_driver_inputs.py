"""A prebuilt ``HyperParameters`` whose optimizer-setting links contradict the other
arguments: refused at construction, before the inner optimizer's settings are written.

Before the fix, ``optimizer_hparams`` was ignored silently when ``hparams`` was a
``HyperParameters``, and an implicit method (which cannot tune an optimizer setting) was
accepted with its links: the learning rate was overwritten by a hyperparameter whose
hypergradient is always zero.
"""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg
from hypergradient.hyperoptimizer import HyperParameters


def make(method, **kw):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    hp = HyperParameters(
        {"lr": hg.Positive(0.3)},
        device=torch.device("cpu"),
        inner_optimizer=inner,
        links={"lr": "lr"},
    )

    def build():
        return hg.HyperOptimizer(
            model,
            hp,
            inner_optimizer=inner,
            outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            train_loss=lambda m, h, b: (m(b) ** 2).mean(),
            val_loss=lambda m, h, b: (m(b) ** 2).mean(),
            val_data=torch.randn(8, 3),
            method=method,
            **kw,
        )

    return inner, build


@pytest.mark.parametrize(
    "method, kw, match",
    [
        (hg.IFT(), {}, "IFT differentiates at the current parameters"),
        (hg.T1T2(), {}, "T1T2 differentiates at the current parameters"),
        (hg.Unrolled(), {"optimizer_hparams": {"momentum": "lr"}}, "differs from the links"),
    ],
    ids=["ift", "t1t2", "other-links"],
)
def test_contradicting_links_are_refused_before_any_setting_is_written(method, kw, match):
    inner, build = make(method, **kw)
    with pytest.raises(ValueError, match=match):
        build()
    assert inner.param_groups[0]["lr"] == 0.1 and inner.param_groups[0]["momentum"] == 0.5


def test_the_same_links_or_none_are_accepted_and_written():
    for kw in ({}, {"optimizer_hparams": {"lr": "lr"}}):
        inner, build = make(hg.Unrolled(), **kw)
        build()
        assert inner.param_groups[0]["lr"] == float(torch.tensor(0.3).log().exp())


F32_MAX = torch.finfo(torch.float32).max


@pytest.mark.parametrize(
    "make, what",
    [
        (lambda: hg.Positive(torch.tensor([1.0, F32_MAX])), "reached inf"),
        (lambda: hg.Interval(0.5, 0.0, 1e308), "is not finite"),
        (lambda: hg.Interval(torch.tensor([0.0]), -1e38, 3e38), "is not finite"),
    ],
    ids=["positive-float32-max", "interval-tiny-ratio", "interval-overflowing-width"],
)
def test_a_constraint_refuses_a_value_its_dtype_cannot_hold(make, what):
    """Before: built with raw = inf or -inf and value inf or NaN; the error came later, from
    the HyperOptimizer, as 'Initially, ... start inside its domain' (it was inside)."""
    with pytest.raises(ValueError, match=f"cannot hold .* in torch.float32: .*{what}"):
        make()


def test_the_same_values_in_float64_are_held_exactly():
    big = torch.tensor([1.0, F32_MAX], dtype=torch.float64)
    assert torch.allclose(hg.Positive(big).value, big, rtol=1e-13, atol=0)
    c = hg.Interval(torch.tensor([0.0, 1e30], dtype=torch.float64), -1e38, 3e38)
    assert torch.allclose(c.value, torch.tensor([0.0, 1e30], dtype=torch.float64), atol=1e23)
