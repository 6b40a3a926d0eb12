"""Arguments that configure the estimated step (``alpha="auto"``) were silently ignored with a
fixed step: ``Neumann(alpha=0.5, alpha_max=0.1)`` stepped at 0.5, ``Neumann(seed=3)`` (alpha
1.0) ignored the seed, and ``IFT(alpha=0.1, power_iters=50)`` the products. They are refused,
naming each, before anything runs; with ``alpha="auto"`` they work as before."""

import pytest
import torch

import hypergradient as hg


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"alpha": 0.5, "alpha_max": 0.1}, "`alpha_max`"),
        ({"power_iters": 5}, "`power_iters`"),
        ({"alpha": 0.5, "seed": 3}, "`seed`"),
        ({"generator": torch.Generator()}, "`generator`"),
        ({"alpha": 0.5, "refresh_every": 4, "seed": 1}, "`seed`, `refresh_every`"),
    ],
)
def test_neumann_refuses_estimate_settings_with_a_fixed_step(kwargs, named):
    with pytest.raises(ValueError, match=f"does not use {named}: they configure alpha='auto'"):
        hg.Neumann(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"power_iters": 50}, {"refresh_every": 3}, {"seed": 0}, {"power_iters": 5, "seed": 1}],
)
def test_ift_refuses_estimate_settings_with_a_fixed_step(kwargs):
    with pytest.raises(ValueError, match=r"IFT\(alpha=0.1\) does not use"):
        hg.IFT(alpha=0.1, **kwargs)
    hg.IFT(alpha="auto", **kwargs)  # estimated: they apply
    hg.IFT(**kwargs)


def test_the_fixed_and_estimated_steps_still_solve():
    """Neumann with a fixed step and with an estimated one (seeded) against the dense solve."""
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0]
    A = Q @ torch.diag(torch.linspace(0.5, 2.0, 6, dtype=torch.float64)) @ Q.T
    b = torch.randn(6, generator=g, dtype=torch.float64)
    x = torch.linalg.solve(A, b)
    op = hg.MatrixOperator(A)
    fixed = hg.Neumann(200, alpha=0.5).solve(op, b).value
    auto = hg.Neumann(200, alpha="auto", seed=0, power_iters=30, alpha_max=0.5).solve(op, b).value
    # (1 - 0.5 * 0.5)^201 ~ 7e-26: both at rounding level
    assert torch.allclose(fixed, x, rtol=0, atol=1e-12)
    assert torch.allclose(auto, x, rtol=0, atol=1e-12)
