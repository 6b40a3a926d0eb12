"""The stationarity check's noise floor follows the dtype the inner gradient was computed in.

``hg.implicit`` warns when ``||grad_theta f|| > stationarity * ||grad_theta g||``, but not
below the gradient's rounding level. That level was ``sqrt(eps) (1 + |f|)`` with float64's
``eps`` (2.2e-8 at ``f ~ 0.5``), below float32 rounding: a float32 model at the float32-rounded
exact minimum of a ridge problem, with a small outer gradient, warned although its inner
gradient (3.5e-8) is rounding noise and the hypergradient is right to 1e-7. The floor is now
also ``8 eps (||H|| ||theta|| + sqrt(2 ||H|| |f|))`` in the gradient's dtype
(``ImplicitInfo.inner_grad_floor``; ``||H||`` from the solve's products).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

DT = torch.float64
N, ROWS = 8, 30


def _ridge(seed: int = 9):
    """A ridge problem: data, hyperparameters, its exact float64 minimum and Hessian."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(ROWS, N, generator=g, dtype=DT)
    y = torch.randn(ROWS, generator=g, dtype=DT)
    h = torch.full((N,), 0.5, dtype=DT)
    H = X.T @ X / ROWS + torch.diag(h)
    w = torch.linalg.solve(H, X.T @ y / ROWS)
    return X, y, h, H, w


def _losses(X, y, dtype, outer_scale):
    Xd, yd = X.to(dtype), y.to(dtype)

    def inner(p, hp):
        return ((Xd @ p - yd) ** 2).mean() / 2 + 0.5 * (hp * p * p).sum()

    def outer(p, hp):
        return outer_scale * ((p - 1) ** 2).sum()

    return inner, outer


def _run(dtype, w, outer_scale=1e-15, solver=None):
    X, y, h, H, _ = _ridge()
    inner, outer = _losses(X, y, dtype, outer_scale)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, info = hg.implicit(
            inner, outer, w.to(dtype), h.to(dtype), solver or hg.Exact(), return_info=True
        )
    stationarity = [c for c in caught if "stationarity=" in str(c.message)]
    return out, info, stationarity


def _reference(w, H):
    """``-w * H^{-1} 2 (w - 1)``: the exact hypergradient of ``sum (w - 1)^2`` (float64)."""
    return -(w * torch.linalg.solve(H, 2 * (w - 1)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_model_at_its_rounded_minimum_does_not_warn(dtype):
    _, _, _, H, w = _ridge()
    out, info, stationarity = _run(dtype, w)
    assert stationarity == []
    # the inner gradient is rounding noise, under the floor, above zero in float32
    assert info.inner_grad_norm <= info.inner_grad_floor
    if dtype == torch.float32:  # 3.5e-8, above the float64 floor 2.2e-8 it used to meet
        assert info.inner_grad_norm > 1.5e-8 * (1 + info.inner_loss)
    ref = _reference(w, H)
    rel = (out.to(DT) / 1e-15 - ref).norm() / ref.norm()
    assert rel < (1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_model_far_from_its_minimum_still_warns(dtype):
    _, _, _, _, w = _ridge()
    moved = w + 1e-3  # gradient ~ ||H|| 1e-3: far above either dtype's rounding
    _, info, stationarity = _run(dtype, moved)
    assert len(stationarity) == 1
    assert info.inner_grad_norm > 100 * info.inner_grad_floor


@pytest.mark.parametrize("solver", [hg.CG(maxiter=50), hg.Exact()])
def test_the_floor_is_the_rounding_bound_in_the_gradients_dtype(solver):
    # inner_grad_floor = 8 eps (||H|| ||theta|| + sqrt(2 ||H|| |f|)), ||H|| the largest
    # ||H v|| / ||v|| the solve met: CG's Krylov vectors and Exact's columns reach at least
    # ||H|| / sqrt(n) and at most ||H||
    from hypergradient.methods.implicit_info import GRAD_ROUNDING

    X, y, h, H, w = _ridge()
    top = float(torch.linalg.eigvalsh(H)[-1])
    theta = float(w.float().double().norm())
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        inner, outer = _losses(X, y, dtype, 1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, info = hg.implicit(
                inner, outer, w.to(dtype), h.to(dtype), solver, return_info=True, stationarity=None
            )
        eps = torch.finfo(dtype).eps
        loss = abs(info.inner_loss)
        high = GRAD_ROUNDING * eps * (top * theta + (2 * top * loss) ** 0.5)
        low = GRAD_ROUNDING * eps * (top / N**0.5 * theta + (2 * top / N**0.5 * loss) ** 0.5)
        assert low * 0.99 <= info.inner_grad_floor <= high * 1.01, dtype


def test_the_hessian_operator_reports_its_scale():
    X, y, h, H, w = _ridge()
    inner, _ = _losses(X, y, DT, 1.0)
    for mode in ("double", "first_order"):
        op = hg.HessianOperator(inner, w, h, mode=mode)
        assert op.scale == 0.0  # no product yet
        eye = torch.eye(N, dtype=DT)
        op.matmat(eye)
        want = float(H.norm(dim=0).max())  # the largest column norm ||H e_i||
        assert abs(op.scale - want) <= 1e-6 * want


def test_under_autocast_the_floor_uses_the_autocast_dtype():
    X, y, h, _, w = _ridge()
    inner, outer = _losses(X, y, torch.float32, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, plain = hg.implicit(inner, outer, w.float(), h.float(), hg.CG(), return_info=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, cast = hg.implicit(inner, outer, w.float(), h.float(), hg.CG(), return_info=True)
    ratio = cast.inner_grad_floor / plain.inner_grad_floor
    want = torch.finfo(torch.bfloat16).eps / torch.finfo(torch.float32).eps  # 65536
    assert 0.5 * want < ratio < 2 * want
