"""CG on singular systems whose right-hand side is partly outside the range of ``A``.

Such systems come with overparameterized models (a direction the training loss does not
see, that the validation loss does). CG's steps then blow up along the null space while its
updated residual stays small: ``hg.CG(maxiter=50)`` returned ``||x|| ~ 3e32`` with a true
residual 4e16 times ``||b||`` (and ``hg.implicit`` a 1e32 hypergradient), against CG's
promise never to be worse than its start. Exits are now rechecked on the true residual,
and a stop at a null direction is followed by the least-squares solve with it deflated
(``solvers/cg_singular.py``; before, the start ``x = 0`` was returned as
``negative_curvature``; ``tests/test_adv14_solvers_null_space.py``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hypergradient as hg

DT = torch.float64
NULL = hg.Status.NEGATIVE_CURVATURE  # CG's stop at a curvature below the products' rounding


def singular(n: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A PSD ``A`` of the given rank, ``b`` with a part outside its range, and the part in it."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    evals = torch.zeros(n, dtype=DT)
    evals[:rank] = torch.logspace(-2, 1, rank, dtype=DT)
    A = (Q * evals) @ Q.T
    b = torch.randn(n, generator=g, dtype=DT)
    inside = Q[:, :rank] @ (Q[:, :rank].T @ b)
    return A, b, inside


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(3, 30),
    seed=st.integers(0, 10_000),
    maxiter=st.sampled_from([1, 2, 5, 20, 50, 200]),
    data=st.data(),
)
def test_cg_never_returns_worse_than_its_start_on_singular_systems(n, seed, maxiter, data):
    rank = data.draw(st.integers(1, n - 1))
    A, b, _ = singular(n, rank, seed)
    sol = hg.CG(maxiter=maxiter, tol=0.0).solve(hg.MatrixOperator(A), b)
    true = float((b - A @ sol.value).norm())
    assert true <= float(b.norm()) * (1 + 1e-9)
    # no blow-up along the null space (before: ||x|| up to 3e32 for ||b|| ~ 1)
    assert float(sol.value.norm()) < 1e6 * float(b.norm())
    if sol.status == hg.Status.CONVERGED and sol.stats.get("null_space"):  # least squares
        exact = torch.linalg.pinv(A, rtol=1e-10) @ b
        assert float((sol.value - exact).norm()) <= 1e-6 * float(exact.norm())
        assert true <= float((b - A @ exact).norm()) * (1 + 1e-9)
    elif sol.status == hg.Status.CONVERGED:  # a converged claim is true (tol=0: rounding)
        assert true <= 1e-6 * float(b.norm())


def test_cg_on_the_coupled_rank_one_system_returns_the_least_squares_solution():
    # Before: maxiter=50 returned ||x|| 2.8e32, true residual 4.0e16 (||b|| = 1.04); then
    # x = 0 ("negative_curvature"); now A^+ b = (0.064, 0.032), residual 1.0286.
    A = torch.tensor([[2.0, 1.0], [1.0, 0.5]], dtype=DT)
    b = torch.tensor([-0.3, 1.0], dtype=DT)
    exact = torch.linalg.pinv(A) @ b
    sol = hg.CG(maxiter=1).solve(hg.MatrixOperator(A), b)  # 1 step, worse than 0: the start
    assert float(sol.value.norm()) == 0.0 and sol.status == hg.Status.MAX_ITERATIONS
    for maxiter in (2, 10, 50, 200):
        # the second direction's curvature is at rounding level: deflated, solved again
        sol = hg.CG(maxiter=maxiter).solve(hg.MatrixOperator(A), b)
        assert torch.allclose(sol.value, exact, rtol=1e-12, atol=0)
        assert sol.residual_norm == pytest.approx(1.0285912696499, rel=1e-12)
        assert sol.status == hg.Status.CONVERGED and sol.stats["null_space"] == 1
    # a warm start's part along the null direction is deflated too
    x0 = torch.tensor([0.1, 0.0], dtype=DT)
    sol = hg.CG(maxiter=50).solve(hg.MatrixOperator(A), b, x0)
    assert torch.allclose(sol.value, exact, rtol=1e-12, atol=0)


def test_consistent_singular_systems_still_reach_the_minimum_norm_solution():
    A, _, inside = singular(12, 7, 3)
    sol = hg.CG(maxiter=100, tol=1e-12).solve(hg.MatrixOperator(A), inside)
    exact = torch.linalg.pinv(A) @ inside
    assert float((sol.value - exact).norm() / exact.norm()) < 1e-8
    assert sol.status == hg.Status.CONVERGED


def singular_inner():
    """A rank-1 inner Hessian ``A``; ``f = t^T A t / 2 + lam t_0``, ``g = t_1 - 0.3 t_0``:
    ``b = (-0.3, 1)`` is partly outside the range of ``A``."""
    A = torch.tensor([[2.0, 1.0], [1.0, 0.5]], dtype=DT)
    theta, lam = torch.tensor([1.0, 2.0], dtype=DT), torch.tensor(0.5, dtype=DT)

    def f(t, h):
        return 0.5 * t @ (A @ t) + h * t[0]

    def g(t, h):
        return t[1] - 0.3 * t[0]

    return A, f, g, theta, lam


def test_implicit_hypergradient_of_a_singular_inner_problem_is_not_blown_up():
    A, f, g, theta, lam = singular_inner()

    with pytest.warns(hg.HypergradientWarning, match="singular and the outer gradient"):
        out, info = hg.implicit(
            f, g, theta, lam, hg.CG(maxiter=50), return_info=True, stationarity=None
        )
    # the least-squares x = A^+ b, as Exact's (never 1e32; x = 0 before)
    x = torch.linalg.pinv(A) @ torch.tensor([-0.3, 1.0], dtype=DT)
    assert float(out) == pytest.approx(-float(x[0]), rel=1e-12)
    assert info.status == hg.Status.CONVERGED


def test_exact_says_when_b_leaves_the_range_of_a_singular_hessian():
    # Before: status "exact", residual 1.03 of ||b|| = 1.04, and no warning.
    A, f, g, theta, lam = singular_inner()

    def g_inside(t, h):  # b = (1, 0.5) A-range direction: consistent
        return t[0] + 0.5 * t[1]

    with pytest.warns(hg.HypergradientWarning, match="singular and the outer gradient"):
        out, info = hg.implicit(f, g, theta, lam, hg.Exact(), return_info=True, stationarity=None)
    # the minimum-norm answer: x = A^+ b, hypergradient -(d_phi grad f)^T x = -x_0
    x = torch.linalg.pinv(A) @ torch.tensor([-0.3, 1.0], dtype=DT)
    assert float(out) == pytest.approx(-float(x[0]), rel=1e-12)
    assert info.residual_norm == pytest.approx(1.0286, rel=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)
        hg.implicit(f, g_inside, theta, lam, hg.Exact(), stationarity=None)
        B = A + torch.eye(2, dtype=DT)
        hg.implicit(
            lambda t, h: 0.5 * t @ (B @ t) + h * t[0], g, theta, lam, hg.Exact(), stationarity=None
        )
