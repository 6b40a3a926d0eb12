"""``Neumann(tol=...)`` with a warm start stops at ``||b - A x|| <= tol * ||b||``, as its
docstring says (and as CG does), not at ``tol`` times the warm start's own residual.

With ``A = diag(1..10)``, ``alpha = 0.1`` and a warm start at relative residual 5.2e-3,
``tol=1e-2`` spent 23 products to reach 5e-5 (CG: one product, the start meets it), and
``tol=1e-4``/``1e-6`` 67/111 products against 74/117 cold: the warm start saved nothing.
Reference: the partial sums ``x0 + alpha sum_{j<k} (I - alpha A)^j (b - A x0)`` in closed
form, ``k`` the first count whose residual ``||(I - alpha A)^k (b - A x0)||`` meets
``tol ||b||``.
"""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg

F64 = torch.float64


def _system():
    A = torch.diag(torch.linspace(1.0, 10.0, 20, dtype=F64))
    b = torch.ones(20, dtype=F64)
    g = torch.Generator().manual_seed(0)
    x0 = torch.linalg.solve(A, b) + 1e-3 * torch.randn(20, generator=g, dtype=F64)
    return A, b, x0


@pytest.mark.parametrize("tol", [1e-2, 1e-4, 1e-6])
def test_a_warm_started_series_stops_at_tol_times_b(tol):
    A, b, x0 = _system()
    alpha = 0.1
    M = torch.eye(20, dtype=F64) - alpha * A
    r0 = b - A @ x0
    k, v, total = 0, r0.clone(), torch.zeros(20, dtype=F64)
    while float(v.norm()) > tol * float(b.norm()):
        total, v, k = total + v, M @ v, k + 1
    sol = hg.Neumann(maxiter=500, alpha=alpha, tol=tol).solve(hg.MatrixOperator(A), b, x0)
    assert sol.status == hg.Status.CONVERGED
    assert sol.num_hvps == k + 1  # the warm start's product and k terms (was 23/67/111)
    assert torch.allclose(sol.value, x0 + alpha * total, rtol=1e-12, atol=1e-14)
    assert sol.residual_norm == pytest.approx(float(v.norm()), rel=1e-9)
    assert sol.residual_norm <= tol * float(b.norm())


def test_a_warm_start_that_meets_tol_is_returned_after_one_product():
    A, b, x0 = _system()
    sol = hg.Neumann(maxiter=500, alpha=0.1, tol=1e-2).solve(hg.MatrixOperator(A), b, x0)
    assert sol.num_hvps == 1 and sol.iterations == 0 and torch.equal(sol.value, x0)
    assert sol.status == hg.Status.CONVERGED
    assert sol.residual_norm == pytest.approx(float((b - A @ x0).norm()), rel=1e-12)


def test_cold_and_fixed_budget_series_are_unchanged():
    A, b, x0 = _system()
    cold = hg.Neumann(maxiter=500, alpha=0.1, tol=1e-4).solve(hg.MatrixOperator(A), b)
    assert cold.num_hvps == 74 and cold.residual_norm <= 1e-4 * float(b.norm())
    fixed = hg.Neumann(maxiter=7, alpha=0.1).solve(hg.MatrixOperator(A), b, x0)
    assert fixed.status == hg.Status.FIXED_BUDGET and fixed.num_hvps == 8
