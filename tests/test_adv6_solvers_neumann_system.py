"""``Neumann(alpha="auto")`` keeps its ``lambda_max`` estimate only for the operator it was
taken on: another size or another damping is estimated again.

With ``damping="auto"`` a solve that meets negative curvature is repeated with a larger
damping (``damped_solve``). Neumann's cached estimate (``refresh_every=10``) was that of the
undamped, indefinite operator, so every repeat reported ``negative_curvature`` again
("cached" estimate) though the damped system was positive definite: three useless retries,
the damping inflated 4x (0.31 -> 1.24, more bias) and a false warning. Reference: the
Neumann partial sum ``alpha sum_{j<=k} (I - alpha (A + d I))^j b`` in dense float64.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg
from hypergradient.solvers import AutoDamping, Neumann, damped_solve

F64 = torch.float64


def _indefinite(n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    ev = torch.linspace(0.5, 10.0, n, dtype=F64)
    ev[0] = -0.3
    return Q @ torch.diag(ev) @ Q.T, torch.randn(n, generator=g, dtype=F64)


def _series(A, b, alpha, k):
    M = torch.eye(A.shape[0], dtype=F64) - alpha * A
    x, v = b.clone(), b.clone()
    for _ in range(k):
        v = M @ v
        x = x + v
    return alpha * x


@pytest.mark.parametrize("refresh_every", [1, 10])
def test_a_retry_with_more_damping_is_estimated_again(refresh_every):
    A, b = _indefinite()
    solver = Neumann(maxiter=200, alpha="auto", refresh_every=refresh_every, power_iters=30, seed=0)
    auto = AutoDamping(maxiter=1, seed=1)  # one Lanczos step misses the negative eigenvalue
    sol, _, stats = damped_solve(solver, hg.MatrixOperator(A), b, None, auto)
    assert sol.status == hg.Status.FIXED_BUDGET  # was negative_curvature ("cached")
    assert stats["damping_retries"] == 1  # was 3
    d = stats["damping"]
    assert d == pytest.approx(0.3 + 1e-3 * 10.0, rel=1e-6)  # -lambda_min + rel radius (1.24)
    assert sol.stats["estimated"] is True
    want = _series(A + d * torch.eye(30, dtype=F64), b, sol.stats["alpha"], 200)
    assert torch.allclose(sol.value, want, rtol=1e-10, atol=1e-12)


def test_implicit_with_auto_damping_and_a_cached_series_does_not_warn():
    A, t = _indefinite()

    def f(theta, phi):  # stationary at A^-1 phi, a saddle
        return 0.5 * theta @ A @ theta - theta @ phi

    def g(theta, phi):
        return 0.5 * ((theta - t) ** 2).sum()

    phi = torch.ones(30, dtype=F64)
    theta = torch.linalg.solve(A, phi)
    solver = Neumann(maxiter=100, alpha="auto", refresh_every=10, power_iters=30, seed=0)
    method = hg.Implicit(solver, damping=AutoDamping(maxiter=1, seed=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)  # was "non-positive curvature"
        out, info = method(hg.Problem(f, g, theta, phi))
    d = info.stats["damping"]
    x = _series(A + d * torch.eye(30, dtype=F64), theta - t, info.stats["alpha"], 100)
    assert torch.allclose(out, x, rtol=1e-10, atol=1e-12)  # d_phi grad_theta f = -I


def test_an_operator_of_another_size_is_estimated_again():
    A, b = _indefinite()
    A = A @ A  # positive definite, lambda_max 100
    solver = Neumann(maxiter=5, alpha="auto", refresh_every=100, power_iters=30, seed=0)
    solver.solve(hg.MatrixOperator(A), b)
    small = torch.diag(torch.linspace(1.0, 2.0, 20, dtype=F64))
    sol = solver.solve(hg.MatrixOperator(small), torch.ones(20, dtype=F64))
    assert sol.stats["estimated"] is True and sol.stats["lambda_max"] == pytest.approx(2.0)
    # (the cached 100 made alpha 50x too small: a residual of 0.95 after 5 products)
    assert sol.stats["residual_growth"] < 0.05
    want = _series(small, torch.ones(20, dtype=F64), sol.stats["alpha"], 5)
    assert torch.allclose(sol.value, want, rtol=1e-12)


def test_the_estimated_system_is_checkpointed():
    A, b = _indefinite()
    op = hg.DampedOperator(hg.MatrixOperator(A), 0.5)
    solver = Neumann(maxiter=10, alpha="auto", refresh_every=10, seed=0)
    solver.solve(op, b)
    state = solver.state_dict()
    assert state["system"] == [30, 0.5]
    resumed = Neumann(maxiter=10, alpha="auto", refresh_every=10, seed=0)
    resumed.load_state_dict(state)
    again = resumed.solve(op, b)
    assert again.stats["estimated"] is False
    assert torch.equal(again.value, solver.solve(op, b).value)
    old = {k: v for k, v in state.items() if k != "system"}  # before the key existed
    Neumann(alpha="auto", seed=0).load_state_dict(old)
    for bad in ([30], [-1, 0.5], [30, float("nan")], "30"):
        fresh = Neumann(alpha="auto", seed=0)
        with pytest.raises((ValueError, TypeError), match="system"):
            fresh.load_state_dict({**state, "system": bad})
        assert fresh.state_dict()["calls"] == 0
