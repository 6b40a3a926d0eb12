"""A positive semi-definite Hessian read in float32, float16 or bfloat16 is not called
indefinite: the Nystrom sketch and Neumann's estimate compare negative values with the
rounding of the products, not with float64's.

Model: overparameterized linear regression (10 samples, 40 weights), a minimum whose
Hessian ``X^T X / m`` has rank 10. Measured before the fix:

- ``nystrom_sketch`` (rank 20) flagged it ``indefinite`` in 20 of 20 draws in float32 and
  bfloat16 (its core's smallest eigenvalue reads about ``-0.2 eps`` of its largest, its
  shift ``nu`` is float64's), so ``hg.Nystrom`` warned "the Hessian is indefinite: not a
  minimum" on every call;
- ``Neumann(alpha="auto")`` read ``lambda_min = -3e-4 lambda_max`` on the bfloat16 model
  (``-1e-4`` float16) and reported ``negative_curvature`` with the same warning.

Genuine saddles are still flagged (``tests/test_solver_safety.py``, and below).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg
from hypergradient.solvers import nystrom_sketch

F64 = torch.float64
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _problem(dtype):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(10, 40, generator=g, dtype=F64)
    y = torch.randn(10, generator=g, dtype=F64)
    Xv = torch.randn(15, 40, generator=g, dtype=F64)
    yv = torch.randn(15, generator=g, dtype=F64)
    Xd, yd, Xvd, yvd = X.to(dtype), y.to(dtype), Xv.to(dtype), yv.to(dtype)

    def f(t, h):
        return 0.5 * ((Xd @ t - yd - h) ** 2).mean()

    def g_(t, h):
        return 0.5 * ((Xvd @ t - yvd) ** 2).mean()

    theta = (torch.linalg.pinv(X) @ y).to(dtype)
    return f, g_, theta, torch.zeros(10, dtype=dtype), Xd.to(F64), Xvd.to(F64), yvd.to(F64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sketch", ["gaussian", "column"])
def test_the_sketch_of_a_psd_singular_hessian_is_not_indefinite(dtype, sketch):
    f, _, theta, h, *_ = _problem(dtype)
    op = hg.HessianOperator(f, theta, h)
    for seed in range(5):
        approx = nystrom_sketch(op, 20, sketch, torch.Generator().manual_seed(seed))
        assert approx.indefinite is False  # was True in every draw


@pytest.mark.parametrize("dtype", DTYPES)
def test_nystrom_on_the_minimum_does_not_warn_and_solves_the_shifted_system(dtype):
    f, g, theta, h, X, Xv, yv = _problem(dtype)
    rho = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)  # was "indefinite"
        out, info = hg.implicit(
            f, g, theta, h, hg.Nystrom(rank=40, rho=rho, seed=0), return_info=True
        )
    assert "indefinite" not in info.stats
    # rank = n: the approximation is the Hessian, x = (H + rho I)^-1 b; dg/dh = X x / m
    t = theta.to(F64)
    b = Xv.T @ (Xv @ t - yv) / 15
    x = torch.linalg.solve(X.T @ X / 10 + rho * torch.eye(40, dtype=F64), b)
    ref = X @ x / 10
    eps = torch.finfo(dtype).eps
    # cond(H + rho I) ~ 10: measured 1.3 to 8.7 eps
    assert float((out.to(F64) - ref).norm() / ref.norm()) < 30 * eps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_neumann_auto_on_the_minimum_of_a_half_model_is_not_negative_curvature(dtype):
    f, g, theta, h, *_ = _problem(dtype)
    for seed in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("error", hg.HypergradientWarning)
            _, info = hg.implicit(
                f, g, theta, h, hg.Neumann(maxiter=50, alpha="auto", seed=seed), return_info=True
            )
        assert info.status == hg.Status.FIXED_BUDGET  # was negative_curvature
        assert info.stats["lambda_min"] < 0  # rounding: -1e-4 to -5e-4 of lambda_max


def test_a_saddle_of_a_bfloat16_model_is_still_flagged():
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=F64))
    A = (Q @ torch.diag(torch.linspace(-1.0, 2.0, 8, dtype=F64)) @ Q.T).to(torch.bfloat16)

    def f(t, h):
        return 0.5 * t @ (A @ t) - t @ h

    op = hg.HessianOperator(f, torch.zeros(8, dtype=torch.bfloat16), torch.ones(8).bfloat16())
    assert nystrom_sketch(op, 8, "gaussian", torch.Generator().manual_seed(0)).indefinite
    b = torch.ones(8, dtype=op.dtype)
    sol = hg.Neumann(maxiter=5, alpha="auto", seed=0).solve(op, b)
    assert sol.status == hg.Status.NEGATIVE_CURVATURE
