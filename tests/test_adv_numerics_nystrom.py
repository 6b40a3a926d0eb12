"""NystromPCG's kept sketch follows the damping (adversarial round).

The sketch is of the operator the solver is given, ``A + d0 I`` under damping; it is kept
across calls (``refresh_every > 1`` or ``"auto"``), and ``damping="auto"`` or a changed
damping then solves ``A + d I`` with the preconditioner of ``A + d0 I``. That never gave a
wrong answer (the preconditioner stays positive definite) but cost iterations. Measured on
the spectrum below (20 eigenvalues 1e4..1e1, 180 in [0.01, 0.1], rank 20, tol 1e-10):

===========  =================  ============================  ============
d0 -> d      stale (old code)   now                           fresh sketch
===========  =================  ============================  ============
0 -> 10      22                 8 (shifted by d - d0)         26
1e-3 -> 1    18                 13 (shifted)                  27
10 -> 1e-2   106                58 (sketched again)           50
100 -> 0     219                80 (sketched again)           72
===========  =================  ============================  ============

(Shifting down is worse than stale: 402 iterations for 10 -> 1e-2, hence a new sketch.)
"""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg

DT = torch.float64
N, RANK = 200, 20


def _matrix() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=DT))
    ev = torch.cat(
        [torch.logspace(4, 1, RANK, dtype=DT), torch.linspace(0.1, 0.01, N - RANK, dtype=DT)]
    )
    return (Q * ev) @ Q.T


A = _matrix()
B = torch.randn(N, generator=torch.Generator().manual_seed(1), dtype=DT)


def _system(d: float) -> hg.LinearOperator:
    op = hg.MatrixOperator(A)
    return hg.DampedOperator(op, d) if d else op


def _exact(d: float) -> torch.Tensor:
    return torch.linalg.solve(A + d * torch.eye(N, dtype=DT), B)


def _two_solves(d0: float, d: float, refresh_every=10):
    s = hg.NystromPCG(rank=RANK, seed=0, refresh_every=refresh_every, tol=1e-10, maxiter=500)
    s.solve(_system(d0), B)
    return s, s.solve(_system(d), B)


@pytest.mark.parametrize("d0, d", [(0.0, 10.0), (1e-3, 1.0)])
def test_higher_damping_shifts_the_kept_sketch(d0, d):
    _, sol = _two_solves(d0, d)
    assert sol.stats["sketch_hvps"] == 0  # the kept sketch, shifted
    assert sol.status == "converged"
    x = _exact(d)
    assert float((sol.value - x).norm() / x.norm()) < 1e-9
    assert sol.iterations <= 15  # stale and unshifted: 22 and 18


@pytest.mark.parametrize("d0, d", [(10.0, 1e-2), (100.0, 0.0)])
@pytest.mark.parametrize("refresh_every", [10, "auto"])
def test_lower_damping_sketches_again(d0, d, refresh_every):
    _, sol = _two_solves(d0, d, refresh_every)
    assert sol.stats["sketch_hvps"] == RANK  # a new sketch of A + d I
    x = _exact(d)
    assert sol.status == "converged"
    assert float((sol.value - x).norm() / x.norm()) < 1e-9
    assert sol.iterations <= 100  # stale: 106 and 219


def test_same_damping_keeps_the_sketch_unchanged():
    s, sol = _two_solves(0.5, 0.5)
    assert sol.stats["sketch_hvps"] == 0
    fresh = hg.NystromPCG(rank=RANK, seed=0, tol=1e-10, maxiter=500).solve(_system(0.5), B)
    assert sol.iterations == fresh.iterations  # the same sketch, the same iterations
    assert torch.equal(sol.value, fresh.value)


def test_state_dict_carries_the_sketch_damping():
    s, _ = _two_solves(0.0, 10.0)
    state = s.state_dict()
    assert state["damping"] == 0.0
    t = hg.NystromPCG(rank=RANK, seed=0, refresh_every=10, tol=1e-10, maxiter=500)
    t.load_state_dict(state)
    a, b = s.solve(_system(3.0), B), t.solve(_system(3.0), B)  # the sketch of A, shifted
    assert a.stats["sketch_hvps"] == b.stats["sketch_hvps"] == 0
    assert torch.equal(a.value, b.value)
    assert a.iterations <= 15
    old = {k: v for k, v in state.items() if k != "damping"}  # a checkpoint from before
    u = hg.NystromPCG(rank=RANK, seed=0, refresh_every=10, tol=1e-10, maxiter=500)
    u.load_state_dict(old)
    assert u.solve(_system(0.0), B).stats["sketch_hvps"] == 0  # unknown damping: kept as is
    with pytest.raises(ValueError, match="damping"):
        u.load_state_dict({**state, "damping": -1.0})
