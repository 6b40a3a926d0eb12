"""``Exact`` tells where the point is: the smallest eigenvalue and the number of negative
ones (the iterative solvers report an indefinite Hessian as ``negative_curvature``; the
dense solve is exact either way and said nothing). Reference: ``torch.linalg.eigvalsh``."""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg

F64 = torch.float64


@pytest.mark.parametrize("shift", [-2.5, 0.5])
def test_exact_reports_the_spectrum_it_solved_with(shift):
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=F64))
    evals = torch.linspace(-1.0, 3.0, 6, dtype=F64) + shift + 1.0  # shift -2.5: 4 below 0
    A = Q @ torch.diag(evals) @ Q.T
    b = torch.randn(6, generator=g, dtype=F64)
    sol = hg.Exact().solve(hg.MatrixOperator(A), b)
    assert sol.status == hg.Status.EXACT
    assert torch.allclose(A @ sol.value, b, atol=1e-12)
    want = torch.linalg.eigvalsh(A)
    assert sol.stats["lambda_min"] == pytest.approx(float(want[0]), abs=1e-12)
    assert sol.stats["negative_eigenvalues"] == int((want < 0).sum())
    assert sol.stats["negative_eigenvalues"] == (4 if shift < 0 else 0)


def test_a_zero_eigenvalue_is_not_counted_negative():
    A = torch.diag(torch.tensor([0.0, 1.0, 2.0], dtype=F64))
    sol = hg.Exact().solve(hg.MatrixOperator(A), torch.tensor([0.0, 1.0, 1.0], dtype=F64))
    assert sol.stats["negative_eigenvalues"] == 0 and sol.stats["lambda_min"] == 0.0
