"""A user's CG preconditioner that returns NaN or zero is named in a ValueError. Before, a
NaN one raised "A Hessian-vector product is not finite ... check inner_loss" and a zero one
reported ``negative_curvature`` ("the Hessian is not positive definite"): both blamed the
Hessian. A valid one (Jacobi) still converges to the dense solution."""

import pytest
import torch

import hypergradient as hg
from hypergradient.operators import MatrixOperator


def _system(n: int = 20):
    gen = torch.Generator().manual_seed(11)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    a = q @ torch.diag(torch.logspace(-1, 2, n, dtype=torch.float64)) @ q.T
    return a, torch.randn(n, dtype=torch.float64, generator=gen)


@pytest.mark.parametrize(
    ("pre", "what"),
    [(lambda r: r * float("nan"), "NaN or Inf"), (lambda r: 0 * r, "= 0 for a non-zero r")],
)
def test_a_faulty_preconditioner_is_named(pre, what):
    a, b = _system()
    with pytest.raises(ValueError, match="preconditioner") as err:
        hg.CG(preconditioner=pre).solve(MatrixOperator(a), b)
    assert what in str(err.value)


def test_a_faulty_preconditioner_is_named_through_implicit():
    a, b = _system()
    w = torch.linalg.solve(a, b)

    def f(p, h):
        return 0.5 * p @ a @ p - b @ p + 0.5 * (h * p * p).sum()

    def g(p, h):
        return ((p - 1) ** 2).sum()

    h = torch.zeros(20, dtype=torch.float64)
    with pytest.raises(ValueError, match="preconditioner"):
        hg.implicit(f, g, w, h, hg.CG(preconditioner=lambda r: 0 * r))


def test_a_jacobi_preconditioner_still_solves_exactly():
    a, b = _system()
    d = torch.diagonal(a)
    sol = hg.CG(tol=1e-10, preconditioner=lambda r: r / d).solve(MatrixOperator(a), b)
    assert sol.status == "converged"
    assert torch.allclose(sol.value, torch.linalg.solve(a, b), rtol=1e-8, atol=1e-10)
