"""damping="auto" with hg.Exact() on a Hessian whose negative eigenvalues the Lanczos estimate
missed: Exact's eigendecomposition sees them (``stats["negative_eigenvalues"]``), so the damping
is raised past them and the system solved again, as CG's negative curvature triggers (before,
Exact returned the solution of the still indefinite damped system, silently)."""

import torch

import hypergradient as hg
from hypergradient.operators import MatrixOperator
from hypergradient.solvers import AutoDamping, damped_solve


def _hessian(n: int = 300) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    ev = torch.cat([torch.tensor([-0.3, -0.29, -0.28]), torch.linspace(0.0, 100.0, n - 3)])
    return q @ torch.diag(ev.double()) @ q.T


def test_exact_retries_when_the_damped_matrix_is_indefinite():
    h = _hessian()
    b = torch.randn(h.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for seed in range(3):
        auto = AutoDamping(maxiter=8, seed=seed)
        sol, _, stats = damped_solve(hg.Exact(), MatrixOperator(h, symmetric=True), b, None, auto)
        lam = stats["damping"]
        damped = h + lam * torch.eye(h.shape[0], dtype=torch.float64)
        assert float(torch.linalg.eigvalsh(damped)[0]) > 0.0  # was -0.2: still indefinite
        assert stats["damping_retries"] == 1
        assert sol.stats["negative_eigenvalues"] == 0
        ref = torch.linalg.solve(damped, b)
        assert torch.allclose(sol.value, ref, rtol=1e-10, atol=1e-12)


def test_implicit_exact_auto_damping_matches_the_positive_definite_damped_solve():
    h = _hessian()
    n = h.shape[0]
    gen = torch.Generator().manual_seed(3)
    c, t = torch.randn(n, dtype=torch.float64, generator=gen), torch.randn(n, dtype=torch.float64)
    mix = torch.randn(n, 2, dtype=torch.float64, generator=gen)
    w = torch.linalg.solve(h, c)  # a saddle point of f

    def f(p, hp):
        return 0.5 * p @ h @ p - (c + mix @ hp) @ p

    def g(p, hp):
        return 0.5 * ((p - t) ** 2).sum()

    auto = AutoDamping(maxiter=8, seed=0)
    out, info = hg.implicit(f, g, w, torch.zeros(2, dtype=torch.float64), hg.Exact(),
                            damping=auto, return_info=True)  # fmt: skip
    damped = h + info.stats["damping"] * torch.eye(n, dtype=torch.float64)
    assert float(torch.linalg.eigvalsh(damped)[0]) > 0.0
    ref = mix.T @ torch.linalg.solve(damped, w - t)
    assert torch.allclose(out, ref, rtol=1e-9)
