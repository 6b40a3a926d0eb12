"""``hg.Exact`` on half-precision products (bfloat16/float16 parameters, or autocast).

The materialized matrix is the Hessian rounded at the products' eps; Exact solved it to
1e-14 and reported status "exact" with nothing in its stats, silently, while on a
quadratic of condition number 3.2e3 the hypergradient was 11 % off (bfloat16 parameters)
and 3.5 % off (bfloat16 autocast). It now reports ``precision_limited``, ``product_eps``
and ``error_bound`` (cond * eps) and warns when the bound exceeds 0.1; float32 products
and well-conditioned half-precision solves stay silent. Reference: the closed form
``dg/dh = -c^T (A + h I)^{-1} w*`` in float64.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

F64 = torch.float64
N = 20


def _quadratic(top: float):
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=F64))
    A = Q @ torch.diag(torch.logspace(0, top, N, dtype=F64)) @ Q.T
    b = torch.randn(N, generator=g, dtype=F64)
    c = torch.randn(N, generator=g, dtype=F64)
    h = torch.tensor(0.1, dtype=F64)
    H = A + h * torch.eye(N, dtype=F64)
    w = torch.linalg.solve(H, b)  # the inner minimizer
    ref = float(-c @ torch.linalg.solve(H, w))
    x = torch.linalg.solve(H, c)  # the solve's exact answer, H^{-1} grad_w g

    def f(w, h):
        return (
            0.5 * (w * (A.to(w.dtype) @ w)).sum()
            - (b.to(w.dtype) * w).sum()
            + 0.5 * h * (w * w).sum()
        )

    def gfun(w, h):
        return (c.to(w.dtype) * w).sum()

    return f, gfun, w, h, ref, x, float(torch.linalg.cond(H))


def _solve(top, dtype, autocast=False):
    f, gfun, w, h, ref, x, cond = _quadratic(top)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always", hg.HypergradientWarning)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, info = hg.implicit(
                f,
                gfun,
                w.to(dtype),
                h.float(),
                solver=hg.Exact(),
                return_info=True,
                stationarity=None,
            )
    err = abs(float(out) - ref) / abs(ref)
    info.solution_error = float((info.solution.double() - x).norm() / x.norm())
    return err, info, [str(r.message) for r in rec], cond


@pytest.mark.parametrize(
    "dtype, autocast", [(torch.bfloat16, False), (torch.float32, True), (torch.float16, False)]
)
def test_ill_conditioned_half_products_say_so(dtype, autocast):
    err, info, messages, cond = _solve(3.5, dtype, autocast)
    eps = torch.finfo(torch.bfloat16 if autocast else dtype).eps
    assert info.status == "exact"
    assert info.stats["precision_limited"] is True
    assert info.stats["product_eps"] == eps
    # the rounded matrix's condition number: within a factor 2 of the Hessian's
    assert cond * eps / 2 < info.stats["error_bound"] < 2 * cond * eps
    assert info.stats["error_bound"] > 0.1
    assert info.solution_error < info.stats["error_bound"]  # the bound holds
    assert any("rounded matrix" in m and "error_bound" in m for m in messages), messages
    if dtype == torch.bfloat16 or autocast:
        assert err > 1e-2  # measured 1.1e-1 (bf16) and 3.5e-2 (autocast): worth the warning


def test_float32_products_stay_silent_and_accurate():
    err, info, messages, _ = _solve(3.5, torch.float32)
    assert err < 1e-4
    assert "error_bound" not in info.stats and "precision_limited" not in info.stats
    assert not [m for m in messages if "rounded matrix" in m]


def test_well_conditioned_half_products_stay_silent():
    _, info, messages, cond = _solve(0.5, torch.bfloat16)
    assert cond < 4
    assert info.stats["precision_limited"] is True
    assert info.stats["error_bound"] < 0.1
    # the solve is as good as the bound says (the scalar hypergradient c^T H^-1 w cancels:
    # its error in bfloat16 is larger, the solve's is not the cause)
    assert info.solution_error < info.stats["error_bound"]
    assert not [m for m in messages if "rounded matrix" in m], messages


def test_the_fixed_point_form_says_so_too():
    """``hg.implicit_fixed_point`` + Exact solves ``I - J^T`` by LU (no eigenvalues): on
    bfloat16 products the hypergradient was 4.9 times off, status "exact", silently."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=F64))
    A = Q @ torch.diag(torch.logspace(0, 3.5, N, dtype=F64)) @ Q.T
    b = torch.randn(N, generator=g, dtype=F64)
    c = torch.randn(N, generator=g, dtype=F64)
    h = torch.tensor(0.1, dtype=F64)
    H = A + h * torch.eye(N, dtype=F64)
    w = torch.linalg.solve(H, b)
    ref = float(-c @ torch.linalg.solve(H, w))
    lr = 1.0 / 3300

    def step(w, h):
        return w - lr * (A.to(w.dtype) @ w - b.to(w.dtype) + h * w)

    def gfun(w, h):
        return (c.to(w.dtype) * w).sum()

    def run(dtype, hdtype):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always", hg.HypergradientWarning)
            out, info = hg.implicit_fixed_point(
                step, gfun, w.to(dtype), h.to(hdtype), solver=hg.Exact(), return_info=True
            )
        return abs(float(out) - ref) / abs(ref), info, [str(r.message) for r in rec]

    err, info, messages = run(torch.float64, F64)
    assert err < 1e-10 and "error_bound" not in info.stats and not messages
    err, info, messages = run(torch.bfloat16, torch.float32)
    assert err > 1.0  # measured 4.9
    assert info.status == "exact" and info.stats["precision_limited"] is True
    assert info.stats["error_bound"] > err  # measured 78
    assert any("rounded matrix" in m for m in messages), messages
