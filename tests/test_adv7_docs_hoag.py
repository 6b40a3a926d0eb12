"""HOAG's tolerance is ``max(tol * decay**k, min_tol)``: ``HOAG(tol=1e-12)`` solves to the
default ``min_tol`` 1e-10, not to 1e-12, which the docstring did not say (the test suite
itself writes ``HOAG(tol=1e-12)`` in several places). Documented now; pinned here on a
quadratic where the solves' relative residuals follow the schedule.
"""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg

N = 30
Q = torch.linalg.qr(
    torch.randn(N, N, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
)[0]
A = Q @ torch.diag(torch.logspace(0, 4, N, dtype=torch.float64)) @ Q.T
W_VAL = torch.linspace(-1, 1, N, dtype=torch.float64)


def f(w, h):
    return 0.5 * w @ A @ w - h @ w


def g(w, h):
    return 0.5 * ((w - W_VAL) ** 2).sum()


def _problem() -> hg.Problem:
    h = torch.ones(N, dtype=torch.float64)
    return hg.Problem(f, g, torch.linalg.solve(A, h), h)


@pytest.mark.parametrize("min_tol,expected", [(1e-10, 1e-10), (1e-13, 1e-12)])
def test_tol_below_min_tol_is_raised_to_it(min_tol, expected):
    method = hg.HOAG(maxiter=500, tol=1e-12, decay=1.0, min_tol=min_tol)
    assert method.current_tol() == expected
    problem = _problem()
    hyper, info = method(problem)
    assert info.relative_residual <= expected
    exact = torch.linalg.solve(A, problem.params - W_VAL)  # dg/dh = A^{-1} grad_w g
    error = float((hyper - exact).norm() / exact.norm())
    assert error <= 1e4 * expected  # condition number 1e4 times the relative residual
