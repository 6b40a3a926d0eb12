"""The finiteness test every check goes through: a sum probe, confirmed by isfinite."""

from __future__ import annotations

import math

import pytest
import torch

from hypergradient import _vocab
from hypergradient.methods._checks import all_finite

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_single_nan_or_inf_entry_is_found(dtype, bad):
    for n in (1, 7, 100_003):
        t = torch.randn(n).to(dtype)
        assert _vocab.is_finite(t)
        t[n // 2] = bad
        assert not _vocab.is_finite(t)
        assert not all_finite([torch.ones(3), None, t])


@pytest.mark.parametrize("dtype", DTYPES)
def test_finite_entries_whose_sum_overflows_are_finite(dtype):
    big = torch.finfo(dtype).max
    t = torch.full((64,), big, dtype=dtype)
    assert not torch.isfinite(_vocab.finite_probe(t)) or dtype in (torch.float16, torch.bfloat16)
    assert _vocab.is_finite(t)
    assert all_finite([t, -t])


def test_opposite_infinities_cancel_to_nan_and_are_caught():
    t = torch.tensor([math.inf, -math.inf, 1.0])
    assert not _vocab.is_finite(t)
    assert not all_finite([t])


def test_empty_integer_and_complex_tensors():
    assert _vocab.is_finite(torch.empty(0))
    assert _vocab.is_finite(torch.arange(5))
    assert all_finite([torch.empty(0), None])
    assert all_finite([])
    z = torch.tensor([1 + 2j, 3 - 1j])
    assert _vocab.is_finite(z)
    z[1] = complex(0.0, math.nan)
    assert not _vocab.is_finite(z)


def test_the_probe_is_a_float32_scalar_on_the_tensor_device():
    for dtype in DTYPES:
        p = _vocab.finite_probe(torch.ones(4, 4, dtype=dtype))
        assert p.shape == () and p.dtype == torch.float32
        assert float(p) == 16.0
