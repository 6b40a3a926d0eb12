"""Fixed-budget solvers on an indefinite Hessian say when their answer is worse than 0.

At an exact saddle point (gradient 0, so the stationarity check is silent) of a quadratic
with one negative eigenvalue, ``hg.Nystrom(rank=3)`` sketches only positive curvature and
returned a hypergradient 1.5x the exact one's norm away from it, with relative residual
``||b - H x|| / ||b|| = 2.3`` (worse than ``x = 0``), status ``fixed_budget`` and no warning.
CG, NystromPCG, RecycledCG and Neumann already reported the negative curvature. Now a
fixed-budget answer worse than ``x = 0`` warns; a usable one (residual < ||b||) does not.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

DT = torch.float64
N = 6


def _quadratic(eigenvalues):
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=DT))
    A = (Q * torch.tensor(eigenvalues, dtype=DT)) @ Q.T
    c = torch.randn(N, generator=g, dtype=DT)

    def f(w, h):
        return 0.5 * w @ A @ w - (c + h) @ w

    def g_(w, h):
        return ((w - 1.0) ** 2).sum()

    w = torch.linalg.solve(A, c)  # stationary: the gradient is exactly 0
    exact = torch.linalg.solve(A, 2 * (w - 1.0))  # d grad_w f / dh = -I
    return f, g_, w, exact


SADDLE = [3.0, 2.0, 1.0, 0.5, 0.3, -0.05]
MINIMUM = [3.0, 2.0, 1.0, 0.5, 0.3, 0.05]


def _run(eigenvalues, solver):
    f, g, w, exact = _quadratic(eigenvalues)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out, info = hg.implicit(f, g, w, torch.zeros(N, dtype=DT), solver=solver, return_info=True)
    texts = [str(r.message) for r in rec if issubclass(r.category, hg.HypergradientWarning)]
    return out, info, exact, texts


def test_nystrom_at_a_saddle_warns_worse_than_zero():
    out, info, exact, texts = _run(SADDLE, hg.Nystrom(rank=3, seed=0))
    assert info.status == "fixed_budget"
    assert info.relative_residual > 1.0  # the measured answer: worse than x = 0
    assert float((out - exact).norm() / exact.norm()) > 0.5
    assert any("worse than x = 0" in t for t in texts), texts


@pytest.mark.parametrize("solver", [hg.CG(), hg.NystromPCG(rank=3, seed=0), hg.RecycledCG()])
def test_cg_family_at_a_saddle_reports_negative_curvature(solver):
    _, info, _, texts = _run(SADDLE, solver)
    assert info.status == "negative_curvature"
    assert any("non-positive curvature" in t for t in texts)


def test_usable_fixed_budget_answer_does_not_warn():
    # a minimum: Nystrom at full rank is exact up to rho's bias, residual well below ||b||
    out, info, exact, texts = _run(MINIMUM, hg.Nystrom(rank=N, rho=1e-10, seed=0))
    assert info.relative_residual < 1e-6
    assert float((out - exact).norm() / exact.norm()) < 1e-6
    assert texts == []
