"""Constraints: transforms against closed forms, domains, and bad input refused through
``_vocab`` with the argument named (defect families 6 and 10)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import hypergradient as hg
from hypergradient._vocab import ArgumentTypeError
from hypergradient.constraints import HyperparameterDomainError, Unconstrained

DT = torch.float64


def test_transforms_and_inverses_match_closed_forms():
    v = torch.tensor([1e-3, 0.5, 7.0], dtype=DT)
    exp = hg.Positive(v)
    assert torch.allclose(exp.raw, torch.log(v), rtol=0, atol=1e-15)
    soft = hg.Positive(v, transform="softplus")
    assert torch.allclose(soft.raw, torch.log(torch.expm1(v)), rtol=1e-12)
    assert torch.allclose(soft.value, v, rtol=1e-12)
    iv = hg.Interval(torch.tensor([0.2, 0.9], dtype=DT), low=-1.0, high=1.0)
    u = (torch.tensor([0.2, 0.9], dtype=DT) + 1) / 2
    assert torch.allclose(iv.raw, torch.log(u / (1 - u)), rtol=1e-12)
    assert torch.allclose(iv.value, torch.tensor([0.2, 0.9], dtype=DT), rtol=1e-12)
    assert exp.raw.is_leaf and exp.raw.requires_grad and exp.raw.dtype == DT


def test_a_plain_tensor_is_unconstrained_and_kept_by_reference():
    t = torch.tensor([0.1, 0.2], dtype=DT, requires_grad=True)
    c = Unconstrained(t)
    assert c.raw is t and torch.equal(c.value, t.detach()) and c.transform(t) is t
    assert c.domain_error(torch.tensor([1.0, -5.0])) is None  # any finite value
    assert "not finite" in c.domain_error(torch.tensor([1.0, math.inf]))
    assert Unconstrained(0.5).raw.dtype == torch.get_default_dtype()
    with pytest.raises(ArgumentTypeError, match="floating point"):
        Unconstrained(torch.tensor([1, 2]))


@pytest.mark.parametrize(
    "constraint, value, why",
    [
        (hg.Positive(1.0), torch.tensor([0.0, 1.0]), "reached 0"),
        (hg.Positive(1.0), torch.tensor([math.inf]), "reached inf"),
        (hg.Positive(1.0), torch.tensor([math.nan]), "not finite"),
        (hg.Interval(0.5), torch.tensor([1.0]), "saturated"),
        (hg.Interval(0.5, low=-2, high=3), torch.tensor([-2.0]), "saturated"),
        (hg.Interval(0.5), torch.tensor([math.nan]), "not finite"),
    ],
)
def test_domain_errors_name_what_left_the_domain(constraint, value, why):
    assert why in constraint.domain_error(value)
    inside = constraint.value
    assert constraint.domain_error(inside) is None


def test_the_transforms_do_reach_the_bounds_in_floating_point():
    """Why the domain checks exist: exp and sigmoid round to the bounds."""
    p = hg.Positive(torch.tensor(0.01, dtype=DT))
    assert float(p.transform(torch.tensor(-800.0, dtype=DT))) == 0.0
    assert math.isinf(float(p.transform(torch.tensor(800.0, dtype=DT))))
    iv = hg.Interval(torch.tensor(0.5, dtype=DT))
    assert float(iv.transform(torch.tensor(40.0, dtype=DT))) == 1.0


def test_domain_error_is_a_nonfinite_hypergradient_error():
    assert issubclass(HyperparameterDomainError, hg.NonFiniteHypergradientError)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: hg.Positive("a"), ArgumentTypeError, "`value` must be real numbers"),
        (lambda: hg.Positive(None), ArgumentTypeError, "`value` must be real numbers"),
        (lambda: hg.Positive(1 + 2j), ArgumentTypeError, "`value` must be real numbers"),
        (lambda: hg.Positive(torch.tensor([1 + 1j])), ArgumentTypeError, "complex"),
        (lambda: hg.Positive(True), ArgumentTypeError, "real numbers"),
        (lambda: hg.Positive(["a", "b"]), ArgumentTypeError, "real numbers"),
        (lambda: hg.Positive(math.nan), ValueError, "must be finite"),
        (lambda: hg.Positive(-1.0), ValueError, "every initial value > 0"),
        (lambda: hg.Positive(1.0, transform="log"), ValueError, "`transform` must be one of"),
        (lambda: hg.Interval(0.5, low="a"), ArgumentTypeError, "`low` must be a real number"),
        (lambda: hg.Interval(0.5, high=None), ArgumentTypeError, "`high` must be a real"),
        (lambda: hg.Interval(0.5, low=math.nan), ValueError, "`low` must be a finite"),
        (lambda: hg.Interval(0.5, low=1.0, high=0.0), ValueError, "low < high"),
        (lambda: hg.Interval(1.5), ValueError, r"inside \(0.0, 1.0\)"),
        (lambda: hg.Interval("x"), ArgumentTypeError, "real numbers"),
    ],
)
def test_bad_input_is_refused_with_the_argument_named(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_numbers_of_every_kind_are_accepted():
    for value in (0.5, 1, np.float32(0.5), np.int64(2), [0.1, 0.2], np.array([0.3]), (1, 2)):
        assert bool((hg.Positive(value).value > 0).all())
    assert hg.Interval(0.5, low=np.float64(0.0), high=np.int64(1)).high == 1.0
    # integers become the default dtype, tensors keep theirs and their device
    assert hg.Positive(torch.tensor([1, 2])).raw.dtype == torch.get_default_dtype()
    assert hg.Positive(torch.tensor([1.0], dtype=DT)).raw.dtype == DT
