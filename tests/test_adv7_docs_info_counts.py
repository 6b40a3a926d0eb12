"""``Info.num_hvps`` was documented as the products spent "everything included", but an
implicit method's residual product (asked for by ``residual=True``, the default, when the
solver does not know its residual) is counted apart in ``ImplicitInfo.extra_hvps``. The
docstring now says so; here the two counts add up to the operator products actually taken.
"""

from __future__ import annotations

import warnings
from unittest import mock

import pytest
import torch

import hypergradient as hg

A = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.5]], dtype=torch.float64)
B = torch.tensor([[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]], dtype=torch.float64)
W_VAL = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
H = torch.tensor([0.3, -0.7], dtype=torch.float64)
W = torch.linalg.solve(A, B @ H)


def f(w, h):
    return 0.5 * w @ A @ w - w @ (B @ h)


def g(w, h):
    return 0.5 * ((w - W_VAL) ** 2).sum()


@pytest.mark.parametrize(
    "solver,residual,solver_products,extra",
    [
        (lambda: hg.Neumann(5, alpha=0.2), True, 5, 1),
        (lambda: hg.Neumann(5, alpha=0.2), False, 5, 0),
        (lambda: hg.Identity(0.3), True, 0, 1),
        (lambda: hg.CG(maxiter=2, tol=0.0), True, 2, 0),  # CG knows its residual
    ],
)
def test_num_hvps_and_extra_hvps_add_up_to_the_products_taken(
    solver, residual, solver_products, extra
):
    taken = []
    matvec = hg.HessianOperator.matvec

    def counting(self, v):
        taken.append(1)
        return matvec(self, v)

    with mock.patch.object(hg.HessianOperator, "matvec", counting), warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        hyper, info = hg.implicit(f, g, W, H, solver=solver(), residual=residual, return_info=True)
    assert (info.num_hvps, info.extra_hvps) == (solver_products, extra)
    assert len(taken) == info.num_hvps + info.extra_hvps
    if residual:  # the residual is the true one of the returned solution
        x = info.solution
        assert info.residual_norm == pytest.approx(float((W - W_VAL - A @ x).norm()), rel=1e-12)
    torch.testing.assert_close(hyper, B.T @ info.solution, rtol=1e-12, atol=1e-14)
