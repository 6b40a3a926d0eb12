"""Drifting sequences of SPD systems, like those consecutive hyper-steps solve (shared by the
recycling tests)."""

from __future__ import annotations

import torch

DT = torch.float64


def drifting(n: int, steps: int, seed: int):
    """Hyper-step-like systems: ``A_t = Q_t diag(lam_t) Q_t^T`` (spectrum log-uniform in
    [1e-3, 1]) whose eigenvectors turn by a small random rotation and eigenvalues move by
    ~2% per step, and a right-hand side that drifts by ~2%."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    lam, b = torch.logspace(-3, 0, n, dtype=DT), torch.randn(n, generator=g, dtype=DT)
    for _ in range(steps):
        S = 1e-3 * torch.randn(n, n, generator=g, dtype=DT)
        Q = Q @ torch.linalg.matrix_exp(S - S.T)
        lam = lam * (1 + 0.02 * torch.randn(n, generator=g, dtype=DT))
        b = b + 0.02 * float(b.norm()) / n**0.5 * torch.randn(n, generator=g, dtype=DT)
        A = (Q * lam) @ Q.T
        yield 0.5 * (A + A.T), b.clone()
