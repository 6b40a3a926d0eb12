"""A constraint that cannot hold its initial value names the fixes that apply (adversarial
probe, round 6). The message always said "Pass the value in float64 ... or narrower
bounds": for a float64 value that was no fix, and a ``Positive`` has no bounds."""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg

F64 = torch.float64


@pytest.mark.parametrize(
    ("make", "fixes"),
    [  # sigmoid(raw) rounds to 0: a float64 subnormal next to the bound
        (
            lambda: hg.Interval(torch.tensor(5e-324, dtype=F64)),
            "Pass a value farther from the domain's edge, or narrower bounds.",
        ),  # (high - low) overflows: the value is not the problem
        (
            lambda: hg.Interval(torch.tensor(0.0, dtype=F64), -1e308, 1.7e308),
            "Pass narrower bounds.",
        ),
        (
            lambda: hg.Interval(torch.tensor(0.0), -3e38, 3e38),
            "Pass the value in float64 (torch.tensor(..., dtype=torch.float64)), or narrower "
            "bounds.",
        ),
    ],
)
def test_the_message_names_the_fixes_that_apply(make, fixes):
    with pytest.raises(ValueError, match="cannot hold") as err:
        make()
    assert str(err.value).endswith(fixes)


def test_a_positive_that_overflows_in_float32_is_told_float64_and_no_bounds():
    f32_max = torch.finfo(torch.float32).max  # exp(log(max)) rounds up to inf
    with pytest.raises(ValueError, match="cannot hold") as err:
        hg.Positive(torch.tensor([1.0, f32_max]))
    assert str(err.value).endswith(
        "Pass a value farther from the domain's edge, or the value in float64 "
        "(torch.tensor(..., dtype=torch.float64))."
    )
