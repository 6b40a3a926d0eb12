"""``solvers.extremes``: ``max |v_i|`` and the all-zero test by ``torch.aminmax`` give the
values and decisions of the calls they replace (``vector_norm(ord=inf)``, ``v.any()``,
``count_nonzero``) on every kind of vector CG, Neumann, Nystrom and HOAG pass them; CG makes
``b / ||b||`` where it needs it instead of holding a copy."""

from __future__ import annotations

import math

import pytest
import torch

import hypergradient as hg
from hypergradient.solvers import cg as cg_module
from hypergradient.solvers.cg_status import unit_rhs
from hypergradient.solvers.extremes import MINMAX_FROM, max_abs, nonzero

SIZES = [0, 1, 31, MINMAX_FROM - 1, MINMAX_FROM, MINMAX_FROM + 7, 203_530]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _cases(n: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    v = torch.randn(n, generator=g).to(dtype)
    out = [v, torch.zeros(n, dtype=dtype), -torch.zeros(n, dtype=dtype), v.abs(), -v.abs()]
    if n:
        one = torch.zeros(n, dtype=dtype)
        one[n // 2] = -1e-3
        last = torch.zeros(n, dtype=dtype)
        last[-1] = torch.finfo(dtype).tiny
        out += [one, last]
        for special in (math.nan, math.inf, -math.inf):
            w = v.clone()
            w[n // 3] = special
            out += [w]
            lone = torch.zeros(n, dtype=dtype)
            lone[0] = special
            out += [lone]
    if n > 1:
        out += [v[::2], torch.stack([v, v])[:, 0]]  # non-contiguous
    return out


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_the_values_and_decisions_of_the_plain_calls(n: int, dtype: torch.dtype) -> None:
    for v in _cases(n, dtype):
        if v.numel():
            assert _same(max_abs(v), float(torch.linalg.vector_norm(v, ord=math.inf)))
            assert _same(max_abs(v), float(v.abs().max()))
        assert nonzero(v) == bool(v.any()) == bool(torch.count_nonzero(v))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_other_dtypes_take_the_plain_calls(dtype: torch.dtype) -> None:
    v = torch.zeros(MINMAX_FROM + 1, dtype=dtype)
    assert not nonzero(v)
    v[5] = 1
    assert nonzero(v)
    if dtype.is_complex:  # (vector_norm takes no integer or boolean tensor)
        assert max_abs(v) == float(torch.linalg.vector_norm(v, ord=math.inf)) == 1.0


def _spd(n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    eig = torch.logspace(0, 3, n, dtype=torch.float64)
    return ((q * eig) @ q.T).to(dtype), torch.randn(n, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("warm", [None, "good", "bad"])
def test_cg_holds_no_copy_of_the_normalized_right_hand_side(monkeypatch, warm) -> None:
    """CG makes ``b / ||b||`` where it needs it (``cg_status.unit_rhs``: the start's residual,
    a verification's true residual) instead of holding it through the products; the vector
    is the one it held (same bits), and the run's answer is the reference's to rounding."""
    runs = []
    init = cg_module._Run.__init__
    monkeypatch.setattr(
        cg_module._Run, "__init__", lambda s, *a, **k: init(s, *a, **k) or runs.append(s)
    )
    a, b = _spd(60, torch.float64, 0)
    x_ref = torch.linalg.solve(a, b)
    x0 = {None: None, "good": x_ref * 0.9, "bad": -50 * x_ref}[warm]
    sol = hg.CG(maxiter=200, tol=1e-10).solve(hg.MatrixOperator(a, symmetric=True), b, x0)
    run = runs[-1]
    held = [v for v in vars(run).values() if isinstance(v, torch.Tensor) and v.shape == b.shape]
    unit = torch.div(b, max_abs(b)).div_(run.bnorm / max_abs(b))
    assert not any(v is not run.r and torch.equal(v, unit) for v in held)
    assert torch.equal(unit_rhs(run), unit)
    assert sol.converged and torch.allclose(sol.value, x_ref, rtol=1e-7, atol=1e-9)
    assert bool(sol.stats.get("warm_start_dropped")) == (warm == "bad")
