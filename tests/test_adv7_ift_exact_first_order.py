"""``Exact()`` with finite-difference products (``hvp="first_order"``, also where
``hvp="auto"`` falls back to them) reported status "exact" and a relative residual of 1e-15
against its differenced matrix, silently, while the true residual against the Hessian was
9.6e-6 (float32) and the hypergradient 4e-6 off: it now says ``precision_limited``,
``finite_difference_products`` and ``product_eps`` and warns."""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg


def _problem(dtype):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 3, generator=g, dtype=torch.float64)
    y = torch.randn(20, generator=g, dtype=torch.float64)
    W0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    v0 = torch.randn(4, generator=g, dtype=torch.float64)

    def f(p, h):
        out = torch.tanh(X.to(p["W"].dtype) @ p["W"]) @ p["v"]
        reg = (p["W"] ** 2).sum() + (p["v"] ** 2).sum()
        return ((out - y.to(out.dtype)) ** 2).mean() + h * reg

    def gv(p, h):
        out = torch.tanh(X.to(p["W"].dtype) @ p["W"]) @ p["v"]
        return (out**2).mean()

    params = {"W": W0.to(dtype), "v": v0.to(dtype)}
    return f, gv, params, torch.tensor(0.1, dtype=dtype)


def _reference(damping):
    f, gv, params, h = _problem(torch.float64)
    th = torch.cat([params["W"].reshape(-1), params["v"]])

    def split(t):
        return {"W": t[:12].reshape(3, 4), "v": t[12:]}

    H = torch.func.hessian(lambda t: f(split(t), h))(th) + damping * torch.eye(16, dtype=th.dtype)
    M = torch.func.jacfwd(torch.func.grad(lambda t, hh: f(split(t), hh)), argnums=1)(th, h)
    b = torch.func.grad(lambda t: gv(split(t), h))(th)
    return -(M @ torch.linalg.solve(H, b)), H, b  # gv has no direct term


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_on_differenced_products_says_so(dtype):
    ref, H, b = _reference(1.0)
    f, gv, params, h = _problem(dtype)
    with pytest.warns(hg.HypergradientWarning, match="central differences"):
        hyper, info = hg.Implicit(hg.Exact(), damping=1.0, hvp="first_order")(
            hg.Problem(f, gv, params, h)
        )
    assert info.stats["precision_limited"] and info.stats["finite_difference_products"]
    eps = torch.finfo(dtype).eps ** (2 / 3)
    assert info.stats["product_eps"] == pytest.approx(eps)
    # the reported residual is the differenced matrix's; the Hessian's is far larger
    true = float((b - H @ info.solution.double()).norm() / b.norm())
    assert info.relative_residual < 1e-13 < 1e-3 * true
    assert float((hyper.double() - ref).abs() / ref.abs()) < 100 * eps  # as good as products


def test_exact_on_double_backward_products_stays_silent():
    # damping 5: H + I has 5 negative eigenvalues here (lowest -2.81), which Exact now
    # reports with a warning (tests/test_adv13_identities_exact_saddle.py); H + 5 I is
    # positive definite, so the solve has nothing to warn about
    ref, _, _ = _reference(5.0)
    f, gv, params, h = _problem(torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)
        hyper, info = hg.Implicit(hg.Exact(), damping=5.0, hvp="double")(
            hg.Problem(f, gv, params, h)
        )
    assert "precision_limited" not in info.stats
    assert float((hyper - ref).abs() / ref.abs()) < 1e-12
