"""Neumann(alpha="auto") with too few power iterations for the Kuczynski-Wozniakowski bound
(safety factor 5, no guarantee): a residual that grows on a positive-definite operator is a
step too large, not negative curvature. Before, it reported ``negative_curvature`` (and
hg.implicit warned that the Hessian is not positive definite) on an SPD matrix."""

import torch

import hypergradient as hg
from hypergradient.operators import MatrixOperator


def test_growth_with_an_unbounded_step_is_not_called_negative_curvature():
    n = 6
    gen = torch.Generator().manual_seed(12)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    a = q @ torch.diag(torch.logspace(-2, 2, n, dtype=torch.float64)) @ q.T  # SPD
    b = torch.randn(n, dtype=torch.float64, generator=gen)
    statuses = set()
    for seed in range(6):
        solver = hg.Neumann(200, alpha="auto", power_iters=1, seed=seed)
        sol = solver.solve(MatrixOperator(a), b)
        assert sol.stats["safety"] == 5.0
        statuses.add(str(sol.status))
        assert sol.status != "negative_curvature"
    assert "diverged" in statuses  # the growth happened, and is called what it is


def test_growth_on_an_indefinite_operator_is_still_negative_curvature():
    a = torch.diag(torch.tensor([-1.0, 1.0, 2.0, 3.0], dtype=torch.float64))
    b = torch.ones(4, dtype=torch.float64)
    sol = hg.Neumann(50, alpha="auto", power_iters=1, seed=0).solve(MatrixOperator(a), b)
    assert sol.status == "negative_curvature"
