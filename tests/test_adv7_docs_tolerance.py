"""A relative tolerance of 1 or more is met by ``x = 0``: ``hg.cg(f, g, theta, phi, 10, 1.0)``
(hypergrad's ``conjugate_gradient(f, g, theta, phi, 10, 1.0)`` with its ``lr`` in the
position that is our ``tol``, as ``hg.cg`` keeps hypergrad's argument order) returned the
direct term alone, relative error 1 against the exact hypergradient, after 0 products, with
status "converged" and no warning. CG, NystromPCG, RecycledCG, FixedPoint and HOAG now
refuse such a tolerance, naming it; tolerances below 1 give the numbers they gave.
"""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg

A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
H = torch.full((2,), 0.1, dtype=torch.float64)
W = torch.linalg.solve(A + torch.diag(H), torch.ones(2, dtype=torch.float64))


def f(w, h):
    return 0.5 * w @ A @ w + 0.5 * (h * w**2).sum() - w.sum()


def g(w, h):
    return ((w - 1) ** 2).sum()


def _exact() -> torch.Tensor:
    # dw/dh = -(A + diag h)^{-1} diag(w); dg/dw = 2 (w - 1)
    x = torch.linalg.solve(A + torch.diag(H), 2 * (W - 1))
    return -(x * W)


@pytest.mark.parametrize("tol", [1.0, 2.0])
def test_hypergrad_order_with_lr_in_the_tol_position_is_refused(tol):
    with pytest.raises(ValueError, match=r"`tol` must be a number >= 0 and < 1.*x = 0"):
        hg.cg(f, g, W, H, 10, tol)


@pytest.mark.parametrize(
    "make",
    [
        lambda t: hg.CG(tol=t),
        lambda t: hg.NystromPCG(tol=t),
        lambda t: hg.RecycledCG(tol=t),
        lambda t: hg.FixedPoint(tol=t),
        lambda t: hg.HOAG(tol=t),
        lambda t: hg.HOAG(min_tol=t),
    ],
)
def test_solvers_refuse_a_tolerance_of_one_or_more(make):
    with pytest.raises(ValueError, match="x = 0"):
        make(1.0)
    make(0.5)  # below 1: accepted


def test_tolerances_below_one_give_the_exact_numbers():
    exact = _exact()
    hyper, info = hg.cg(f, g, W, H, 10, 1e-12, return_info=True)
    torch.testing.assert_close(hyper, exact, rtol=1e-10, atol=1e-14)
    assert info.num_hvps == 2 and info.status == "converged"
    hyper, info = hg.cg(f, g, W, H, 10, 0.5, return_info=True)  # loose: one CG step
    assert info.num_hvps == 1 and info.relative_residual <= 0.5
    assert float((hyper - exact).norm() / exact.norm()) < 0.5
