"""Staleness of a kept sketch / recycled space is judged from where each solve starts.

``NystromPCG(refresh_every="auto")`` and ``RecycledCG`` compare each solve's convergence
rate with that of the first solve with the current sketch (space). The rate was
``-log(final relative residual) / iterations``, measured from ``||b||`` whatever the start:
a warm start's own head start counted as progress of the iterations. Adversarial review:

- a sketch built for *this very operator*, first used by a warm-started solve, was
  declared stale by the next cold solve (and re-sketched: ``rank`` wasted products; the
  recycled space dropped on every cold solve);
- with warm starts (``Implicit(warm_start=True)``, HOAG), a sketch of an *old* operator
  that no longer helps was never found stale.

The rate is now ``-log(final / start) / iterations`` (``stats["start_residual"]``).
"""

from __future__ import annotations

import torch

import hypergradient as hg

DT = torch.float64
N = 60


def _matrix(seed: int, spread: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=DT))
    if spread:
        ev = torch.logspace(0, 4, N, dtype=DT)
    else:  # ten large eigenvalues: a rank-10 sketch of the right operator removes them
        ev = torch.cat([torch.logspace(3, 4, 10, dtype=DT), torch.linspace(1, 3, N - 10, dtype=DT)])
    return (Q * ev) @ Q.T


def _near(A: torch.Tensor, b: torch.Tensor, scale: float, seed: int) -> torch.Tensor:
    """The solution of a nearby system ``A x = b + e`` (``||e|| = scale ||b||``): a warm
    start as consecutive hyper-steps give it (its residual ``-e`` is a random direction)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(N, generator=g, dtype=DT)
    return torch.linalg.solve(A, b + scale * b.norm() * e / e.norm())


def _check(sol, A, b):
    x = torch.linalg.solve(A, b)
    assert sol.status == "converged"
    assert float(torch.linalg.vector_norm(b - A @ sol.value) / b.norm()) <= 1e-8 * 1.01
    assert float((sol.value - x).norm() / x.norm()) < 1e-4


def test_a_sketch_of_the_same_operator_is_never_stale_after_a_warm_start():
    A = _matrix(0, spread=True)
    b = torch.randn(N, generator=torch.Generator().manual_seed(1), dtype=DT)
    x0 = _near(A, b, 1e-7, 2)
    pcg = hg.NystromPCG(rank=10, seed=0, refresh_every="auto", tol=1e-8, maxiter=300)
    rcg = hg.RecycledCG(rank=10, smallest=2, tol=1e-8, maxiter=300)
    for k, start in enumerate([x0, None, None, x0, None]):
        sol = pcg.solve(hg.MatrixOperator(A), b, start)
        _check(sol, A, b)
        assert "start_residual" in sol.stats if start is not None else True
        assert not sol.stats.get("sketch_stale"), k
        assert sol.stats["sketch_hvps"] == (10 if k == 0 else 0), k  # one sketch only
        sol = rcg.solve(hg.MatrixOperator(A), b, start)
        _check(sol, A, b)
        assert not sol.stats.get("recycle_stale"), k


def test_a_sketch_of_another_operator_is_found_stale_with_warm_starts():
    A1, A2 = _matrix(1), _matrix(2)
    b = torch.randn(N, generator=torch.Generator().manual_seed(3), dtype=DT)
    pcg = hg.NystromPCG(rank=10, seed=0, refresh_every="auto", tol=1e-8, maxiter=300)
    cold = [pcg.solve(hg.MatrixOperator(A1), b) for _ in range(2)]
    for sol in cold:
        _check(sol, A1, b)
    warm = [pcg.solve(hg.MatrixOperator(A2), b, _near(A2, b, 1e-6, s)) for s in range(3)]
    for sol in warm:
        _check(sol, A2, b)
    assert warm[0].stats.get("sketch_stale") is True  # the old sketch does not help A2
    assert warm[1].stats["sketch_hvps"] == 10  # so the next solve sketches A2
    # and the fresh sketch pays: fewer iterations than with the stale one
    assert warm[1].iterations < 0.6 * warm[0].iterations
    assert warm[2].iterations < 0.6 * warm[0].iterations


def test_the_start_residual_is_that_of_the_warm_start():
    A = _matrix(4)
    b = torch.randn(N, generator=torch.Generator().manual_seed(5), dtype=DT)
    x0 = _near(A, b, 1e-5, 6)
    sol = hg.CG(tol=1e-10, maxiter=200).solve(hg.MatrixOperator(A), b, x0)
    expected = float(torch.linalg.vector_norm(b - A @ x0) / b.norm())
    assert abs(sol.stats["start_residual"] - expected) <= 1e-12 * max(expected, 1.0)
    assert "start_residual" not in hg.CG().solve(hg.MatrixOperator(A), b).stats
