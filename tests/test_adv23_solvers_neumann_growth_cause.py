"""A fixed-step Neumann series called "diverged" a growth that negative curvature caused.

When the series' residual grows, the Rayleigh quotient ``q`` along it tells why: ``q < 0``,
negative curvature (the best partial sum, a warning); else a step too large (``diverged``:
``hg.implicit`` raises "lower the step size"). But ``q`` mixes both signs: on a network whose
Hessian's eigenvalues lie in [-3.63, 3.46], HippoTrainer's ``Neumann(num_terms=1)`` (its step
the learning rate, 0.05: far below 2 / 3.46) read ``q = +4.3e-4`` and stopped the training
loop with that error. With a fixed step the series now asks Lanczos (``power_iters``
products, only on this path): a negative Ritz value, or a top eigenvalue under which the
step cannot grow the series, is negative curvature. Exact reference: the operator's
eigenvalues, chosen.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import hypergradient as hg
from hypergradient._vocab import Status
from hypergradient.operators import MatrixOperator

D = torch.float64


def system(low, high, weight):
    """Eigenvalues ``low`` (one) and ``high`` (the rest, 5), ``b`` with ``weight`` of its
    square norm on the low one's eigenvector."""
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=D))
    a = q @ torch.diag(torch.tensor([low] + [high] * 5, dtype=D)) @ q.T
    b = math.sqrt(weight) * q[:, 0] + math.sqrt((1 - weight) / 5) * q[:, 1:].sum(1)
    return MatrixOperator(a), b


def test_growth_from_negative_curvature_with_a_positive_quotient_is_named():
    op, b = system(-1.0, 3.0, 0.74)  # q = 3 - 4 (0.74) = 0.04 > 0, first ratio 1.0018 > 1
    assert float(b @ (op.matrix @ b)) > 0
    sol = hg.Neumann(maxiter=5, alpha=0.05).solve(op, b)
    assert sol.status == Status.NEGATIVE_CURVATURE
    assert sol.stats["rayleigh_quotient"] > 0 and sol.stats["growth_hvps"] <= 20
    assert torch.equal(sol.value, torch.zeros_like(b))  # the first term grew: x = 0 is best


def test_a_step_too_large_is_still_diverged():
    op, b = system(1.0, 3.0, 0.5)  # positive definite; alpha = 0.9: |1 - 2.7| = 1.7 > 1
    sol = hg.Neumann(maxiter=5, alpha=0.9).solve(op, b)
    assert sol.status == Status.DIVERGED


def test_the_implicit_formula_warns_instead_of_raising():
    op, b = system(-1.0, 3.0, 0.74)
    A = op.matrix

    def f(x, h):
        return 0.5 * x @ (A @ x) - (h * b) @ x

    def g(x, h):
        return 0.5 * (x**2).sum()

    x0 = b.clone()  # grad g = x0 = b: the solve's right-hand side is b
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        solver = hg.Neumann(5, alpha=0.05)
        hg.implicit(f, g, x0, torch.tensor(1.0, dtype=D), solver, stationarity=None)
    texts = [str(w.message) for w in caught if issubclass(w.category, hg.HypergradientWarning)]
    assert any("curvature" in t for t in texts), texts


@pytest.mark.parametrize("alpha", ["auto"])
def test_the_estimated_step_path_is_unchanged(alpha):
    """(alpha='auto' estimates the spectrum itself: no second Lanczos run.)"""
    op, b = system(-1.0, 3.0, 0.74)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sol = hg.Neumann(maxiter=5, alpha=alpha, seed=0).solve(op, b)
    assert "growth_hvps" not in sol.stats
