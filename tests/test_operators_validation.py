"""Operators validate their arguments through ``_vocab``, before any evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import hypergradient as hg
from hypergradient._vocab import ArgumentTypeError

DT = torch.float64


def quad(w, h):
    return 0.5 * (h * w**2).sum()


W = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
H = torch.tensor([1.0, 2.0, 3.0], dtype=DT)


def test_matrix_operator_checks_its_matrix():
    with pytest.raises(ArgumentTypeError, match="`matrix`"):
        hg.MatrixOperator([[1.0]])
    with pytest.raises(ValueError, match="square"):
        hg.MatrixOperator(torch.ones(2, 3))
    with pytest.raises(ArgumentTypeError, match="floating"):
        hg.MatrixOperator(torch.eye(2, dtype=torch.int64))
    with pytest.raises(ArgumentTypeError, match="`symmetric`"):
        hg.MatrixOperator(torch.eye(2), symmetric="yes")
    assert hg.MatrixOperator(torch.eye(2), symmetric=False).symmetric is False


def test_symmetry_is_tested_on_the_finite_entries_and_relative_to_the_scale():
    A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=DT)
    for scale in (1e-200, 1.0, 1e200):
        assert hg.MatrixOperator(scale * A).symmetric
    B = A.clone()
    B[0, 1] += 1e-6
    assert not hg.MatrixOperator(1e200 * B).symmetric
    C = A.clone()
    C[0, 0] = math.nan
    assert hg.MatrixOperator(C).symmetric  # a NaN does not make a symmetric matrix look skew
    C[0, 1] = C[1, 0] = math.inf
    assert hg.MatrixOperator(C).symmetric
    C[1, 0] = 5.0  # a pair with one non-finite entry is not compared
    assert hg.MatrixOperator(C).symmetric
    D = A.clone()
    D[0, 1] = 7.0
    D[1, 1] = math.nan
    assert not hg.MatrixOperator(D).symmetric


def test_damped_operator_checks_its_damping():
    base = hg.MatrixOperator(torch.eye(2, dtype=DT))
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="`damping`"):
            hg.DampedOperator(base, bad)
    with pytest.raises(ArgumentTypeError, match="`damping`"):
        hg.DampedOperator(base, True)
    with pytest.raises(ArgumentTypeError, match="`base`"):
        hg.DampedOperator(torch.eye(2), 0.1)
    op = hg.DampedOperator(base, np.float32(0.5))
    assert op.damping == 0.5 and type(op.damping) is float
    assert torch.equal(op.matvec(torch.ones(2, dtype=DT)), torch.full((2,), 1.5, dtype=DT))


def test_matmat_checks_its_chunk_size():
    op = hg.MatrixOperator(torch.eye(3, dtype=DT))
    V = torch.randn(4, 3, dtype=DT)
    with pytest.raises(ValueError, match="`chunk_size`"):
        op.matmat(V, chunk_size=0)
    with pytest.raises(ArgumentTypeError, match="`chunk_size`"):
        op.matmat(V, chunk_size=True)
    assert torch.equal(op.matmat(V, chunk_size=np.int64(3)), V)
    with pytest.raises(ValueError, match="matmat"):
        op.matmat(torch.ones(3))


def test_hessian_operator_checks_arguments_before_evaluating_the_loss():
    calls = []

    def f(w, h):
        calls.append(1)
        return quad(w, h)

    with pytest.raises(ValueError, match="`batched`"):
        hg.HessianOperator(f, W, H, batched="yes")
    with pytest.raises(ArgumentTypeError, match="`hparams_by_reference`"):
        hg.HessianOperator(f, W, H, hparams_by_reference="no")
    with pytest.raises(ArgumentTypeError, match="`loss_fn`"):
        hg.HessianOperator("f", W, H)
    with pytest.raises(ValueError, match="`batched`"):
        hg.FixedPointOperator(lambda w, h: w, W, H, batched=2)
    assert calls == []


def test_hessian_operator_checks_what_the_loss_returns():
    with pytest.raises(ValueError, match="inner_loss.*scalar"):
        hg.HessianOperator(lambda w, h: w * h, W, H)
    with pytest.raises(ArgumentTypeError, match="inner_loss"):
        hg.HessianOperator(lambda w, h: 3.0, W, H)
    with pytest.raises(ArgumentTypeError, match="my_loss.*floating"):
        hg.HessianOperator(
            lambda w, h: torch.tensor(1, dtype=torch.int64), W, H, loss_name="my_loss"
        )
