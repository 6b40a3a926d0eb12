"""Norms of large float32 vectors read by float32 rows (``_norms.py``) and CG's use of
them: against float64 norms, at the edges of float32's range, and CG's iterates, residuals and
decisions against the exact float64 reads."""

from __future__ import annotations

import math

import pytest
import torch

import hypergradient as hg
from hypergradient._norms import ROW, ROW_SQUARES, ROWS_FROM, in_rows, row_norms
from hypergradient.operators import LinearOperator
from hypergradient.solvers import cg as cg_module
from hypergradient.solvers import neumann as neumann_module

F64 = torch.float64


def exact(v: torch.Tensor) -> float:
    return torch.linalg.vector_norm(v.to(F64)).item()


@pytest.mark.parametrize("n", [ROWS_FROM, ROWS_FROM + 17, 5 * ROWS_FROM + ROW - 1])
def test_row_norms_match_float64_norms(n):
    """Random float32 vectors of widely spread magnitudes, with and without a remainder after
    the rows: every norm within a few float32 roundings of the float64 norm."""
    g = torch.Generator().manual_seed(n)
    vs = tuple(
        torch.randn(n, generator=g) * 10.0 ** (6 * torch.rand(n, generator=g) - 3) for _ in range(4)
    )
    assert all(in_rows(v, F64) for v in vs)
    got = row_norms(vs, F64)
    assert got is not None
    for v, value in zip(vs, got):
        assert abs(value - exact(v)) <= 4 * torch.finfo(torch.float32).eps * exact(v)


def test_row_norms_decline_what_float32_rows_cannot_read():
    """Below ``sqrt(n) ROW_SQUARES`` (squares underflow in float32), beyond float32's squares
    (a row norm overflows), NaN: None, so the caller reads exactly; small, float64 or strided
    vectors are not read by rows at all."""
    n = ROWS_FROM + 3
    ok = torch.ones(n)
    floor = math.sqrt(n) * ROW_SQUARES
    tiny = torch.full((n,), 0.5 * floor / math.sqrt(n))  # ||tiny|| = floor / 2
    assert row_norms((ok, tiny), F64) is None
    assert row_norms((ok, torch.full((n,), 2 * floor / math.sqrt(n))), F64) is not None
    assert row_norms((ok, torch.full((n,), 1e20)), F64) is None  # 1e40 overflows float32
    nan = ok.clone()
    nan[5] = float("nan")
    assert row_norms((nan,), F64) is None
    assert not in_rows(torch.ones(ROWS_FROM - 1), F64)
    assert not in_rows(torch.ones(ROWS_FROM, dtype=F64), F64)
    assert not in_rows(torch.ones(2 * ROWS_FROM)[::2], F64)
    assert not in_rows(ok, torch.float32)  # MPS's wide dtype: nothing to gain


class Diagonal(LinearOperator):
    """``A = diag(d)`` with a rank-one term ``u u^T``: a float32 SPD system, any size."""

    def __init__(self, d: torch.Tensor, u: torch.Tensor):
        super().__init__(d.numel(), d.dtype, d.device)
        self.d, self.u = d, u

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.d * v + self.u * torch.dot(self.u, v)

    def solve64(self, b: torch.Tensor) -> torch.Tensor:
        """Sherman-Morrison in float64."""
        d, u, b = self.d.to(F64), self.u.to(F64), b.to(F64)
        y, z = b / d, u / d
        return y - z * torch.dot(u, y) / (1.0 + torch.dot(u, z))


def system(n: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(0)
    d = scale * (1.0 + 9.0 * torch.rand(n, generator=g))
    u = math.sqrt(scale) * torch.randn(n, generator=g) / math.sqrt(n)
    return Diagonal(d, u), torch.randn(n, generator=g)


@pytest.mark.parametrize("tol", [0.0, 1e-4])
def test_cg_by_rows_takes_the_same_steps_as_the_float64_reads(monkeypatch, tol):
    """CG on a float32 system of 40,000 unknowns: the same iterates bit for bit (norms do not
    enter the step sizes), the same number of steps and status, a residual within float32
    roundings of the exact read, and the answer near the float64 solution."""
    op, b = system(40_000)
    fast = hg.CG(maxiter=30, tol=tol).solve(op, b)
    monkeypatch.setattr(cg_module, "in_rows", lambda t, wide: False)
    slow = hg.CG(maxiter=30, tol=tol).solve(op, b)
    assert torch.equal(fast.value, slow.value)
    assert (fast.iterations, fast.status, fast.num_hvps) == (
        slow.iterations,
        slow.status,
        slow.num_hvps,
    )
    assert fast.residual_norm == pytest.approx(slow.residual_norm, rel=1e-6)
    ref = op.solve64(b)
    assert (fast.value.to(F64) - ref).norm() / ref.norm() < (1e-3 if tol else 1e-5)


def test_cg_reads_exactly_where_rows_could_underflow(monkeypatch):
    """An operator of scale 1e-36: ``||A p||`` is below what float32 rows read to rounding, so
    every step reads its norms in float64 (the solve equals the exact path's in every field)."""
    op, b = system(40_000, scale=1e-36)
    calls = []
    real = cg_module.row_norms
    monkeypatch.setattr(cg_module, "row_norms", lambda v, w: calls.append(real(v, w)) or calls[-1])
    fast = hg.CG(maxiter=10, tol=0.0).solve(op, b)
    assert calls and all(c is None for c in calls)
    monkeypatch.setattr(cg_module, "in_rows", lambda t, wide: False)
    slow = hg.CG(maxiter=10, tol=0.0).solve(op, b)
    assert torch.equal(fast.value, slow.value) and fast.residual_norm == slow.residual_norm
    assert fast.stats == slow.stats


def test_cg_by_rows_allocates_no_norm_buffer(monkeypatch):
    """The float32-rows path reads the norms in place: the ``(4, n)`` buffer of the stacked
    read (16 bytes per unknown) is allocated only on the path that uses it."""
    runs = []
    init = cg_module._Run.__init__
    monkeypatch.setattr(
        cg_module._Run, "__init__", lambda s, *a, **k: init(s, *a, **k) or runs.append(s)
    )
    op, b = system(40_000)
    hg.CG(maxiter=5, tol=0.0).solve(op, b)
    assert runs[-1].by_rows and runs[-1].rows is None
    monkeypatch.setattr(cg_module, "in_rows", lambda t, wide: False)
    hg.CG(maxiter=5, tol=0.0).solve(op, b)
    assert runs[-1].rows is not None and runs[-1].rows.shape == (4, 40_000)


@pytest.mark.parametrize("tol", [None, 0.05])
def test_neumann_by_rows_sums_the_same_series_as_the_float64_reads(monkeypatch, tol):
    """Neumann on the float32 system of 40,000 unknowns: the same partial sum bit for bit, the
    same number of terms and status, its residual within float32 roundings of the exact read,
    and the answer at the series' float64 closed form."""
    op, b = system(40_000)
    alpha = 1.0 / 12.0  # lambda_max <= 10 + ||u||^2 ~ 11
    fast = hg.Neumann(40, alpha=alpha, tol=tol).solve(op, b)
    monkeypatch.setattr(neumann_module, "in_rows", lambda t, wide: False)
    slow = hg.Neumann(40, alpha=alpha, tol=tol).solve(op, b)
    assert torch.equal(fast.value, slow.value)
    assert (fast.iterations, fast.status) == (slow.iterations, slow.status)
    if tol is None:
        assert fast.residual_norm == slow.residual_norm  # the fixed budget reports None
    else:
        assert fast.status == "converged" and fast.iterations < 40
        assert fast.residual_norm == pytest.approx(slow.residual_norm, rel=1e-6)
    term, total = b.to(F64), b.to(F64).clone()
    d, u = op.d.to(F64), op.u.to(F64)
    for _ in range(fast.iterations - (tol is not None)):  # a converged last term is not added
        term = term - alpha * (d * term + u * torch.dot(u, term))
        total = total + term
    ref = alpha * total
    assert (fast.value.to(F64) - ref).norm() / ref.norm() < 1e-5
