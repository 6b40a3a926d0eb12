"""Reuse across hyper-steps (issue 11, goal 4): safe warm starts and a Nystrom
preconditioner refreshed only when it stops helping. References: dense float64 solves."""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

DT = torch.float64


def ridge(seed=0, shift=0.0):
    """Per-feature ridge with a closed-form hypergradient ``-exp(h) w (A^-1 b)``."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(40, 12, generator=gen, dtype=DT) * torch.logspace(0, 0.5, 12, dtype=DT)
    y = torch.randn(40, generator=gen, dtype=DT)
    Xv, yv = torch.randn(40, 12, generator=gen, dtype=DT), torch.randn(40, generator=gen, dtype=DT)
    h = torch.full((12,), -1.0 + shift, dtype=DT)
    A = X.T @ X / 40 + torch.diag(h.exp())
    w = torch.linalg.solve(A, X.T @ y / 40)

    def f(w, h):
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (h.exp() * w**2).sum()

    def g(w, h):
        return 0.5 * ((Xv @ w - yv) ** 2).mean()

    b = Xv.T @ (Xv @ w - yv) / 40
    exact = -h.exp() * w * torch.linalg.solve(A, b)
    return hg.Problem(f, g, w, h), exact


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_warm_started_implicit_makes_progress_where_a_cold_one_stays():
    problem, exact = ridge()
    cold = hg.Implicit(hg.CG(maxiter=4, tol=0.0))
    warm = hg.Implicit(hg.CG(maxiter=4, tol=0.0), warm_start=True)
    errors, stats = [], []
    for _ in range(5):
        c, _ = cold(problem)
        out, info = warm(problem)
        errors.append(rel(out, exact))
        stats.append(info.stats["warm_start"])
    assert stats == ["none"] + ["used"] * 4
    assert all(e1 < e0 for e0, e1 in zip(errors, errors[1:]))
    assert errors[-1] < 3e-3 * rel(c, exact)  # measured: 9.0e-2 cold, 1.2e-4 after 5 warm calls
    assert "x" in warm.state_dict() and "x" not in cold.state_dict()
    assert warm.config()["warm_start"] is True and "warm_start" not in cold.config()


def test_the_kept_solution_is_checkpointed_and_restored():
    problem, exact = ridge()
    a = hg.Implicit(hg.CG(maxiter=4, tol=0.0), warm_start=True)
    a(problem)
    b = hg.Implicit(hg.CG(maxiter=4, tol=0.0), warm_start=True)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(problem)[0], b(problem)[0])
    with pytest.raises(ValueError, match="NaN"):
        b.load_state_dict({"x": torch.full((12,), float("nan"), dtype=DT)})
    with pytest.raises(TypeError, match="1-D"):
        b.load_state_dict({"x": [1.0]})


def test_warm_start_follows_a_moving_system_and_is_dropped_after_negative_curvature():
    # consecutive hyper-steps: the hyperparameters move a little; 4 warm CG steps track the
    # solution, 4 cold ones do not
    warm = hg.Implicit(hg.CG(maxiter=4, tol=0.0), warm_start=True)
    cold = hg.Implicit(hg.CG(maxiter=4, tol=0.0))
    for k in range(6):
        problem, exact = ridge(shift=0.02 * k)
        w_err, c_err = rel(warm(problem)[0], exact), rel(cold(problem)[0], exact)
    assert w_err < 0.02 * c_err  # measured 4.8e-4 vs 8.7e-2
    d = torch.tensor([1.0, -1.0], dtype=DT)
    saddle = hg.Problem(
        lambda w, h: 0.5 * (d * w * w).sum() - (h * w).sum(),
        lambda w, h: 0.5 * ((w - torch.tensor([1.0, 2.0], dtype=DT)) ** 2).sum(),
        torch.zeros(2, dtype=DT),
        torch.zeros(2, dtype=DT),
    )
    method = hg.Implicit(hg.CG(maxiter=5), warm_start=True)
    with pytest.warns(hg.HypergradientWarning):
        _, info = method(saddle)
    assert info.status == "negative_curvature" and method.state_dict()["x"] is None


def drifting(n=60, seed=0):
    """SPD matrices ``Q diag(lam) Q^T`` with a spread-out top of the spectrum."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    top, rest = torch.logspace(4, 2, 10, dtype=DT), torch.linspace(1.0, 2.0, n - 10, dtype=DT)
    lam = torch.cat([top, rest])
    b = torch.randn(n, generator=gen, dtype=DT)
    return Q, lam, b


def test_nystrom_pcg_auto_refresh_sketches_again_only_when_the_sketch_stops_helping():
    Q, lam, b = drifting()
    other = torch.randn(60, 60, generator=torch.Generator().manual_seed(1), dtype=DT)
    R, _ = torch.linalg.qr(other)
    solver = hg.NystromPCG(rank=10, maxiter=200, tol=1e-8, seed=0, refresh_every="auto")
    sketched, iterations = [], []
    for k in range(8):
        # five small drifts of the spectrum, then the eigenvectors jump (another Hessian)
        A = (Q if k < 5 else R) @ torch.diag(lam * (1 + 0.01 * k)) @ (Q if k < 5 else R).T
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sol = hg.NystromPCG.solve(solver, hg.MatrixOperator(A), b)
        assert rel(sol.value, torch.linalg.solve(A, b)) < 1e-6
        sketched.append(sol.stats["sketch_hvps"] > 0)
        iterations.append(sol.iterations)
    # one sketch for the drifting part; the first solve after the jump is slow (judged
    # stale), the next one sketches again and is fast again
    assert sketched == [True, False, False, False, False, False, True, False], iterations
    assert iterations[5] > 1.5 * iterations[0] and iterations[6] <= iterations[0] + 2
    state = solver.state_dict()
    assert state["base_rate"] > 0
    fresh = hg.NystromPCG(rank=10, maxiter=200, tol=1e-8, seed=0, refresh_every="auto")
    fresh.load_state_dict({k: v for k, v in state.items() if k != "base_rate"})  # older file
    assert fresh.state_dict()["base_rate"] is None
    with pytest.raises(ValueError, match="refresh_every"):
        hg.NystromPCG(refresh_every=0)
    for text in ("AUTO", "never"):  # a string other than "auto" names the choice
        with pytest.raises(ValueError, match=r'refresh_every.* or "auto", got'):
            hg.NystromPCG(refresh_every=text)
