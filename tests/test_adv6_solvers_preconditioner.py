"""CG's user preconditioner: a result in another floating dtype is cast, another shape is a
ValueError naming the argument.

A Jacobi preconditioner whose diagonal is kept in float64 (``lambda r: r / diag``) returns
float64 for a float32 model; ``hg.implicit`` raised torch's internal "dot : expected both
vectors to have same dtype, but found Float and Double", and a result of shape ``(1, n)``
"1D tensors expected", neither naming the preconditioner. Reference: the dense float64
solve of the same Hessian.
"""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg

F64 = torch.float64


def _ridge():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(50, 6, generator=g), torch.randn(50, generator=g)

    def f(t, h):
        return ((X @ t - y) ** 2).mean() + h * (t**2).sum()

    def gv(t, h):
        return ((X @ t) ** 2).mean()

    h = torch.tensor(0.1)
    theta = torch.linalg.solve(X.T @ X / 50 + h * torch.eye(6), X.T @ y / 50)
    diag = (2 * (X.double() ** 2).mean(0) + 0.2).to(F64)  # the Hessian's diagonal, float64
    return f, gv, theta, h, X.double(), diag


def test_a_float64_jacobi_preconditioner_works_for_a_float32_model():
    f, gv, theta, h, X, diag = _ridge()
    out, info = hg.implicit(
        f, gv, theta, h, hg.CG(tol=1e-7, preconditioner=lambda r: r / diag), return_info=True
    )
    assert info.status == hg.Status.CONVERGED and info.solution.dtype == torch.float32
    H = 2 * X.T @ X / 50 + 0.2 * torch.eye(6, dtype=F64)
    t = theta.double()
    x = torch.linalg.solve(H, 2 * X.T @ (X @ t) / 50)
    ref = float(-(2 * t) @ x)  # d_h grad_t f = 2 t
    assert float(out) == pytest.approx(ref, rel=1e-5)
    same = hg.implicit(f, gv, theta, h, hg.CG(tol=1e-7, preconditioner=lambda r: r / diag.float()))
    assert torch.equal(out, same)


@pytest.mark.parametrize(
    "bad", [lambda r: r[None], lambda r: r[:-1], lambda r: r.tolist(), lambda r: r.long()]
)
def test_a_preconditioner_of_another_shape_or_kind_is_named(bad):
    f, gv, theta, h, _, _ = _ridge()
    with pytest.raises(ValueError, match="`preconditioner`"):
        hg.implicit(f, gv, theta, h, hg.CG(preconditioner=bad))
