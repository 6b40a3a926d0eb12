"""Unread norms of large float32 vectors by float32 rows (``_norms.wide_norm``) where
the implicit call read them in float64 (the terms' norms, ``||b||`` in the solvers, the
stationarity floor's leaf norms and sampled products): the same values to float32 roundings,
the exact float64 norm wherever rows may be off, and the same decisions on a real call."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

import hypergradient as hg
from hypergradient import _norms as norms
from hypergradient._norms import ROW_SQUARES, ROWS_FROM, exact_where_off, wide_norm
from hypergradient.operators import hessian as hessian_module
from hypergradient.solvers import cg as cg_module
from hypergradient.solvers.base import safe_norm

F64 = torch.float64


def exact(v: torch.Tensor) -> float:
    return torch.linalg.vector_norm(v, dtype=F64).item()


def edge_vectors(n: int) -> list[torch.Tensor]:
    """Spread magnitudes, a remainder after the rows or none, then what float32 rows cannot
    read: squares below float32's range, squares beyond it, NaN, Inf, zero."""
    g = torch.Generator().manual_seed(n)
    spread = torch.randn(n, generator=g) * 10.0 ** (6 * torch.rand(n, generator=g) - 3)
    nan, inf = torch.ones(n), torch.ones(n)
    nan[3], inf[7] = math.nan, math.inf
    tiny = torch.full((n,), 0.5 * ROW_SQUARES)
    return [spread, tiny, torch.full((n,), 1e20), nan, inf, torch.zeros(n)]


@pytest.mark.parametrize("n", [ROWS_FROM, ROWS_FROM + 17])
def test_wide_norm_read_as_the_float64_norm(n):
    """Each vector's read value, after ``exact_where_off``, is the float64 norm: to a few
    float32 roundings where rows read it, exactly (NaN and Inf alike) where they may not."""
    vs = edge_vectors(n)
    got = torch.stack([wide_norm(v, F64) for v in vs]).tolist()
    exact_where_off(got, list(enumerate(vs)), F64)
    first, *rest = got
    assert abs(first - exact(vs[0])) <= 4 * torch.finfo(torch.float32).eps * exact(vs[0])
    for value, v in zip(rest, vs[1:]):
        want = exact(v)
        assert value == want or (math.isnan(value) and math.isnan(want))
    assert wide_norm(torch.ones(ROWS_FROM - 1), F64).item() == exact(torch.ones(ROWS_FROM - 1))


@pytest.mark.parametrize("n", [ROWS_FROM, 3 * ROWS_FROM + 5])
def test_safe_norm_and_sampled_products_as_before(n):
    """``safe_norm`` and a HessianOperator's sampled ``(||H v||, ||v||)``: float64 values to
    float32 roundings, exactly the float64 ones where rows may be off."""
    eps = 4 * torch.finfo(torch.float32).eps
    for v in edge_vectors(n):
        want = exact(v)
        if not 0.0 < want < math.inf:
            continue  # safe_norm's own zero / non-finite path, unchanged
        assert safe_norm(v) == pytest.approx(want, rel=eps)
        out, w = hessian_module._sample_norms(v, torch.ones(n), F64)
        assert out.dtype == w.dtype == F64
        assert out.item() == pytest.approx(want, rel=eps)
        assert w.item() == pytest.approx(math.sqrt(n), rel=eps)


def _call(monkeypatch, by_rows: bool):
    """Implicit calls on a float32 MLP of 50,890 parameters away from its minimum (the
    stationarity check warns) and on a 40,000-parameter quadratic at its float32-rounded
    minimum (its rounding floor keeps it silent)."""
    if not by_rows:
        monkeypatch.setattr(norms, "in_rows", lambda t, wide: False)
        monkeypatch.setattr(cg_module, "in_rows", lambda t, wide: False)
        monkeypatch.setattr(hessian_module, "in_rows", lambda t, wide: False)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(784, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    params = {k: v.detach().requires_grad_() for k, v in net.named_parameters()}
    decay = torch.full((64, 1), 1e-2, requires_grad=True)
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    xv, yv = torch.randn(128, 784), torch.randint(0, 10, (128,))

    def loss(p, xs, ys):
        return torch.nn.functional.cross_entropy(torch.func.functional_call(net, p, (xs,)), ys)

    def inner(p, h):
        return loss(p, x, y) + 0.5 * (h * p["0.weight"] ** 2).sum()

    outs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for damping in (0.0, 1.0):
            hg_, info = hg.implicit(
                inner,
                lambda p, h: loss(p, xv, yv),
                params,
                decay,
                hg.CG(maxiter=10, tol=0.0),
                damping=damping,
                return_info=True,
            )
            outs.append((hg_, info))
        g = torch.Generator().manual_seed(1)
        d, c = 1.0 + torch.rand(40_000, generator=g), torch.randn(40_000, generator=g)
        h = torch.tensor(0.7, requires_grad=True)
        theta = 0.7 * c.double() * (1 + 1e-7 * torch.randn(40_000, generator=g, dtype=F64))
        theta = theta.float().requires_grad_()  # the minimum to float32 roundings
        outs.append(
            hg.implicit(
                lambda t, h: 0.5 * (d * (t - h * c) ** 2).sum(),
                lambda t, h: (t**2).sum(),
                theta,
                h,
                hg.CG(maxiter=5, tol=0.0),
                return_info=True,
            )
        )
    texts = [re.sub(r"[-+]?[0-9][0-9.e+-]*", "#", str(w.message))[:120] for w in caught]
    return outs, [w.category for w in caught], texts


def test_implicit_call_decides_as_with_float64_reads(monkeypatch):
    """The same hypergradient bit for bit (the norms enter no arithmetic), statuses,
    products and warnings, and the reported norms and floor to float32 roundings."""
    fast, kinds, texts = _call(monkeypatch, by_rows=True)
    slow, kinds0, texts0 = _call(monkeypatch, by_rows=False)
    assert kinds == kinds0 and texts == texts0
    for (g1, a), (g0, b) in zip(fast, slow):
        assert torch.equal(g1, g0)
        assert (a.status, a.num_hvps, a.iterations) == (b.status, b.num_hvps, b.iterations)
        for key in ("inner_grad_norm", "outer_grad_norm", "inner_grad_floor", "residual_norm"):
            assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-5), key
