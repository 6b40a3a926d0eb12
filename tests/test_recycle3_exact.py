"""RecycledCG after the cheaper-overhead rewrite: the preconditioner applied as
``r + W^T K W r`` over the deferred blocks is the spectral LMP of the kept pairs, and the
Rayleigh-Ritz step on the interleaved harvest is exact.

Checked against dense float64 algebra: a recycled solve equals plain preconditioned CG
(:class:`hg.CG` with the dense ``I + U (sigma Theta^{-1} - I) U^T``) iterate for iterate,
with deferred rotations in the basis; on a fixed operator the kept pairs are exact Ritz
pairs (``U^T A U = diag(Theta)``, ``U`` orthonormal) after every solve.
"""

from __future__ import annotations

import torch

import hypergradient as hg
from hypergradient.solvers.recycle_basis import Basis
from spd_sequences import drifting

DT = torch.float64


def dense_lmp(solver: hg.RecycledCG, shift: float) -> torch.Tensor:
    """``I + U diag(sigma / Theta - 1) U^T`` from the kept (snapshot) basis, multiplied out."""
    U, theta, *_ = solver.snapshot()
    Ur, th = U.rows(), theta + shift
    keep = th > 0
    Ur, th = Ur[keep], th[keep]
    bottom = solver.smallest if th.numel() > solver.smallest else 0
    sigma = torch.sort(th).values[bottom]
    return torch.eye(Ur.shape[1], dtype=DT) + Ur.T @ torch.diag(sigma / th - 1.0) @ Ur


def test_recycled_solve_is_pcg_with_the_dense_spectral_preconditioner():
    n, damping = 150, 0.01
    solver, x0, deferred = hg.RecycledCG(rank=30, smallest=5, tol=0.0, maxiter=12), None, 0
    for A, b in drifting(n, 8, 3):
        op = hg.DampedOperator(hg.MatrixOperator(A), damping)
        if solver.snapshot()[0] is not None:
            deferred += solver.snapshot()[0].M is not None  # rotations not multiplied out
            Minv = dense_lmp(solver, damping)
            ref = hg.CG(maxiter=12, tol=0.0, preconditioner=lambda r, M=Minv: M @ r)
            expect = ref.solve(hg.DampedOperator(hg.MatrixOperator(A), damping), b, x0)
            sol = solver.solve(op, b, x0)
            assert sol.num_hvps == expect.num_hvps == 13  # warm start + 12 iterations
            assert torch.allclose(sol.value, expect.value, rtol=1e-9, atol=1e-12), float(
                (sol.value - expect.value).norm() / expect.value.norm()
            )
        else:
            sol = solver.solve(op, b, x0)
        x0 = sol.value
    assert deferred >= 2  # the K = M diag(.) M^T path was exercised


def test_kept_pairs_are_exact_ritz_pairs_on_a_fixed_operator():
    A, b = next(drifting(120, 1, 5))
    solver, x0 = hg.RecycledCG(rank=20, smallest=4, tol=0.0, maxiter=10, harvest=16), None
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        rhs = b + 0.1 * torch.randn(120, generator=g, dtype=DT)
        op = hg.MatrixOperator(A)
        sol = solver.solve(op, rhs, x0)
        assert sol.num_hvps == op.num_matvecs  # no product beyond CG's
        x0 = sol.value
        U, theta, *_ = solver.snapshot()
        Ur = U.rows()
        assert torch.allclose(Ur @ Ur.T, torch.eye(Ur.shape[0], dtype=DT), atol=1e-10)
        H = Ur @ A @ Ur.T
        assert torch.allclose(H, torch.diag(theta), atol=1e-10 * float(theta.abs().max()))
        # and the solve is exact to its tolerance against the dense float64 solution
    solver.tol, solver.maxiter = 1e-12, 200
    sol = solver.solve(hg.MatrixOperator(A), b, x0)
    exact = torch.linalg.solve(A, b)
    assert sol.converged
    assert torch.allclose(sol.value, exact, rtol=1e-8, atol=1e-9 * float(exact.norm()))


def test_deferred_preconditioner_is_the_dense_spectral_update():
    """``Basis.preconditioner`` over deferred blocks (``U = W^T M``, strided and kept blocks)
    applies ``r + U diag(scale) U^T r`` of the multiplied-out ``U``; kept blocks own their
    storage (a strided view of a recorder buffer is copied when kept)."""
    g = torch.Generator().manual_seed(3)
    n, k = 40, 8  # width 10 <= k + LAZY k: the rotation stays deferred
    buf = torch.randn(2 * 2, n, generator=g, dtype=DT)  # a recorder-like interleaved block
    W1, P = torch.randn(k, n, generator=g, dtype=DT), buf[0::2]
    M = torch.randn(k + 2, k, generator=g, dtype=DT)
    basis = Basis((W1, P), M).settled()
    assert basis.M is not None and basis.blocks[1].is_contiguous()
    assert basis.blocks[1].untyped_storage().data_ptr() != buf.untyped_storage().data_ptr()
    U = basis.rows().T
    assert torch.allclose(U, torch.cat([W1, P]).T @ M, rtol=0, atol=1e-12)
    scale = torch.linspace(-0.9, 3.0, k, dtype=DT)
    r = torch.randn(n, generator=g, dtype=DT)
    expect = r + U @ (scale * (U.T @ r))
    got = basis.preconditioner(scale)(r)
    assert torch.allclose(got, expect, rtol=0, atol=1e-12 * float(expect.abs().max()))
    settled = Basis((U.T.contiguous(),))  # multiplied out: the one-block path
    assert torch.allclose(settled.preconditioner(scale)(r), expect, rtol=0, atol=1e-11)
