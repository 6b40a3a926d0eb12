"""Found by fuzzing the functional API against float64 references (twenty-fourth session):
a float16 mixed product that lost a small solution's digits, and a residual that overflowed
to NaN and silenced the "worse than x = 0" warning."""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

F16 = torch.float16


@pytest.mark.parametrize("solver", [hg.Exact, lambda: hg.CG(maxiter=5, tol=1e-2)])
@pytest.mark.parametrize(("S", "s"), [(1e3, 1e-3), (1e4, 1e-3), (2e4, 1e-4)])
def test_a_small_solution_keeps_its_digits_on_float16_parameters(solver, S, s):
    # f = S (theta^2 / 2 - theta phi): H = S, d_phi grad f = -S; g = s (theta - 1)^2 / 2.
    # x = H^-1 s (theta - 1) ~ s / S: below float16's normal range (6.1e-5) it lost 10%
    # (S = 1e4) of the hypergradient s (phi - 1), a normal float16 number, with no warning;
    # below its subnormals (6e-8: S = 2e4, s = 1e-4) all of it
    phi = torch.tensor([1.5, -1.0], dtype=F16)

    def f(th, ph):
        return S * (0.5 * (th**2).sum() - (th * ph).sum())

    def g(th, ph):
        return s * 0.5 * ((th - 1) ** 2).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h = hg.implicit(f, g, phi.clone(), phi, solver=solver())
    true = s * (phi.double() - 1)
    assert float((h.double() - true).norm() / true.norm()) <= 2 * torch.finfo(F16).eps


def test_a_residual_that_overflows_warns():
    # float32, a Hessian of scale 1e30 and a rank-1 Nystrom with rho = 1e-12: its x is 1e41
    # times too large, H x overflows, ||b - H x|| is NaN, and "NaN > ||b||" was False
    g64 = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g64, dtype=torch.float64))
    A = 1e30 * Q @ torch.diag(torch.tensor([1.0, 0.5, 0.3, 0.2], dtype=torch.float64)) @ Q.T
    A32, t32 = A.float(), torch.randn(4, generator=g64).float()
    theta, phi = torch.randn(4, generator=g64), torch.randn(4, generator=g64)

    def f(th, ph):
        return 0.5 * th @ (A32 @ th) - th @ ph

    def g(th, ph):
        return 0.5 * ((th - t32) ** 2).sum()

    solver = hg.Nystrom(rank=1, rho=1e-12, seed=0)
    with pytest.warns(hg.HypergradientWarning, match="overflows: x is far too large"):
        _, info = hg.implicit(f, g, theta, phi, solver=solver, return_info=True)
    assert info.residual_norm != info.residual_norm  # NaN: reported as it is


def test_parameters_on_the_meta_device_are_refused_by_name():
    w, h = torch.zeros(3, device="meta"), torch.zeros(1, device="meta")
    with pytest.raises(ValueError, match="`params` and `hparams` are on the meta device.*to_empty"):
        hg.implicit(lambda p, q: (p**2).sum() * q.sum(), lambda p, q: p.sum(), w, h)
