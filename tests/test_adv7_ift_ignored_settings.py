"""Settings that configure nothing were accepted silently: ``IFT(hg.CG(), maxiter=3)`` ran
CG's 100 iterations (``maxiter``, ``alpha``, ``power_iters``, ``refresh_every`` and ``seed``
configure IFT's default Neumann series only)."""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg


@pytest.mark.parametrize(
    "kwargs",
    [{"maxiter": 3}, {"alpha": 0.1}, {"power_iters": 5}, {"refresh_every": 2}, {"seed": 0}],
)
def test_ift_refuses_series_settings_with_a_solver(kwargs):
    (name,) = kwargs
    with pytest.raises(ValueError, match=f"`{name}`.*[Ss]et them on the solver"):
        hg.IFT(hg.CG(), **kwargs)
    hg.IFT(**kwargs)  # the default series takes them


def test_ift_with_a_solver_and_default_settings_still_works():
    H = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    phi = torch.tensor(0.3, dtype=torch.float64)

    def f(t, h):
        return 0.5 * t @ H @ t - h * t.sum()

    def g(t, h):
        return (t**2).sum()

    theta = torch.linalg.solve(H, phi * torch.ones(2, dtype=torch.float64))
    hyper, info = hg.IFT(hg.CG(maxiter=2, tol=0.0))(hg.Problem(f, g, theta, phi, lr=0.1))
    # dtheta/dphi = H^-1 1, dg/dphi = 2 theta . H^-1 1: exact after 2 CG steps in 2-D
    exact = 2 * theta @ torch.linalg.solve(H, torch.ones(2, dtype=torch.float64))
    assert info.num_hvps == 2
    assert float(hyper) == pytest.approx(float(exact), rel=1e-12)
