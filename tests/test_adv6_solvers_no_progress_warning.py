"""A solve stopped at ``maxiter`` no better than ``x = 0`` always warns, whatever its
tolerance.

On ridge regression in float32 (30 weights, ``cond(H) ~ 960``) CG's residual rises to 5x
``||b||`` in its first iterations, so ``hg.CG(maxiter=5, tol=0.1)`` (HOAG's first
tolerance) returns its start ``x = 0``: the hypergradient is the direct term alone, here
exactly 0. The maxiter warning required a relative residual above ``10 tol = 1``: the
residual of ``x = 0`` is 1, and the call (and every HOAG call with ``maxiter=5``) returned 0
without a word. Reference: the dense float64 CG iterates of the same Hessian.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

F64 = torch.float64


def _ridge():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(100, 30, generator=g) * torch.logspace(0, -2, 30)
    y = torch.randn(100, generator=g)
    Xv = torch.randn(40, 30, generator=g)
    yv = torch.randn(40, generator=g)

    def f(t, h):
        return ((X @ t - y) ** 2).mean() + h * (t**2).sum()

    def gv(t, h):
        return ((Xv @ t - yv) ** 2).mean()

    h = torch.tensor(1e-3)
    theta = torch.linalg.solve(X.T @ X / 100 + h * torch.eye(30), X.T @ y / 100)
    return f, gv, theta, h


def _cg_residuals(A, b, k):
    x, r = torch.zeros_like(b), b.clone()
    p, out = r.clone(), []
    for _ in range(k):
        Ap = A @ p
        a = (r @ r) / (p @ Ap)
        x, rn = x + a * p, r - a * Ap
        p, r = rn + (rn @ rn) / (r @ r) * p, rn
        out.append(float(r.norm() / b.norm()))
    return out


def test_cg_that_returns_its_start_warns():
    f, gv, theta, h = _ridge()
    A = hg.HessianOperator(f, theta, h).dense().to(F64)
    t = theta.clone().requires_grad_()
    b = torch.autograd.grad(gv(t, h), t)[0].to(F64)
    assert min(_cg_residuals(A, b, 5)) > 1.0  # every iterate is worse than x = 0
    with pytest.warns(hg.HypergradientWarning, match="no better than x = 0"):
        out, info = hg.implicit(f, gv, theta, h, hg.CG(maxiter=5, tol=0.1), return_info=True)
    assert info.status == hg.Status.MAX_ITERATIONS
    assert info.relative_residual == pytest.approx(1.0, abs=1e-6)
    assert float(out) == 0.0  # the direct term: g does not read h


def test_hoag_with_a_small_budget_warns_on_every_call():
    f, gv, theta, h = _ridge()
    method = hg.HOAG(maxiter=5, reset_on=("negative_curvature",))
    for _ in range(3):
        with pytest.warns(hg.HypergradientWarning, match="no better than x = 0"):
            method(hg.Problem(f, gv, theta, h))


def test_progress_within_ten_times_a_loose_tolerance_stays_silent():
    f, gv, theta, h = _ridge()
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)
        _, info = hg.implicit(f, gv, theta, h, hg.CG(maxiter=60, tol=0.1), return_info=True)
    assert info.relative_residual < 1.0
