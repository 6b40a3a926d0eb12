"""CG's iterates in reused buffers (``cg_status.next_iterate``) and the norms of its four
vectors read at once (``_norms.row_norms``): results equal, bit for bit, to fresh tensors at
every step and to one read per vector, on the runs where the buffers matter (a kept best
iterate several steps old, verified and replaced residuals)."""

from __future__ import annotations

import math

import pytest
import torch

import hypergradient as hg
from hypergradient import _norms
from hypergradient._norms import ROW, ROWS_FROM, norm_parts, row_norms
from hypergradient.operators import LinearOperator
from hypergradient.solvers import cg as cg_module
from hypergradient.solvers import cg_status

F64 = torch.float64


class Diagonal(LinearOperator):
    """``diag(d)``: any spectrum (indefinite, ill-conditioned), any size."""

    def __init__(self, d: torch.Tensor):
        super().__init__(d.numel(), d.dtype, d.device)
        self.d = d

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.d * v


def fresh(run) -> torch.Tensor:
    """The former behaviour: a new tensor for every iterate."""
    return torch.empty_like(run.r)


def same(a, b) -> None:
    assert torch.equal(a.value, b.value)
    assert torch.equal(a.value.signbit(), b.value.signbit())
    assert a.residual_norm == b.residual_norm
    assert (a.iterations, a.status, a.num_hvps, a.converged) == (
        b.iterations,
        b.status,
        b.num_hvps,
        b.converged,
    )
    assert a.stats == b.stats


def traced(monkeypatch):
    """Record ``(rnorm, id of y's buffer)`` after every step, and every buffer handed out."""
    steps, slots = [], []
    step, handed = cg_module._Run._step, cg_module.next_iterate

    def record_step(run):
        out = step(run)
        steps.append((run.rnorm, run.y.data_ptr()))
        return out

    def record_slot(run):
        slot = handed(run)
        slots.append(slot.data_ptr())
        return slot

    monkeypatch.setattr(cg_module._Run, "_step", record_step)
    monkeypatch.setattr(cg_module, "next_iterate", record_slot)
    return steps, slots


DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [40, 40_000])
def test_a_best_iterate_kept_for_steps_survives_the_buffers(monkeypatch, dtype, n):
    """Indefinite ``diag(linspace(-0.05, 3))``: the residual is smallest at step 3, rises,
    and the run stops on negative curvature at step 9, returning that step-3 iterate. With
    three buffers rotating past it, the answer is the one of fresh tensors, bit for bit."""
    d = torch.linspace(-0.05, 3.0, n, dtype=dtype)
    b = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=dtype)
    steps, slots = traced(monkeypatch)
    got = hg.CG(maxiter=200, tol=0.0).solve(Diagonal(d), b)
    norms = [s[0] for s in steps]
    best = min(range(len(norms)), key=norms.__getitem__)
    assert got.status == "negative_curvature" and len(steps) - best >= 3  # kept 3+ steps
    assert len(set(slots)) <= 3 and len(slots) >= len(steps) - 1
    assert got.residual_norm == pytest.approx(norms[best] * float(b.to(F64).norm()), rel=1e-5)
    # the kept iterate is what the residual says: b - A x read exactly
    exact = (b.to(F64) - d.to(F64) * got.value.to(F64)).norm()
    assert float(exact) == pytest.approx(got.residual_norm, rel=1e-3)
    monkeypatch.setattr(cg_module, "next_iterate", fresh)
    same(got, hg.CG(maxiter=200, tol=0.0).solve(Diagonal(d), b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("low", [-1, -3])
def test_verified_and_replaced_residuals_equal_fresh_iterates(monkeypatch, dtype, low):
    """SPD ``diag(logspace(low, 1))`` of 40,000 unknowns from a warm start, ``tol=0``: to
    rounding level through a verification (``low=-1``: ``verify_hvps``, in float32 a
    replaced residual and a restart; the iterate a check read is ``run.checked``), or 400
    steps and the exit's recheck (``low=-3``): the answer of fresh tensors, bit for bit."""
    n = 40_000
    g = torch.Generator().manual_seed(1)
    d = torch.logspace(low, 1, n, dtype=dtype)
    b = torch.randn(n, generator=g, dtype=dtype)
    x0 = 1e-3 * torch.randn(n, generator=g, dtype=dtype)
    steps, slots = traced(monkeypatch)
    got = hg.CG(maxiter=400, tol=0.0).solve(Diagonal(d), b, x0)
    assert "start_residual" in got.stats and len(set(slots)) <= 3 and len(steps) >= 60
    assert (got.stats.get("verify_hvps", 0) >= 1) == (low == -1)
    exact = (b.to(F64) - d.to(F64) * got.value.to(F64)).norm() / b.to(F64).norm()
    assert float(exact) < (2e-3 if low == -3 else 1e-3 if dtype == torch.float32 else 1e-12)
    monkeypatch.setattr(cg_module, "next_iterate", fresh)
    same(got, hg.CG(maxiter=400, tol=0.0).solve(Diagonal(d), b, x0))


def test_next_iterate_skips_the_current_and_best_and_forgets_a_checked_one():
    class Run:
        pass

    run = Run()
    run.r, run.slots, run.best, run.checked = torch.zeros(3), [], None, None
    run.y = torch.zeros(3)  # the start: not a buffer
    a = cg_status.next_iterate(run)
    run.y = run.best = run.checked = a
    b_ = cg_status.next_iterate(run)
    assert b_ is not a and run.checked is a
    run.y = b_  # best stays a
    c = cg_status.next_iterate(run)
    assert c is not a and c is not b_ and len(run.slots) == 3
    run.y, run.best = c, c  # a is free again: reused, and its check forgotten
    assert cg_status.next_iterate(run) is a and run.checked is None and len(run.slots) == 3


def one_at_a_time(vectors, wide=F64) -> list[float]:
    """The norms as :func:`norm_parts` reads each vector alone."""
    out = []
    for v in vectors:
        parts = [float(p) for p in norm_parts(v, wide)]
        out.append(parts[0] if len(parts) == 1 else math.hypot(*parts))
    return out


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("n", [ROWS_FROM, ROWS_FROM + 17, 3 * ROWS_FROM + ROW - 1, 203_530])
@pytest.mark.parametrize("k", [2, 4])
def test_row_norms_read_together_give_the_bits_of_one_at_a_time(n, k, threads):
    """Vectors of spread magnitudes (1e-15 .. 1e15), with and without a remainder after the
    rows, at 1, 2 and 4 threads: the stacked read equals the per-vector one bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(n + k)
        scales = 10.0 ** torch.randint(-15, 16, (k,), generator=g).double()
        vs = tuple(float(s) * torch.randn(n, generator=g) for s in scales)
        assert row_norms(vs, F64) == one_at_a_time(vs)
    finally:
        torch.set_num_threads(before)


def test_row_norms_reduce_once_per_stage(monkeypatch):
    """Four vectors read by rows: one reduction per vector's rows, one combining all the row
    norms, one for all the remainders (was three per vector); mixed lengths (or a vector not
    read by rows) are read one at a time, as before."""
    calls = []
    real = torch.linalg.vector_norm
    monkeypatch.setattr(
        torch.linalg, "vector_norm", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    n = ROWS_FROM + 17
    vs = tuple(torch.randn(n) for _ in range(4))
    got = row_norms(vs, F64)
    assert len(calls) == 4 + 2
    calls.clear()
    mixed = (*vs[:3], torch.randn(n + 1))
    got_mixed = row_norms(mixed, F64)
    assert len(calls) == 4 * 3  # rows, their combination, the remainder: per vector
    monkeypatch.setattr(torch.linalg, "vector_norm", real)
    assert got == one_at_a_time(vs) and got_mixed == one_at_a_time(mixed)
    assert _norms.in_rows(vs[0], F64)
