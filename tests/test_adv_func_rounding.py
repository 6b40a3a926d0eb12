"""Solvers at the end of their precision: no false divergence, no imprecise norms.

Adversarial review, on symmetric positive-definite systems (exact references by dense
float64 solves):

- ``safe_norm`` read norms whose squares are subnormal in float64 (below ~1e-146) as they
  came: 2e-5 off at 1e-160, 22 % at 1e-162. Neumann's series, whose terms reach such
  norms after many products, then saw a "growth" and reported ``negative_curvature``
  (``hg.implicit`` warned that the Hessian is not positive definite; ``damping="auto"``
  would add damping); in float32 the terms' own entries become subnormal (1855 products).
- ``FixedPoint`` with ``tol=0`` (or below rounding level) iterated on its true residual
  down to the rounding floor, where it moves by noise, and reported ``diverged`` (40 to 600
  products on well-conditioned systems), which ``hg.implicit`` raises as an error.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import hypergradient as hg
from hypergradient.solvers.base import safe_norm

DT = torch.float64


def _system(seed: int, lo: float, dtype: torch.dtype, n: int = 40):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    A = (Q * torch.linspace(lo, 1.0, n, dtype=DT)) @ Q.T
    b = torch.randn(n, generator=g, dtype=DT)
    return A.to(dtype), b.to(dtype), torch.linalg.solve(A, b)


@pytest.mark.parametrize("scale", [1e-150, 1e-155, 1e-160, 1e-162, 1e-170, 1e-300])
def test_safe_norm_of_tiny_vectors_is_exact_to_rounding(scale):
    v = torch.linspace(-1.0, 2.0, 50, dtype=DT)
    exact = math.sqrt(float((v * v).sum())) * scale
    assert safe_norm(v * scale) == pytest.approx(exact, rel=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [3, 9])
def test_long_neumann_and_fixed_point_runs_converge_and_say_so(dtype, seed):
    A, b, x = _system(seed, 0.05, dtype)
    steps = 3000 if dtype == torch.float32 else 16000
    tol = 3e-5 if dtype == torch.float32 else 1e-13  # condition number 20
    for solver in (
        hg.Neumann(maxiter=steps, alpha=1.0),
        hg.Neumann(maxiter=steps, alpha="auto", seed=0),
        hg.FixedPoint(maxiter=steps, tol=0.0),
    ):
        sol = solver.solve(hg.MatrixOperator(A), b)
        assert sol.status in ("fixed_budget", "converged"), (solver, sol.status, sol.iterations)
        assert float((sol.value.double() - x).norm() / x.norm()) < tol


def test_hg_implicit_with_a_tight_fixed_point_solver_does_not_raise():
    A, b, x = _system(0, 0.3, DT, n=30)

    def f(theta, h):
        return 0.5 * theta @ A @ theta - h * (theta @ b)

    def g(theta, h):
        return theta.sum()

    h = torch.tensor(1.0, dtype=DT)
    expected = float(b @ torch.linalg.solve(A, torch.ones(30, dtype=DT)))  # d/dh of 1^T A^-1 b h
    for solver in (hg.FixedPoint(maxiter=2000, tol=0.0), hg.Neumann(maxiter=2000, alpha="auto")):
        with warnings.catch_warnings():
            warnings.simplefilter("error", hg.HypergradientWarning)
            out, info = hg.implicit(f, g, x, h, solver, return_info=True)
        assert info.status.ok
        assert float(out) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fixed_point_on_a_half_precision_model_stops_at_its_rounding_level(dtype):
    # The products of a half-precision model are exact to ~eps(dtype) only: FixedPoint's true
    # residual stops decreasing near 1e-2 and moved by noise, which it reported "diverged"
    # (hg.implicit raised). Now it stops there with its best iterate.
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(20, 4, generator=g), torch.randn(20, generator=g)

    def f(p, h):
        return ((X.to(p.dtype) @ p - y.to(p.dtype)) ** 2).mean() + h.exp().to(p.dtype) * (
            p**2
        ).sum()

    def gv(p, h):
        return ((X.to(p.dtype) @ p - y.to(p.dtype) + 1) ** 2).mean()

    X64, y64, lam = X.double(), y.double(), math.exp(-1.0)
    H = 2 * X64.T @ X64 / 20 + 2 * lam * torch.eye(4, dtype=DT)
    w = torch.linalg.solve(H, 2 * X64.T @ y64 / 20)
    b = 2 * X64.T @ (X64 @ w - y64 + 1) / 20
    expected = float(-(2 * lam * w) @ torch.linalg.solve(H, b))  # mixed term: d/dh of 2 e^h w
    op = hg.HessianOperator(f, w.to(dtype), torch.tensor(-1.0))
    assert op.product_eps == torch.finfo(dtype).eps
    assert hg.DampedOperator(op, 0.1).product_eps == torch.finfo(dtype).eps
    out, info = hg.implicit(
        f, gv, w.to(dtype), torch.tensor(-1.0), hg.FixedPoint(omega=0.3), return_info=True,
        stationarity=None,
    )  # fmt: skip
    assert info.status.ok
    assert float(out) == pytest.approx(expected, rel=5e-2)
