"""docs/architecture.md's solver contract said a solver never returns an iterate worse than
``x = 0``; a fixed approximation (``Identity``, ``Nystrom``) can, and what the page now says
holds: ``hg.implicit`` reports the true residual and warns once it exceeds ``||b||``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

A = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.5]], dtype=torch.float64)
B = torch.tensor([[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]], dtype=torch.float64)
W_VAL = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
H = torch.tensor([0.3, -0.7], dtype=torch.float64)
W = torch.linalg.solve(A, B @ H)
RHS = W - W_VAL  # grad_w g


def f(w, h):
    return 0.5 * w @ A @ w - w @ (B @ h)


def g(w, h):
    return 0.5 * ((w - W_VAL) ** 2).sum()


@pytest.mark.parametrize("scale,warns", [(0.3, False), (2.0, True)])
def test_identity_residual_is_exact_and_warned_beyond_b(scale, warns):
    x = scale * RHS
    true = float((RHS - A @ x).norm() / RHS.norm())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", hg.HypergradientWarning)
        hyper, info = hg.implicit(f, g, W, H, solver=hg.Identity(scale), return_info=True)
    torch.testing.assert_close(hyper, B.T @ x, rtol=1e-12, atol=1e-14)
    assert info.relative_residual == pytest.approx(true, rel=1e-12)
    assert (true > 1) is warns
    warned = [w for w in caught if "worse than x = 0" in str(w.message)]
    assert bool(warned) is warns


def test_full_rank_nystrom_sketch_is_the_operator():
    """``NystromApproximation.full_rank`` (now documented): a rank of at least the dimension
    is clamped to it, and the approximation is the operator itself."""
    gen = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=gen))[0]
    psd = q @ torch.diag(torch.tensor([0.1, 0.3, 1.0, 2.0, 4.0, 9.0], dtype=torch.float64)) @ q.T
    op = hg.MatrixOperator(psd)
    full = hg.nystrom_sketch(op, 10, generator=gen)
    assert full.full_rank and full.U.shape == (6, 6) and not full.indefinite
    torch.testing.assert_close(full.U @ torch.diag(full.eigenvalues) @ full.U.T, psd)
    b = torch.arange(1.0, 7.0, dtype=torch.float64)
    shifted = psd + 0.5 * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(full.solve(b, 0.5), torch.linalg.solve(shifted, b))
    partial = hg.nystrom_sketch(op, 3, generator=gen)
    assert not partial.full_rank and partial.U.shape == (6, 3)
