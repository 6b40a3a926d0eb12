"""CG hands a HessianOperator the norms of ``A p`` and ``p`` it reads at every step, for the
operator's scale samples (``||H v|| / ||v||`` at products 1, 2, 4, 8, ...), instead of the
operator norming both vectors again: the same scale, two passes over two vectors fewer per
sample. A curvature exit (no norms read) and any other solver still sample; a deferred
vector changed in place before its norms arrive is not sampled at all (never a wrong
ratio)."""

from __future__ import annotations

import torch

import hypergradient as hg
import hypergradient.operators.hessian as hessian

DT = torch.float64


def _problem(eigenvalues, seed=0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    A = (Q * torch.tensor(eigenvalues, dtype=DT)) @ Q.T
    w = torch.randn(n, generator=g, dtype=DT).to(dtype)
    h = torch.tensor(0.3, dtype=dtype)
    f = lambda w, h: 0.5 * w @ A.to(dtype) @ w + h * w.sum()  # noqa: E731
    return A, f, w, h


def _counting(monkeypatch):
    calls = []
    sample = hessian._sample_norms
    monkeypatch.setattr(hessian, "_sample_norms", lambda *a: calls.append(1) or sample(*a))
    return calls


def _ratios(A, vectors):
    return [float((A @ v).norm() / v.norm()) for v in vectors]


def test_cg_gives_its_norms_and_the_scale_is_the_samples_ratio(monkeypatch):
    calls = _counting(monkeypatch)
    A, f, w, h = _problem(torch.logspace(0, 3, 12).tolist())
    op = hg.HessianOperator(f, w, h)
    b = torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=DT)
    seen = []
    matvec = op.matvec
    monkeypatch.setattr(op, "matvec", lambda v: seen.append(v.clone()) or matvec(v))
    sol = hg.CG(maxiter=8, tol=0.0).solve(op, b)
    assert sol.num_hvps == 8 and calls == []  # every sample took CG's norms
    want = max(_ratios(A, [seen[i] for i in (0, 1, 3, 7)]))  # products 1, 2, 4, 8
    assert abs(op.scale - want) <= 1e-12 * want


def test_other_solvers_and_a_curvature_exit_still_sample(monkeypatch):
    calls = _counting(monkeypatch)
    A, f, w, h = _problem([2.0, 1.0, 0.5, -1.0, 3.0])
    b = torch.randn(5, generator=torch.Generator().manual_seed(2), dtype=DT)
    op = hg.HessianOperator(f, w, h)
    hg.Neumann(maxiter=4, alpha=0.1).solve(op, b)
    assert len(calls) == 3  # products 1, 2, 4 (a Neumann series of 4 terms)
    # the indefinite direction b itself: CG stops at its first product, before its norms
    calls.clear()
    values, Q = torch.linalg.eigh(A)
    assert float(values[0]) == -1.0 or abs(float(values[0]) + 1.0) < 1e-12
    d = Q[:, 0].contiguous()  # eigenvalue -1: |A d| / |d| = 1
    op = hg.HessianOperator(f, w, h)
    sol = hg.CG(maxiter=5).solve(op, d)
    assert sol.status == hg.Status.NEGATIVE_CURVATURE
    assert len(calls) == 1 and abs(op.scale - 1.0) <= 1e-12


def test_a_deferred_vector_changed_in_place_is_not_sampled():
    A, f, w, h = _problem([1.0, 4.0, 9.0])
    op = hg.HessianOperator(f, w, h)
    v = torch.tensor([1.0, 0.0, 0.0], dtype=DT)
    op.defer_scale_sample()
    op.matvec(v)
    v.mul_(0.0)  # the caller reused its vector without handing the norms over
    assert op.scale == 0.0  # no sample (a lower bound: 0 before any), not a ratio over 0
    u = torch.tensor([0.0, 0.0, 1.0], dtype=DT)
    op.defer_scale_sample()
    out = op.matvec(u)
    op.settle_scale_sample(float(out.norm()), float(u.norm()))
    assert abs(op.scale - float((A @ u).norm())) <= 1e-12 * 9
