"""A warm start worse than ``x = 0`` made Neumann's and FixedPoint's answers worse than a
cold solve, silently (CG drops such a start): on a 30x30 system with ``||b - A x0|| =
10.3 ||b||``, Neumann(5, alpha=0.3) ended at a relative residual of 0.501 against 0.258 cold,
FixedPoint(omega=0.5) at 0.298 against 0.184; ``Implicit(Neumann(tol=...),
warm_start=True)`` keeps its ``maxiter`` solutions as the next hyper-step's start."""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg


def _system():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.linspace(0.1, 3.0, 30, dtype=torch.float64)) @ Q.T
    b = torch.randn(30, generator=g, dtype=torch.float64)
    bad = 5 * torch.randn(30, generator=g, dtype=torch.float64)
    return A, b, bad


def _series(A, b, alpha, k):  # alpha * sum_{j<=k} (I - alpha A)^j b
    M = torch.eye(len(b), dtype=b.dtype) - alpha * A
    return sum(alpha * torch.linalg.matrix_power(M, j) @ b for j in range(k + 1))


@pytest.mark.parametrize(
    "solver",
    [
        lambda: hg.Neumann(5, alpha=0.3),
        lambda: hg.Neumann(5, alpha=0.3, tol=1e-8),
        lambda: hg.FixedPoint(maxiter=5, tol=1e-8, omega=0.5),
    ],
)
def test_a_start_worse_than_zero_is_dropped(solver):
    A, b, bad = _system()
    assert float((b - A @ bad).norm()) > 10 * float(b.norm())
    cold = solver().solve(hg.MatrixOperator(A), b)
    warm = solver().solve(hg.MatrixOperator(A), b, bad)
    assert warm.stats["warm_start_dropped"] and "warm_start_dropped" not in cold.stats
    assert torch.allclose(warm.value, cold.value, rtol=1e-14, atol=1e-15)
    assert warm.num_hvps == cold.num_hvps + 1  # the start's product is counted
    if isinstance(solver(), hg.Neumann):
        assert torch.allclose(cold.value, _series(A, b, 0.3, 5), rtol=1e-12, atol=0)


def test_a_good_start_is_kept():
    A, b, _ = _system()
    x = torch.linalg.solve(A, b)
    near = x + 1e-3 * torch.ones_like(x)
    sol = hg.Neumann(5, alpha=0.3).solve(hg.MatrixOperator(A), b, near)
    assert "warm_start_dropped" not in sol.stats
    assert torch.allclose(sol.value, near + _series(A, b - A @ near, 0.3, 5), rtol=1e-12)


def test_implicit_warm_start_says_dropped():
    A, b, bad = _system()

    def f(t, h):
        return 0.5 * t @ A @ t - h * (b @ t)

    def g(t, h):
        return 0.5 * (t**2).sum()

    theta = torch.linalg.solve(A, 0.5 * b)
    problem = hg.Problem(f, g, theta, torch.tensor(0.5, dtype=torch.float64))
    method = hg.Implicit(hg.Neumann(5, alpha=0.3, tol=1e-8), warm_start=True)
    method.load_state_dict({**method.state_dict(), "x": bad})
    with pytest.warns(hg.HypergradientWarning):  # stops at maxiter far from tol
        hyper, info = method(problem)
        cold, _ = hg.Implicit(hg.Neumann(5, alpha=0.3, tol=1e-8))(problem)
    assert info.stats["warm_start"] == "dropped"
    assert torch.allclose(hyper, cold, rtol=1e-13)
    # dg/dh = -(d2f/dh dtheta)^T x = b . x, x the series' solution of A x = theta
    assert float(hyper) == pytest.approx(float(b @ _series(A, theta, 0.3, 5)), rel=1e-12)
