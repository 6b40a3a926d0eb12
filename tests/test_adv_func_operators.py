"""Operators refuse a bad vector before any product (adversarial review).

``LinearOperator.matvec`` and the graph operators' ``mixed`` took any object: a vector of
the wrong length raised torch's ``RuntimeError`` from ``split_with_sizes`` after counting a
product, a ``(1, n)`` batch was answered as if it were 1-D, an integer vector was
silently converted, a list raised ``AttributeError``. Now each raises ``ValueError`` /
``ArgumentTypeError`` naming ``v`` and counts nothing; good vectors give the dense answer.
"""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg
from hypergradient._vocab import ArgumentTypeError

DT = torch.float64


def _f(p, h):
    return (h * p**4).sum() + (p[0] * p[1]) ** 2 + (p**2).sum()


def _operators():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(4, generator=g, dtype=DT)
    h = torch.rand(4, generator=g, dtype=DT)
    A = torch.autograd.functional.hessian(lambda q: _f(q, h), p)
    M = torch.autograd.functional.jacobian(
        lambda hh: torch.autograd.functional.jacobian(lambda q: _f(q, hh), p, create_graph=True),
        h,
    )  # M[i, j] = d grad_i / d h_j
    ops = {
        "double": hg.HessianOperator(_f, p, h, mode="double"),
        "first_order": hg.HessianOperator(_f, p, h, mode="first_order"),
        "matrix": hg.MatrixOperator(A),
    }
    ops["damped"] = hg.DampedOperator(ops["double"], 0.5)
    return ops, A, M


BAD = [
    (torch.ones(5, dtype=DT), ValueError, "1-D tensor of 4"),
    (torch.ones(2, 2, dtype=DT), ValueError, r"shape \(2, 2\)"),
    (torch.ones(1, 4, dtype=DT), ValueError, r"shape \(1, 4\)"),
    (torch.ones(4, dtype=torch.int64), ArgumentTypeError, "floating-point"),
    ([1.0, 2.0, 3.0, 4.0], ArgumentTypeError, "got list"),
]


@pytest.mark.parametrize("name", ["double", "first_order", "matrix", "damped"])
def test_matvec_refuses_bad_vectors_and_counts_nothing(name):
    ops, A, _ = _operators()
    op = ops[name]
    for v, error, match in BAD:
        with pytest.raises(error, match=match):
            op.matvec(v)
        assert op.num_matvecs == 0
    v = torch.linspace(-1, 1, 4, dtype=DT)
    tol = 1e-12 if name != "first_order" else 1e-7
    shift = 0.5 if name == "damped" else 0.0
    assert torch.allclose(op.matvec(v), A @ v + shift * v, rtol=tol, atol=tol)
    assert op.num_matvecs == 1


@pytest.mark.parametrize("name", ["double", "first_order"])
def test_mixed_refuses_bad_vectors(name):
    ops, _, M = _operators()
    op = ops[name]
    for v, error, match in BAD:
        with pytest.raises(error, match=match):
            op.mixed(v)
    v = torch.linspace(-1, 1, 4, dtype=DT)
    tol = 1e-12 if name == "double" else 1e-7
    assert torch.allclose(op.mixed(v)[0], M.T @ v, rtol=tol, atol=tol)


def test_matmat_refuses_an_integer_batch():
    ops, A, _ = _operators()
    with pytest.raises(ArgumentTypeError, match="floating-point"):
        ops["double"].matmat(torch.ones(2, 4, dtype=torch.int64))
    assert ops["double"].num_matvecs == 0
    V = torch.eye(4, dtype=DT)
    assert torch.allclose(ops["double"].matmat(V), A, atol=1e-12)


@pytest.mark.parametrize("mode", ["auto", "double", "double_math", "first_order"])
def test_mixed_of_an_operator_without_hyperparameters_is_empty_in_every_mode(mode):
    # was torch's "`inputs` argument to `grad()` cannot be empty" in the double modes
    p = torch.linspace(-1, 1, 3, dtype=DT)
    op = hg.HessianOperator(lambda q, h: (q**4).sum(), p, mode=mode)
    assert op.mixed(torch.ones(3, dtype=DT)) == []
    assert torch.allclose(op.matvec(torch.ones(3, dtype=DT)), 12 * p**2, atol=1e-7)
    if mode != "first_order":
        fp = hg.FixedPointOperator(lambda q, h: 0.5 * q, p, mode=mode)
        assert fp.mixed(torch.ones(3, dtype=DT)) == []
        assert torch.equal(fp.matvec(torch.ones(3, dtype=DT)), torch.full((3,), 0.5, dtype=DT))
