"""``hg.IFT(solver, maxiter=..., alpha=..., ...)``: the options of IFT's default Neumann
series were silently dropped when a solver was given (``IFT(hg.CG(), maxiter=3)`` ran CG's
100 iterations; ``IFT(hg.Neumann(3), alpha=0.2)`` ran the solver's alpha). They now raise a
``ValueError`` naming them, and the solver's own settings are the ones used.
"""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg

A = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.5]], dtype=torch.float64)
B = torch.tensor([[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]], dtype=torch.float64)
W_VAL = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


def inner(w, h):  # f = w^T A w / 2 - w^T B h: Hessian A, mixed derivative -B^T
    return 0.5 * w @ A @ w - w @ (B @ h)


def outer(w, h):
    return 0.5 * ((w - W_VAL) ** 2).sum()


def _problem() -> hg.Problem:
    h = torch.tensor([0.3, -0.7], dtype=torch.float64)
    w = torch.linalg.solve(A, B @ h)  # the exact minimum
    return hg.Problem(inner, outer, w, h, lr=0.1)


@pytest.mark.parametrize(
    "kwargs,named",
    [
        ({"maxiter": 3}, "`maxiter`"),
        ({"alpha": 0.2}, "`alpha`"),
        ({"power_iters": 5}, "`power_iters`"),
        ({"refresh_every": 2}, "`refresh_every`"),
        ({"seed": 0}, "`seed`"),
    ],
)
def test_default_series_options_with_a_solver_raise(kwargs, named):
    with pytest.raises(ValueError, match=named):
        hg.IFT(hg.CG(maxiter=5), **kwargs)
    with pytest.raises(ValueError, match=named):
        hg.IFT(solver=hg.Neumann(3, alpha=0.2), damping=0.1, **kwargs)


def test_the_solver_settings_are_the_ones_used():
    problem = _problem()
    w = problem.params
    b = w - W_VAL  # grad_w g
    # Neumann(3, alpha=0.2): x = 0.2 sum_{j<=3} (I - 0.2 A)^j b; dg/dh = -(-B^T) x = B^T x
    M = torch.eye(3, dtype=torch.float64) - 0.2 * A
    x = 0.2 * sum(torch.linalg.matrix_power(M, j) @ b for j in range(4))
    got, info = hg.IFT(hg.Neumann(3, alpha=0.2))(problem)
    torch.testing.assert_close(got, B.T @ x, rtol=1e-12, atol=1e-14)
    assert info.num_hvps == 3
    # CG to convergence: the exact hypergradient B^T A^{-1} b
    got, _ = hg.IFT(hg.CG(maxiter=3, tol=1e-14))(problem)
    torch.testing.assert_close(got, B.T @ torch.linalg.solve(A, b), rtol=1e-10, atol=1e-12)


def test_defaults_without_a_solver_still_build_the_series():
    method = hg.IFT(maxiter=4, alpha=0.2)  # (the estimate's settings: refused with alpha)
    hg.IFT(maxiter=4, power_iters=5, refresh_every=2, seed=0)  # an estimated step takes them
    assert isinstance(method.solver, hg.Neumann) and method.solver.maxiter == 4
    problem = _problem()
    b = problem.params - W_VAL
    M = torch.eye(3, dtype=torch.float64) - 0.2 * A
    x = 0.2 * sum(torch.linalg.matrix_power(M, j) @ b for j in range(5))
    got, _ = method(problem)
    torch.testing.assert_close(got, B.T @ x, rtol=1e-12, atol=1e-14)
