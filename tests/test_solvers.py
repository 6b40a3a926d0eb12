"""Linear solvers against exact references: dense float64 solves, closed forms, identities.

Every solver is checked through one registry (``SOLVERS``) of configurations that are exact
on an n-dimensional SPD system; the per-solver sections test what is specific to each one
(stopping rules, convergence rates, sketches, preconditioning, warm starts, bad input).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pytest
import torch

import hypergradient as hg
from conftest import to_device

DT = torch.float64


# ----------------------------------------------------------------------------- helpers


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ``||a - b|| / ||b||`` in float64 (a may be float32)."""
    a, b = a.detach().to("cpu", DT), b.detach().to("cpu", DT)
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def dense_residual(A: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> float:
    A, b, x = (t.detach().to("cpu", DT) for t in (A, b, x))
    return float(torch.linalg.vector_norm(b - A @ x))


class System(NamedTuple):
    A: torch.Tensor  # (n, n) SPD, float64
    b: torch.Tensor  # (n,)
    Q: torch.Tensor  # orthonormal eigenvectors (columns)
    evals: torch.Tensor  # eigenvalues, A = Q diag(evals) Q^T
    lo: float  # smallest eigenvalue
    hi: float  # largest eigenvalue

    @property
    def n(self) -> int:
        return self.A.shape[0]

    @property
    def x(self) -> torch.Tensor:
        """The float64 reference ``A^{-1} b`` by LU (``torch.linalg.solve``)."""
        return torch.linalg.solve(self.A, self.b)


def make_system(evals: torch.Tensor, seed: int) -> System:
    """``A = Q diag(evals) Q^T`` with a random orthogonal ``Q``, and a random ``b``."""
    g = gen(seed)
    n = evals.numel()
    evals = evals.to(DT)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    A = (Q * evals) @ Q.T
    A = 0.5 * (A + A.T)  # exactly symmetric, so MatrixOperator sees a symmetric operator
    b = torch.randn(n, generator=g, dtype=DT)
    return System(A, b, Q, evals, float(evals.min()), float(evals.max()))


def random_spd(n: int, seed: int, lo: float = 1.0, hi: float = 10.0) -> System:
    """Eigenvalues uniform in [lo, hi], both ends included (so the bounds are exact)."""
    if n == 1:
        evals = torch.tensor([math.sqrt(lo * hi)], dtype=DT)
    else:
        inner = lo + (hi - lo) * torch.rand(n - 2, generator=gen(seed + 1000), dtype=DT)
        evals = torch.cat([torch.tensor([lo, hi], dtype=DT), inner])
    return make_system(evals, seed)


def richardson_iters(lo: float, hi: float, eps: float = 1e-15) -> int:
    """Steps of ``x <- x + a (b - A x)`` with ``a = 2 / (lo + hi)`` to contract by ``eps``."""
    rate = (hi - lo) / (hi + lo)
    if rate <= 0.0:
        return 1
    return math.ceil(math.log(eps) / math.log(rate)) + 2


# ----------------------------------------------------------------------------- the registry
#
# Each entry: a factory ``(n, lo, hi, steps=None) -> solver`` that is exact on an n-dim SPD
# system with eigenvalues in [lo, hi] (``steps`` truncates the iterative ones, to test
# residuals away from convergence), the relative tolerance of that exactness, and the
# budget ``(solver, n) -> (min, max)`` of products it may use.


def _exact(n, lo, hi, steps=None):
    return hg.Exact()


def _cg(n, lo, hi, steps=None):
    return hg.CG(maxiter=steps or n, tol=1e-14)


def _neumann(n, lo, hi, steps=None):
    return hg.Neumann(maxiter=steps or richardson_iters(lo, hi), alpha=2.0 / (lo + hi))


def _nystrom_column(n, lo, hi, steps=None):
    return hg.Nystrom(rank=steps or n, rho=1e-10, sketch="column", seed=0)


def _nystrom_gaussian(n, lo, hi, steps=None):
    return hg.Nystrom(rank=steps or n, rho=1e-10, sketch="gaussian", seed=0)


def _nystrom_pcg(n, lo, hi, steps=None):
    return hg.NystromPCG(rank=n, maxiter=steps or n, tol=1e-14, seed=0)


def _fixed_point(n, lo, hi, steps=None):
    return hg.FixedPoint(
        maxiter=steps or richardson_iters(lo, hi), tol=1e-14, omega=2.0 / (lo + hi)
    )


def _budget_exact(s, n):
    return n, n


def _budget_cg(s, n):
    return 1, s.maxiter


def _budget_neumann(s, n):
    return s.maxiter, s.maxiter


def _budget_nystrom(s, n):
    return min(s.rank, n), min(s.rank, n)


def _budget_pcg(s, n):
    return min(s.rank, n) + 1, min(s.rank, n) + s.maxiter


def _budget_fixed_point(s, n):
    return 1, s.maxiter


SOLVERS = [
    pytest.param(_exact, 1e-12, _budget_exact, id="Exact"),
    pytest.param(_cg, 1e-10, _budget_cg, id="CG"),
    pytest.param(_neumann, 1e-10, _budget_neumann, id="Neumann"),
    pytest.param(_nystrom_column, 1e-8, _budget_nystrom, id="Nystrom-column"),
    pytest.param(_nystrom_gaussian, 1e-8, _budget_nystrom, id="Nystrom-gaussian"),
    pytest.param(_nystrom_pcg, 1e-10, _budget_pcg, id="NystromPCG"),
    pytest.param(_fixed_point, 1e-10, _budget_fixed_point, id="FixedPoint"),
]

SIZES = [1, 6, 25]


@pytest.fixture(params=SIZES, ids=[f"n{n}" for n in SIZES])
def system(request) -> System:
    return random_spd(request.param, seed=request.param)


# ----------------------------------------------------------------------------- contracts


@pytest.mark.parametrize(("factory", "tol", "budget"), SOLVERS)
def test_solution_matches_dense_solve(factory, tol, budget, system):
    solver = factory(system.n, system.lo, system.hi)
    sol = solver.solve(hg.MatrixOperator(system.A), system.b)
    assert isinstance(sol, hg.Solution)
    assert sol.value.dtype == DT and sol.value.shape == (system.n,)
    assert rel(sol.value, system.x) <= tol
    assert sol.converged in (True, None)
    assert sol.status in ("converged", "exact", "fixed_budget", "max_iterations")


@pytest.mark.parametrize(("factory", "tol", "budget"), SOLVERS)
def test_num_hvps_is_counted_and_within_budget(factory, tol, budget, system):
    solver = factory(system.n, system.lo, system.hi)
    op = hg.MatrixOperator(system.A)
    assert op.num_matvecs == 0
    sol = solver.solve(op, system.b)
    assert sol.num_hvps == op.num_matvecs
    low, high = budget(solver, system.n)
    assert low <= sol.num_hvps <= high


@pytest.mark.parametrize("steps", [None, 2], ids=["exact", "truncated"])
@pytest.mark.parametrize(("factory", "tol", "budget"), SOLVERS)
def test_reported_residual_is_the_dense_residual(factory, tol, budget, steps):
    # n = 25 with eigenvalues in [1, 10]: two steps leave a residual of order ||b||.
    s = random_spd(25, seed=7)
    sol = factory(s.n, s.lo, s.hi, steps=steps).solve(hg.MatrixOperator(s.A), s.b)
    if sol.residual_norm is None:
        assert factory in (_neumann, _nystrom_column, _nystrom_gaussian)
        return
    true = dense_residual(s.A, s.b, sol.value)
    bnorm = float(s.b.norm())
    assert abs(sol.residual_norm - true) <= 1e-12 * bnorm + 1e-8 * true
    if steps is not None and factory in (_cg, _fixed_point):
        assert true > 1e-3 * bnorm  # the comparison above was not between two zeros
        assert sol.converged is False and sol.status == "max_iterations"


@pytest.mark.parametrize(("factory", "tol", "budget"), SOLVERS)
def test_zero_rhs_gives_zero(factory, tol, budget, system):
    b = torch.zeros(system.n, dtype=DT)
    sol = factory(system.n, system.lo, system.hi).solve(hg.MatrixOperator(system.A), b)
    assert torch.equal(sol.value, torch.zeros_like(b))
    if sol.residual_norm is not None:
        assert sol.residual_norm == 0.0


@pytest.mark.parametrize(("factory", "tol", "budget"), SOLVERS)
def test_wrong_rhs_shape_is_refused(factory, tol, budget):
    s = random_spd(6, seed=3)
    solver = factory(s.n, s.lo, s.hi)
    op = hg.MatrixOperator(s.A)
    with pytest.raises(ValueError, match="`b`"):
        solver.solve(op, torch.ones(s.n + 1, dtype=DT))
    with pytest.raises(ValueError, match="`b`"):
        solver.solve(op, torch.ones(s.n, 1, dtype=DT))
    with pytest.raises(ValueError, match="`x0`"):
        solver.solve(op, s.b, x0=torch.ones(s.n - 1, dtype=DT))
    with pytest.raises(TypeError, match="LinearOperator"):
        solver.solve(s.A, s.b)
    assert op.num_matvecs == 0


@pytest.mark.parametrize(("factory", "tol", "budget"), SOLVERS)
def test_damped_operator_solves_the_shifted_system(factory, tol, budget):
    # hg.implicit(damping=d) hands the solvers DampedOperator(H, d): (A + d I) x = b, with
    # the products counted on the wrapped operator.
    s = random_spd(10, seed=4)
    d = 0.5
    base = hg.MatrixOperator(s.A)
    op = hg.DampedOperator(base, d)
    sol = factory(s.n, s.lo + d, s.hi + d).solve(op, s.b)
    expected = torch.linalg.solve(s.A + d * torch.eye(s.n, dtype=DT), s.b)
    assert rel(sol.value, expected) <= tol
    assert sol.num_hvps == base.num_matvecs == op.num_matvecs


# --- the same registry through hg.implicit on a closed-form ridge hypergradient

RIDGE_N, RIDGE_M = 8, 40


def _ridge_data():
    g = gen(11)
    X = torch.randn(RIDGE_M, RIDGE_N, generator=g, dtype=DT) / math.sqrt(RIDGE_M)
    y = torch.randn(RIDGE_M, generator=g, dtype=DT)
    Xv = torch.randn(RIDGE_M // 2, RIDGE_N, generator=g, dtype=DT)
    yv = torch.randn(RIDGE_M // 2, generator=g, dtype=DT)
    lam = torch.linspace(0.5, 2.0, RIDGE_N, dtype=DT)
    return X, y, Xv, yv, lam


def test_ridge_closed_form_is_a_stationary_point():
    # Guards the reference used below: w* solves grad_w f = 0 and dg/dlam matches a
    # central finite difference of lam -> g(w*(lam)).
    X, y, Xv, yv, lam = _ridge_data()

    def wstar(lam):
        return torch.linalg.solve(X.T @ X + torch.diag(lam), X.T @ y)

    def outer(lam):
        r = Xv @ wstar(lam) - yv
        return 0.5 * float(r @ r)

    w = wstar(lam)
    assert float((X.T @ (X @ w - y) + lam * w).norm()) < 1e-12
    A = X.T @ X + torch.diag(lam)
    closed = -torch.linalg.solve(A, Xv.T @ (Xv @ w - yv)) * w
    h = 1e-6
    fd = torch.tensor(
        [(outer(lam + h * e) - outer(lam - h * e)) / (2 * h) for e in torch.eye(RIDGE_N, dtype=DT)]
    )
    assert rel(fd, closed) < 1e-7


@pytest.mark.parametrize(("factory", "tol", "budget"), SOLVERS)
def test_ridge_hypergradient_through_implicit(factory, tol, budget):
    X, y, Xv, yv, lam = _ridge_data()
    A = X.T @ X + torch.diag(lam)
    w = torch.linalg.solve(A, X.T @ y)
    grad_g = Xv.T @ (Xv @ w - yv)
    closed = -torch.linalg.solve(A, grad_g) * w  # dg/dlam = -(A^{-1} grad_w g) * w*

    def inner(w, lam):
        r = X @ w - y
        return 0.5 * (r @ r) + 0.5 * (lam * w**2).sum()

    def outer(w, lam):
        r = Xv @ w - yv
        return 0.5 * (r @ r)

    evals = torch.linalg.eigvalsh(A)
    solver = factory(RIDGE_N, float(evals[0]), float(evals[-1]))
    hyper, info = hg.implicit(inner, outer, w, lam, solver=solver, return_info=True)
    assert hyper.shape == lam.shape and hyper.dtype == DT
    assert rel(hyper, closed) <= tol
    low, high = budget(solver, RIDGE_N)
    assert low <= info.num_hvps <= high
    assert rel(info.solution, torch.linalg.solve(A, grad_g)) <= tol
    assert info.residual_norm is not None
    assert info.residual_norm <= 1e-6 * float(grad_g.norm())


def test_identity_returns_scaled_rhs_without_products():
    s = random_spd(6, seed=2)
    op = hg.MatrixOperator(s.A)
    sol = hg.Identity(scale=0.25).solve(op, s.b)
    assert torch.equal(sol.value, 0.25 * s.b)
    assert sol.num_hvps == 0 and op.num_matvecs == 0
    assert sol.residual_norm is None and sol.status == "fixed_budget"
    with pytest.raises(ValueError, match="`b`"):
        hg.Identity().solve(op, torch.ones(7, dtype=DT))


def test_identity_through_implicit_is_the_one_step_hypergradient():
    # With A^{-1} ~ scale * I the hypergradient is -scale * grad_w g * w for the ridge.
    X, y, Xv, yv, lam = _ridge_data()
    w = torch.linalg.solve(X.T @ X + torch.diag(lam), X.T @ y)

    def inner(w, lam):
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (lam * w**2).sum()

    def outer(w, lam):
        return 0.5 * ((Xv @ w - yv) ** 2).sum()

    hyper, info = hg.implicit(inner, outer, w, lam, solver=hg.Identity(0.3), return_info=True)
    expected = -0.3 * (Xv.T @ (Xv @ w - yv)) * w
    assert rel(hyper, expected) < 1e-14
    assert info.num_hvps == 0 and info.extra_hvps == 1


# ----------------------------------------------------------------------------- CG


def test_cg_with_n_iterations_equals_exact():
    s = make_system(torch.logspace(0, 1, 30, dtype=DT), seed=21)
    cg = hg.CG(maxiter=s.n, tol=0.0).solve(hg.MatrixOperator(s.A), s.b)
    exact = hg.Exact().solve(hg.MatrixOperator(s.A), s.b)
    assert rel(exact.value, s.x) < 1e-13
    assert rel(cg.value, exact.value) < 1e-10
    assert cg.num_hvps == cg.iterations == s.n


def test_cg_stops_at_the_first_iterate_meeting_the_relative_tolerance():
    s = random_spd(100, seed=22)
    tol = 1e-4
    op = hg.MatrixOperator(s.A)
    sol = hg.CG(maxiter=1000, tol=tol).solve(op, s.b)
    bnorm = float(s.b.norm())
    assert sol.status == "converged" and sol.converged is True
    assert 1 < sol.iterations < s.n  # stopped early
    assert sol.num_hvps == sol.iterations == op.num_matvecs
    assert sol.residual_norm <= tol * bnorm
    assert dense_residual(s.A, s.b, sol.value) <= 1.001 * tol * bnorm
    assert sol.stats["relative_residual"] == pytest.approx(sol.residual_norm / bnorm)
    # One iteration fewer does not meet the tolerance: it did not stop late either.
    short = hg.CG(maxiter=sol.iterations - 1, tol=tol).solve(hg.MatrixOperator(s.A), s.b)
    assert short.status == "max_iterations" and short.converged is False
    assert dense_residual(s.A, s.b, short.value) > tol * bnorm
    # An absolute tolerance above tol * ||b|| takes over.
    loose = hg.CG(maxiter=1000, tol=tol, atol=0.1 * bnorm).solve(hg.MatrixOperator(s.A), s.b)
    assert loose.iterations < sol.iterations
    assert 1e-4 * bnorm < loose.residual_norm <= 0.1 * bnorm


def test_cg_warm_start_from_the_solution_takes_no_iteration():
    s = random_spd(20, seed=23)
    op = hg.MatrixOperator(s.A)
    x = s.x
    sol = hg.CG(maxiter=50, tol=1e-10).solve(op, s.b, x0=x)
    assert sol.iterations == 0 and sol.status == "converged"
    assert sol.num_hvps == 1 == op.num_matvecs  # the initial residual b - A x0
    assert torch.equal(sol.value, x)
    assert sol.value is not x  # x0 is not aliased
    assert sol.residual_norm == pytest.approx(dense_residual(s.A, s.b, x), rel=1e-6, abs=1e-15)


def test_cg_warm_start_near_the_solution_saves_iterations():
    s = random_spd(60, seed=24)
    cold = hg.CG(maxiter=200, tol=1e-10).solve(hg.MatrixOperator(s.A), s.b)
    x0 = s.x + 1e-6 * torch.randn(s.n, generator=gen(0), dtype=DT)
    x0_copy = x0.clone()
    warm = hg.CG(maxiter=200, tol=1e-10).solve(hg.MatrixOperator(s.A), s.b, x0=x0)
    assert torch.equal(x0, x0_copy)  # not modified in place
    assert warm.status == "converged"
    assert warm.iterations < cold.iterations
    assert warm.num_hvps == warm.iterations + 1
    assert rel(warm.value, s.x) < 1e-9


def _ill_conditioned_diagonally_dominant(n: int, seed: int) -> System:
    """``A = D^{1/2} (I + E) D^{1/2}`` with ``D`` spanning 1..1e4 and ``I + E`` strictly
    diagonally dominant (``sum_j |E_ij| <= 0.4``): Jacobi scaling removes D."""
    g = gen(seed)
    d = torch.logspace(0, 4, n, dtype=DT)
    E = torch.randn(n, n, generator=g, dtype=DT)
    E = 0.5 * (E + E.T)
    E.fill_diagonal_(0.0)
    E = 0.4 * E / E.abs().sum(1).max()
    A = d.sqrt()[:, None] * (torch.eye(n, dtype=DT) + E) * d.sqrt()[None, :]
    evals, Q = torch.linalg.eigh(A)
    b = torch.randn(n, generator=g, dtype=DT)
    return System(A, b, Q, evals, float(evals[0]), float(evals[-1]))


def test_cg_jacobi_preconditioner_reduces_iterations():
    s = _ill_conditioned_diagonally_dominant(100, seed=25)
    assert s.hi / s.lo > 1e3
    diag = torch.diagonal(s.A).clone()
    calls = []

    def jacobi(r):
        calls.append(1)
        return r / diag

    plain = hg.CG(maxiter=1000, tol=1e-10).solve(hg.MatrixOperator(s.A), s.b)
    op = hg.MatrixOperator(s.A)
    pre = hg.CG(maxiter=1000, tol=1e-10, preconditioner=jacobi).solve(op, s.b)
    assert plain.status == pre.status == "converged"
    assert pre.iterations <= 15 and plain.iterations >= 5 * pre.iterations
    assert pre.num_hvps == pre.iterations == op.num_matvecs
    assert len(calls) == pre.iterations  # M^{-1} r once per iteration, not once per product
    assert rel(pre.value, s.x) < 1e-8
    assert dense_residual(s.A, s.b, pre.value) <= 1e-10 * float(s.b.norm())


def test_cg_identity_preconditioner_changes_nothing():
    s = random_spd(30, seed=26)
    plain = hg.CG(maxiter=100, tol=1e-10).solve(hg.MatrixOperator(s.A), s.b)
    pre = hg.CG(maxiter=100, tol=1e-10, preconditioner=lambda r: r.clone()).solve(
        hg.MatrixOperator(s.A), s.b
    )
    assert pre.iterations == plain.iterations
    assert rel(pre.value, plain.value) < 1e-13


def _indefinite() -> tuple[torch.Tensor, torch.Tensor]:
    # b^T A b > 0, so the first step is taken; the second direction has p^T A p < 0.
    A = torch.diag(torch.tensor([4.0, 3.0, -0.1], dtype=DT))
    b = torch.ones(3, dtype=DT)
    return A, b


def test_cg_stops_on_negative_curvature_with_the_last_iterate():
    A, b = _indefinite()
    op = hg.MatrixOperator(A)
    sol = hg.CG(maxiter=10, tol=1e-12).solve(op, b)
    assert sol.status == "negative_curvature" and sol.converged is False
    assert bool(torch.isfinite(sol.value).all())
    assert sol.iterations >= 1  # it took a step along positive curvature, then stopped
    # iterations counts steps taken; the product that found the uphill direction is extra
    assert sol.num_hvps == sol.iterations + 1 == op.num_matvecs
    # The returned x is the iterate before the uphill direction.
    before = hg.CG(maxiter=sol.iterations, tol=0.0).solve(hg.MatrixOperator(A), b)
    assert before.status == "max_iterations"
    assert torch.allclose(sol.value, before.value, rtol=1e-14, atol=0.0)
    assert sol.residual_norm == pytest.approx(dense_residual(A, b, sol.value), rel=1e-10)


def test_cg_negative_curvature_on_the_first_direction_returns_zero():
    A = torch.diag(torch.tensor([1.0, -2.0], dtype=DT))
    b = torch.tensor([0.1, 1.0], dtype=DT)  # b^T A b < 0
    sol = hg.CG(maxiter=10).solve(hg.MatrixOperator(A), b)
    assert sol.status == "negative_curvature"
    assert torch.equal(sol.value, torch.zeros(2, dtype=DT))


def test_cg_negative_curvature_through_implicit_warns():
    A, b = _indefinite()
    t = torch.zeros(3, dtype=DT)
    w = t + b  # grad_w g = w - t = b

    def inner(w, phi):
        return 0.5 * w @ (A @ w) - phi @ w

    def outer(w, phi):
        return 0.5 * ((w - t) ** 2).sum()

    phi = torch.zeros(3, dtype=DT)
    with pytest.warns(hg.HypergradientWarning, match="curvature"):
        hyper, info = hg.implicit(inner, outer, w, phi, solver=hg.CG(maxiter=10), return_info=True)
    assert info.status == "negative_curvature" and info.converged is False
    # d/dphi of grad_w f = A w - phi is -I, so the hypergradient is the partial solution x.
    partial = hg.CG(maxiter=10).solve(hg.MatrixOperator(A), b).value
    assert torch.allclose(hyper, partial, rtol=1e-12, atol=0.0)


def test_cg_refuses_a_non_symmetric_operator():
    M = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=DT)
    op = hg.MatrixOperator(M)
    assert op.symmetric is False
    for solver in (hg.CG(), hg.Nystrom(rank=2), hg.NystromPCG(rank=2)):
        with pytest.raises(ValueError, match="symmetric"):
            solver.solve(op, torch.ones(2, dtype=DT))
    assert op.num_matvecs == 0
    x = hg.Exact().solve(op, torch.ones(2, dtype=DT)).value
    assert rel(x, torch.linalg.solve(M, torch.ones(2, dtype=DT))) < 1e-15


def test_exact_gives_the_pseudo_inverse_solution_on_zero_rows():
    # Parameters that do not enter f: zero Hessian rows/columns get x = 0, not NaN.
    A = torch.zeros(6, 6, dtype=DT)
    A[:3, :3] = random_spd(3, seed=5).A
    b = torch.randn(6, generator=gen(5), dtype=DT)
    sol = hg.Exact().solve(hg.MatrixOperator(A), b)
    assert rel(sol.value, torch.linalg.pinv(A, hermitian=True) @ b) < 1e-13
    assert torch.equal(sol.value[3:], torch.zeros(3, dtype=DT))
    assert sol.residual_norm == pytest.approx(float(b[3:].norm()), rel=1e-12)


def test_exact_non_symmetric_singular_falls_back_to_least_squares():
    M = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.0, 0.0]], dtype=DT)
    b = torch.ones(3, dtype=DT)
    op = hg.MatrixOperator(M)
    assert op.symmetric is False
    sol = hg.Exact().solve(op, b)
    assert rel(sol.value, torch.linalg.pinv(M) @ b) < 1e-12
    assert sol.residual_norm == pytest.approx(dense_residual(M, b, sol.value), rel=1e-10)


def test_exact_chunked_products_give_the_same_answer():
    s = random_spd(9, seed=6)
    op = hg.MatrixOperator(s.A)
    sol = hg.Exact(chunk_size=4).solve(op, s.b)
    assert op.num_matvecs == 9 and rel(sol.value, s.x) < 1e-13


def test_exact_on_a_small_scale_non_symmetric_matrix():
    M = 1e-9 * torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=DT)
    b = torch.ones(2, dtype=DT)
    x = hg.Exact().solve(hg.MatrixOperator(M), b).value
    assert rel(x, torch.linalg.solve(M, b)) < 1e-12


# ----------------------------------------------------------------------------- Neumann


def _neumann_error_prediction(s: System, alpha: float, k: int) -> torch.Tensor:
    """``x* - x_k = A^{-1} (I - alpha A)^{k+1} b`` in the eigenbasis (k products)."""
    coeff = (1.0 - alpha * s.evals) ** (k + 1) / s.evals * (s.Q.T @ s.b)
    return s.Q @ coeff


def test_neumann_error_decays_like_the_eigenvalue_prediction():
    # Slowest mode: lambda = 1 with |1 - alpha lambda| = 0.8; all others <= 0.4.
    s = make_system(torch.tensor([1.0, 3.0, 4.0, 5.0, 5.0, 6.0], dtype=DT), seed=31)
    alpha = 1.0 / 6.0 * 1.2  # 0.2: rates |1 - 0.2 lambda| = 0.8, 0.4, 0.2, 0, 0, 0.2
    rates = (1.0 - alpha * s.evals).abs()
    assert float(rates.max()) == pytest.approx(0.8)
    errors = []
    for k in range(1, 31):
        op = hg.MatrixOperator(s.A)
        sol = hg.Neumann(maxiter=k, alpha=alpha).solve(op, s.b)
        assert sol.num_hvps == k == op.num_matvecs and sol.iterations == k
        assert sol.status == "fixed_budget" and sol.converged is None
        assert sol.residual_norm is None
        err = s.x - sol.value
        predicted = _neumann_error_prediction(s, alpha, k)
        assert float((err - predicted).norm()) <= 1e-13 * float(s.x.norm())
        errors.append(float(err.norm()))
    ratios = [errors[k + 1] / errors[k] for k in range(15, 29)]
    assert ratios == pytest.approx([0.8] * len(ratios), abs=1e-5)


def test_neumann_with_alpha_above_two_over_lambda_max_diverges():
    s = make_system(torch.tensor([1.0, 2.0, 4.0], dtype=DT), seed=32)
    alpha = 2.5 / 4.0  # |1 - alpha * 4| = 1.5
    sol = hg.Neumann(maxiter=30, alpha=alpha).solve(hg.MatrixOperator(s.A), s.b)
    assert sol.status == "diverged" and sol.converged is False
    # It stops as soon as the residual grows (for a symmetric operator that proves
    # divergence) and returns the partial sum with the smallest residual: the one before
    # the growing term, with k = iterations - 2 products (x = 0 if k < 0).
    assert sol.iterations < 30
    k = sol.iterations - 2
    if k >= 0:
        assert rel(s.x - sol.value, _neumann_error_prediction(s, alpha, k)) < 1e-10
    else:
        assert torch.equal(sol.value, torch.zeros_like(s.b))
    assert sol.residual_norm == pytest.approx(dense_residual(s.A, s.b, sol.value), rel=1e-10)
    # A stable alpha on the same system is not flagged.
    ok = hg.Neumann(maxiter=30, alpha=0.45).solve(hg.MatrixOperator(s.A), s.b)
    assert ok.status == "fixed_budget"


def test_neumann_auto_alpha_estimates_lambda_max_and_converges():
    s = make_system(torch.logspace(0, 1, 30, dtype=DT), seed=33)
    op = hg.MatrixOperator(s.A)
    sol = hg.Neumann(maxiter=400, alpha="auto", power_iters=20, seed=0).solve(op, s.b)
    lam = sol.stats["lambda_max"]
    assert sol.stats["power_hvps"] == 20
    assert sol.num_hvps == 420 == op.num_matvecs
    assert abs(lam - s.hi) <= 0.05 * s.hi
    assert lam <= s.hi * (1 + 1e-12)  # a Rayleigh quotient: a lower bound
    assert sol.stats["alpha"] == pytest.approx(1.0 / lam, rel=1e-15)
    assert rel(sol.value, s.x) < 1e-10
    # Seeded: a second solve estimates the same lambda_max.
    again = hg.Neumann(maxiter=400, alpha="auto", seed=0).solve(hg.MatrixOperator(s.A), s.b)
    assert again.stats["lambda_max"] == lam


def test_estimate_lambda_max_is_a_lower_bound_with_counted_products():
    s = make_system(torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=DT), seed=34)
    op = hg.MatrixOperator(s.A)
    est = hg.estimate_lambda_max(op, iters=30, generator=gen(0))
    assert op.num_matvecs == 30
    assert est <= 10.0 * (1 + 1e-12)
    assert est == pytest.approx(10.0, rel=1e-10)  # (3/10)^60 of the start vector is left


def test_neumann_auto_refuses_a_negative_definite_operator():
    A = -torch.eye(4, dtype=DT)
    with pytest.raises(ValueError, match="lambda_max"):
        hg.Neumann(alpha="auto").solve(hg.MatrixOperator(A), torch.ones(4, dtype=DT))


def test_neumann_tol_stops_early_with_the_dense_residual():
    s = random_spd(40, seed=35)
    alpha = 1.0 / s.hi
    tol = 1e-6
    op = hg.MatrixOperator(s.A)
    sol = hg.Neumann(maxiter=1000, alpha=alpha, tol=tol).solve(op, s.b)
    bnorm = float(s.b.norm())
    assert sol.status == "converged" and sol.converged is True
    assert sol.iterations < 1000 and sol.num_hvps == sol.iterations == op.num_matvecs
    true = dense_residual(s.A, s.b, sol.value)
    assert sol.residual_norm == pytest.approx(true, rel=1e-8)
    assert true <= tol * bnorm
    # The last product only measured the residual: the fixed-budget series with one product
    # fewer sums the same terms. And it stopped at the first partial sum meeting tol: the
    # sum with one term fewer does not.
    k = sol.iterations - 1
    fixed = hg.Neumann(maxiter=k, alpha=alpha).solve(hg.MatrixOperator(s.A), s.b)
    assert rel(fixed.value, sol.value) < 1e-14
    shorter = hg.Neumann(maxiter=k - 1, alpha=alpha).solve(hg.MatrixOperator(s.A), s.b)
    assert dense_residual(s.A, s.b, shorter.value) > tol * bnorm
    capped = hg.Neumann(maxiter=k - 1, alpha=alpha, tol=tol).solve(hg.MatrixOperator(s.A), s.b)
    assert capped.status == "max_iterations" and capped.converged is False
    assert capped.residual_norm is None


# ----------------------------------------------------------------------------- Nystrom


@pytest.mark.parametrize("sketch", ["column", "gaussian"])
def test_nystrom_full_rank_recovers_the_spectrum_and_the_solution(sketch):
    s = make_system(torch.logspace(-1, 2, 20, dtype=DT), seed=41)
    op = hg.MatrixOperator(s.A)
    sol = hg.Nystrom(rank=s.n, rho=1e-10, sketch=sketch, seed=1).solve(op, s.b)
    assert rel(sol.value, s.x) < 1e-8
    assert sol.num_hvps == s.n == op.num_matvecs and sol.stats["rank"] == s.n
    evals = torch.sort(sol.stats["eigenvalues"].to(DT)).values
    assert float((evals - torch.sort(s.evals).values).abs().max()) < 1e-11 * s.hi
    # The rho shift is exactly (A + rho I)^{-1}: with a large rho the answer moves accordingly.
    rho = 0.5
    damped = hg.Nystrom(rank=s.n, rho=rho, sketch=sketch, seed=1).solve(hg.MatrixOperator(s.A), s.b)
    expected = torch.linalg.solve(s.A + rho * torch.eye(s.n, dtype=DT), s.b)
    assert rel(damped.value, expected) < 1e-12


@pytest.mark.parametrize("sketch", ["column", "gaussian"])
def test_nystrom_rank_above_n_is_clamped(sketch):
    s = random_spd(10, seed=42)
    op = hg.MatrixOperator(s.A)
    sol = hg.Nystrom(rank=25, rho=1e-10, sketch=sketch, seed=0).solve(op, s.b)
    assert sol.num_hvps == 10 == op.num_matvecs
    assert sol.stats["rank"] == 10
    at_n = hg.Nystrom(rank=10, rho=1e-10, sketch=sketch, seed=0).solve(hg.MatrixOperator(s.A), s.b)
    assert rel(sol.value, at_n.value) < 1e-9
    assert rel(sol.value, s.x) < 1e-8


@pytest.mark.parametrize("sketch", ["column", "gaussian"])
def test_nystrom_seeding_is_reproducible_and_seeds_matter(sketch):
    s = random_spd(20, seed=43)

    def run(**kw):
        return hg.Nystrom(rank=4, rho=0.1, sketch=sketch, **kw).solve(hg.MatrixOperator(s.A), s.b)

    a, b = run(seed=5), run(seed=5)
    assert torch.equal(a.value, b.value)
    assert torch.equal(run(generator=gen(5)).value, a.value)
    assert rel(run(seed=6).value, a.value) > 1e-3
    # One solver object draws a new sketch per call (its generator advances).
    solver = hg.Nystrom(rank=4, rho=0.1, sketch=sketch, seed=5)
    first = solver.solve(hg.MatrixOperator(s.A), s.b).value
    second = solver.solve(hg.MatrixOperator(s.A), s.b).value
    assert torch.equal(first, a.value) and rel(second, first) > 1e-3


def test_nystrom_seed_and_generator_together_are_refused():
    with pytest.raises(ValueError, match="seed"):
        hg.Nystrom(seed=0, generator=gen(0))
    with pytest.raises(ValueError, match="seed"):
        hg.NystromPCG(seed=0, generator=gen(0))
    with pytest.raises(TypeError, match="generator"):
        hg.Nystrom(generator=0)


def _with_zero_rows(n: int, used: list[int], seed: int) -> torch.Tensor:
    """SPD on the ``used`` coordinates, zero rows and columns elsewhere (unused params)."""
    k = len(used)
    block = random_spd(k, seed=seed).A
    A = torch.zeros(n, n, dtype=DT)
    idx = torch.tensor(used)
    A[idx[:, None], idx[None, :]] = block
    return A


@pytest.mark.parametrize("sketch", ["column", "gaussian"])
def test_nystrom_full_rank_with_zero_rows(sketch):
    n, rho = 10, 0.05
    A = _with_zero_rows(n, [1, 4, 8], seed=44)
    b = torch.randn(n, generator=gen(1), dtype=DT)
    sol = hg.Nystrom(rank=n, rho=rho, sketch=sketch, seed=0).solve(hg.MatrixOperator(A), b)
    assert bool(torch.isfinite(sol.value).all())
    expected = torch.linalg.solve(A + rho * torch.eye(n, dtype=DT), b)
    assert rel(sol.value, expected) < 1e-10


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nystrom_column_sketch_sampling_zero_columns(seed):
    # 7 of the 10 coordinates are unused, so a 5-column sample always hits zero columns.
    n, r, rho = 10, 5, 0.1
    A = _with_zero_rows(n, [0, 3, 6], seed=45)
    b = torch.randn(n, generator=gen(2), dtype=DT)
    sol = hg.Nystrom(rank=r, rho=rho, sketch="column", seed=seed).solve(hg.MatrixOperator(A), b)
    assert bool(torch.isfinite(sol.value).all())
    assert bool(torch.isfinite(sol.stats["eigenvalues"]).all())
    # Reference: the column Nystrom approximation C W^+ C^T over the same sampled columns
    # (documented: `rank` coordinates drawn by randperm from the seeded generator).
    S = torch.randperm(n, generator=gen(seed))[:r]
    C, W = A[:, S], A[S[:, None], S[None, :]]
    A_nys = C @ torch.linalg.pinv(W, hermitian=True) @ C.T
    expected = torch.linalg.solve(A_nys + rho * torch.eye(n, dtype=DT), b)
    assert rel(sol.value, expected) < 1e-8


def test_nystrom_of_the_zero_operator_is_b_over_rho():
    b = torch.randn(5, generator=gen(3), dtype=DT)
    for sketch in ("column", "gaussian"):
        A = torch.zeros(5, 5, dtype=DT)
        sol = hg.Nystrom(rank=3, rho=0.2, sketch=sketch, seed=0).solve(hg.MatrixOperator(A), b)
        assert torch.allclose(sol.value, b / 0.2, rtol=1e-15, atol=0.0)


def _woodbury_float32(A: torch.Tensor, b: torch.Tensor, rho: float) -> torch.Tensor:
    """The seed library's (hypergrad's) full-rank column Nystrom solve, in A's dtype:
    ``x = b/rho - C (W + C^T C/rho)^{-1} C^T b / rho^2`` with C = A[:, S], W = A[S, S]."""
    C, W = A, A  # all columns (S = range(n))
    inner = W + C.T @ C / rho
    return b / rho - C @ torch.linalg.solve(inner, C.T @ b) / rho**2


@pytest.mark.parametrize(("sketch", "bound"), [("column", 1e-5), ("gaussian", 5e-3)])
def test_nystrom_float32_small_rho_is_stable_unlike_woodbury(sketch, bound):
    n, rho = 40, 1e-4
    s = make_system(torch.logspace(-3, 2, n, dtype=DT), seed=46)
    A32 = s.A.float()
    b32 = s.b.float()
    # Reference: the same float32 matrix, solved in float64.
    ref = torch.linalg.solve(A32.to(DT) + rho * torch.eye(n, dtype=DT), b32.to(DT))
    sol = hg.Nystrom(rank=n, rho=rho, sketch=sketch, seed=0).solve(hg.MatrixOperator(A32), b32)
    assert sol.value.dtype == torch.float32
    ours = rel(sol.value, ref)
    woodbury = rel(_woodbury_float32(A32, b32, rho), ref)
    # Sanity of the Woodbury transcription: exact in float64.
    assert rel(_woodbury_float32(A32.to(DT), b32.to(DT), rho), ref) < 1e-6
    assert ours < bound
    assert woodbury > 1e-2  # the subtractive form has lost its digits in float32
    assert 10 * ours < woodbury


@pytest.mark.parametrize("sketch", ["gaussian", "column"])
def test_nystrom_of_a_low_rank_matrix_at_its_rank_is_exact(sketch):
    n, r = 30, 5
    g = gen(47)
    V = torch.randn(n, r, generator=g, dtype=DT)
    A = V @ torch.diag(torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5], dtype=DT)) @ V.T
    op = hg.MatrixOperator(A)
    approx = hg.nystrom_sketch(op, r, sketch, generator=gen(0))
    assert op.num_matvecs == r
    assert isinstance(approx, hg.NystromApproximation)
    assert approx.U.shape == (n, r) and not approx.full_rank
    assert torch.allclose(approx.U.T @ approx.U, torch.eye(r, dtype=DT), atol=1e-12)
    assert bool((approx.eigenvalues >= 0).all())
    A_nys = (approx.U * approx.eigenvalues) @ approx.U.T
    assert float((A_nys - A).norm() / A.norm()) < 1e-10
    # Its solve is (A + rho I)^{-1} b, complement included.
    b = torch.randn(n, generator=g, dtype=DT)
    expected = torch.linalg.solve(A + 0.3 * torch.eye(n, dtype=DT), b)
    assert rel(approx.solve(b, 0.3), expected) < 1e-10


@pytest.mark.parametrize("sketch", ["column", "gaussian"])
def test_nystrom_of_an_indefinite_matrix_keeps_its_positive_part(sketch):
    # Documented fallback (non-convex inner problems): A_nys is the PSD part A_+.
    s = make_system(torch.tensor([3.0, 2.0, -1.0, 0.5], dtype=DT), seed=48)
    A_plus = (s.Q * s.evals.clamp_min(0.0)) @ s.Q.T
    rho = 0.1
    sol = hg.Nystrom(rank=4, rho=rho, sketch=sketch, seed=0).solve(hg.MatrixOperator(s.A), s.b)
    expected = torch.linalg.solve(A_plus + rho * torch.eye(4, dtype=DT), s.b)
    assert rel(sol.value, expected) < 1e-10
    assert sol.stats["rank"] == 3


def test_nystrom_chunked_products_give_the_same_answer():
    s = random_spd(11, seed=49)
    op = hg.MatrixOperator(s.A)
    chunked = hg.Nystrom(rank=7, rho=0.1, sketch="gaussian", seed=2, chunk_size=3).solve(op, s.b)
    whole = hg.Nystrom(rank=7, rho=0.1, sketch="gaussian", seed=2).solve(
        hg.MatrixOperator(s.A), s.b
    )
    assert op.num_matvecs == 7 == chunked.num_hvps
    assert rel(chunked.value, whole.value) < 1e-13


def test_nystrom_sketch_rejects_unknown_sketch():
    with pytest.raises(ValueError, match="sketch"):
        hg.nystrom_sketch(hg.MatrixOperator(torch.eye(3, dtype=DT)), 2, "rademacher")


# ----------------------------------------------------------------------------- NystromPCG


def _outliers(n: int = 200, k: int = 10, seed: int = 51) -> System:
    """A cluster in [0.5, 1] plus ``k`` large outlying eigenvalues 1e1..1e4."""
    cluster = 0.5 + 0.5 * torch.rand(n - k, generator=gen(seed), dtype=DT)
    return make_system(torch.cat([torch.logspace(1, 4, k, dtype=DT), cluster]), seed)


def test_nystrom_pcg_needs_few_iterations_with_outlying_eigenvalues():
    s = _outliers()
    tol = 1e-8
    plain = hg.CG(maxiter=500, tol=tol).solve(hg.MatrixOperator(s.A), s.b)
    op = hg.MatrixOperator(s.A)
    pcg = hg.NystromPCG(rank=20, maxiter=500, tol=tol, seed=0).solve(op, s.b)
    assert plain.status == pcg.status == "converged"
    assert pcg.iterations <= 20
    assert pcg.iterations + 10 <= plain.iterations
    assert pcg.stats["sketch_hvps"] == 20
    assert pcg.num_hvps == pcg.iterations + 20 == op.num_matvecs
    assert pcg.residual_norm <= tol * float(s.b.norm())
    assert dense_residual(s.A, s.b, pcg.value) <= 1.01 * tol * float(s.b.norm())
    assert rel(pcg.value, s.x) < 1e-7


def test_nystrom_pcg_reuses_its_sketch_and_refreshes():
    s = random_spd(20, seed=52)
    solver = hg.NystromPCG(rank=5, maxiter=100, tol=1e-10, seed=0, refresh_every=3)
    sketches, values = [], []
    for _ in range(4):
        op = hg.MatrixOperator(s.A)
        sol = solver.solve(op, s.b)
        assert sol.num_hvps == op.num_matvecs
        assert sol.num_hvps == sol.iterations + sol.stats["sketch_hvps"]
        assert rel(sol.value, s.x) < 1e-8
        sketches.append(sol.stats["sketch_hvps"])
        values.append(sol.value)
    assert sketches == [5, 0, 0, 5]
    # Calls 2 and 3 used the stored sketch: the same preconditioner, the same iterates.
    assert torch.equal(values[1], values[0]) and torch.equal(values[2], values[0])
    assert not torch.equal(values[3], values[0])  # call 4 drew a new sketch
    solver.reset()
    assert solver.solve(hg.MatrixOperator(s.A), s.b).stats["sketch_hvps"] == 5
    assert solver.solve(hg.MatrixOperator(s.A), s.b).stats["sketch_hvps"] == 0
    # A system of another size cannot use the stored sketch.
    s2 = random_spd(12, seed=53)
    sol = solver.solve(hg.MatrixOperator(s2.A), s2.b)
    assert sol.stats["sketch_hvps"] == 5 and rel(sol.value, s2.x) < 1e-8


@pytest.mark.parametrize("mu", [0.0, 1.0])
@pytest.mark.parametrize("sketch", ["column", "gaussian"])
def test_nystrom_pcg_low_rank_converges_to_the_solution(sketch, mu):
    s = _outliers(n=60, k=6, seed=55)
    op = hg.MatrixOperator(s.A)
    sol = hg.NystromPCG(rank=8, maxiter=200, tol=1e-11, mu=mu, sketch=sketch, seed=1).solve(op, s.b)
    assert sol.status == "converged"
    assert sol.num_hvps == op.num_matvecs == sol.iterations + 8
    assert rel(sol.value, s.x) < 1e-9


def test_nystrom_pcg_refresh_every_one_sketches_every_call():
    s = random_spd(15, seed=54)
    solver = hg.NystromPCG(rank=4, tol=1e-10, seed=0)
    assert [solver.solve(hg.MatrixOperator(s.A), s.b).stats["sketch_hvps"] for _ in range(3)] == [
        4,
        4,
        4,
    ]


# ----------------------------------------------------------------------------- FixedPoint


def _linear_contraction():
    g = gen(61)
    p, q = 6, 3
    M = torch.randn(p, p, generator=g, dtype=DT)
    M = 0.5 * M / torch.linalg.matrix_norm(M, ord=2)  # ||M||_2 = 0.5, not symmetric
    B = torch.randn(p, q, generator=g, dtype=DT)
    phi = torch.randn(q, generator=g, dtype=DT)
    t = torch.randn(p, generator=g, dtype=DT)
    I = torch.eye(p, dtype=DT)
    theta = torch.linalg.solve(I - M, B @ phi)
    closed = B.T @ torch.linalg.solve((I - M).T, theta - t)

    def T(theta, phi):
        return M @ theta + B @ phi

    def g_outer(theta, phi):
        return 0.5 * ((theta - t) ** 2).sum()

    return T, g_outer, theta, phi, closed


@pytest.mark.parametrize(
    "solver",
    [
        pytest.param(hg.FixedPoint(maxiter=200, tol=1e-14), id="FixedPoint"),
        pytest.param(hg.Exact(), id="Exact"),
        pytest.param(hg.Neumann(maxiter=200, alpha=1.0), id="Neumann"),
    ],
)
def test_implicit_fixed_point_linear_contraction_closed_form(solver):
    T, g_outer, theta, phi, closed = _linear_contraction()
    hyper, info = hg.implicit_fixed_point(T, g_outer, theta, phi, solver=solver, return_info=True)
    assert rel(hyper, closed) < 1e-10
    assert info.inner_grad_norm < 1e-12  # theta is the fixed point
    if isinstance(solver, hg.FixedPoint):
        assert info.num_hvps <= 200 and info.num_hvps == info.iterations
    if isinstance(solver, hg.Exact):
        assert info.num_hvps == 6


def test_implicit_fixed_point_default_solver_reaches_its_tolerance():
    T, g_outer, theta, phi, closed = _linear_contraction()
    hyper, info = hg.implicit_fixed_point(T, g_outer, theta, phi, return_info=True)
    assert info.status == "converged"
    # Default tol 1e-6 on the residual; ||(I - M^T)^{-1}|| <= 2 bounds the solution error.
    assert rel(hyper, closed) < 1e-5


@pytest.mark.parametrize(
    "solver", [hg.CG(), hg.Nystrom(rank=3), hg.NystromPCG(rank=3)], ids=["CG", "Nys", "PCG"]
)
def test_implicit_fixed_point_refuses_symmetric_only_solvers(solver):
    T, g_outer, theta, phi, _ = _linear_contraction()
    with pytest.raises(ValueError, match="symmetric"):
        hg.implicit_fixed_point(T, g_outer, theta, phi, solver=solver)


def test_fixed_point_richardson_matches_the_iteration_formula():
    # x_k = sum_{j<k} omega (I - omega A)^j b: the Neumann partial sum with k - 1 products.
    s = random_spd(8, seed=62)
    omega = 1.0 / s.hi
    sol = hg.FixedPoint(maxiter=7, tol=0.0, omega=omega).solve(hg.MatrixOperator(s.A), s.b)
    neu = hg.Neumann(maxiter=6, alpha=omega).solve(hg.MatrixOperator(s.A), s.b)
    assert sol.num_hvps == 7 and sol.iterations == 7 and sol.status == "max_iterations"
    assert rel(sol.value, neu.value) < 1e-14


def test_fixed_point_reports_divergence():
    s = random_spd(8, seed=63)  # lambda_max = 10: omega must be < 0.2
    sol = hg.FixedPoint(maxiter=500, omega=0.5).solve(hg.MatrixOperator(s.A), s.b)
    assert sol.status == "diverged" and sol.converged is False
    assert sol.iterations < 500
    assert bool(torch.isfinite(sol.value).all())


def test_fixed_point_warm_start_from_the_solution():
    s = random_spd(8, seed=64)
    op = hg.MatrixOperator(s.A)
    sol = hg.FixedPoint(maxiter=50, tol=1e-10, omega=0.1).solve(op, s.b, x0=s.x)
    assert sol.status == "converged" and sol.iterations == 0
    assert sol.num_hvps == 1 == op.num_matvecs
    assert torch.equal(sol.value, s.x)


def test_fixed_point_zero_rhs_with_a_warm_start_converges_to_zero():
    s = random_spd(5, seed=65, lo=1.0, hi=2.0)
    b = torch.zeros(5, dtype=DT)
    sol = hg.FixedPoint(maxiter=200, omega=0.5).solve(hg.MatrixOperator(s.A), b, x0=s.b)
    assert sol.status != "diverged"
    assert float(sol.value.norm()) < 1e-6 * float(s.b.norm())


# ----------------------------------------------------------------------------- bad input


BAD_ARGS = [
    # (constructor, kwargs, exception, argument named in the message)
    (hg.CG, {"maxiter": 0}, ValueError, "maxiter"),
    (hg.CG, {"maxiter": -3}, ValueError, "maxiter"),
    (hg.CG, {"maxiter": 2.5}, (ValueError, TypeError), "maxiter"),
    (hg.CG, {"maxiter": 10.0}, (ValueError, TypeError), "maxiter"),
    (hg.CG, {"maxiter": True}, (ValueError, TypeError), "maxiter"),
    (hg.CG, {"maxiter": "10"}, (ValueError, TypeError), "maxiter"),
    (hg.CG, {"tol": -1e-6}, ValueError, "tol"),
    (hg.CG, {"tol": float("nan")}, ValueError, "tol"),
    (hg.CG, {"tol": "1e-6"}, TypeError, "tol"),
    (hg.CG, {"atol": -1.0}, ValueError, "atol"),
    (hg.CG, {"preconditioner": "jacobi"}, TypeError, "preconditioner"),
    (hg.Neumann, {"maxiter": 0}, ValueError, "maxiter"),
    (hg.Neumann, {"maxiter": True}, (ValueError, TypeError), "maxiter"),
    (hg.Neumann, {"iters": 0}, ValueError, "iters"),
    (hg.Neumann, {"iters": True}, (ValueError, TypeError), "iters"),
    (hg.Neumann, {"iters": 3.5}, (ValueError, TypeError), "iters"),
    (hg.Neumann, {"alpha": 0.0}, ValueError, "alpha"),
    (hg.Neumann, {"alpha": -0.1}, ValueError, "alpha"),
    (hg.Neumann, {"alpha": float("inf")}, ValueError, "alpha"),
    (hg.Neumann, {"alpha": "fast"}, (ValueError, TypeError), "alpha"),
    (hg.Neumann, {"alpha": True}, (ValueError, TypeError), "alpha"),
    (hg.Neumann, {"tol": -1e-3}, ValueError, "tol"),
    (hg.Neumann, {"power_iters": 0}, ValueError, "power_iters"),
    (hg.Nystrom, {"rank": 0}, ValueError, "rank"),
    (hg.Nystrom, {"rank": -2}, ValueError, "rank"),
    (hg.Nystrom, {"rank": True}, (ValueError, TypeError), "rank"),
    (hg.Nystrom, {"rank": 4.0}, (ValueError, TypeError), "rank"),
    (hg.Nystrom, {"rho": 0.0}, ValueError, "rho"),
    (hg.Nystrom, {"rho": -1.0}, ValueError, "rho"),
    (hg.Nystrom, {"sketch": "rademacher"}, ValueError, "sketch"),
    (hg.Nystrom, {"chunk_size": 0}, ValueError, "chunk_size"),
    (hg.NystromPCG, {"rank": 0}, ValueError, "rank"),
    (hg.NystromPCG, {"rank": False}, (ValueError, TypeError), "rank"),
    (hg.NystromPCG, {"maxiter": 0}, ValueError, "maxiter"),
    (hg.NystromPCG, {"tol": -1.0}, ValueError, "tol"),
    (hg.NystromPCG, {"mu": -1.0}, ValueError, "mu"),
    (hg.NystromPCG, {"sketch": "srht"}, ValueError, "sketch"),
    (hg.NystromPCG, {"refresh_every": 0}, ValueError, "refresh_every"),
    (hg.FixedPoint, {"maxiter": 0}, ValueError, "maxiter"),
    (hg.FixedPoint, {"maxiter": True}, (ValueError, TypeError), "maxiter"),
    (hg.FixedPoint, {"tol": -1.0}, ValueError, "tol"),
    (hg.FixedPoint, {"omega": 0.0}, ValueError, "omega"),
    (hg.Exact, {"max_size": 0}, ValueError, "max_size"),
    (hg.Exact, {"rcond": -1.0}, ValueError, "rcond"),
    (hg.Identity, {"scale": 0.0}, ValueError, "scale"),
]


@pytest.mark.parametrize(
    ("cls", "kwargs", "exc", "name"),
    BAD_ARGS,
    ids=[f"{c.__name__}-{k}={v!r}" for c, kw, _, _ in BAD_ARGS for k, v in kw.items()],
)
def test_bad_constructor_arguments_are_refused(cls, kwargs, exc, name):
    with pytest.raises(exc, match=f"`{name}`"):
        cls(**kwargs)


def test_exact_refuses_systems_above_max_size():
    s = random_spd(6, seed=71)
    op = hg.MatrixOperator(s.A)
    with pytest.raises(ValueError, match="max_size"):
        hg.Exact(max_size=5).solve(op, s.b)
    assert op.num_matvecs == 0


def test_numpy_integer_arguments_are_accepted():
    assert hg.CG(maxiter=np.int64(5)).maxiter == 5
    assert hg.Nystrom(rank=np.int32(3)).rank == 3


def test_numpy_float32_arguments_are_accepted():
    assert hg.Nystrom(rho=np.float32(0.5)).rho == 0.5


# ----------------------------------------------------------------------------- dtypes


DTYPE_SOLVERS = [
    pytest.param(lambda n: hg.CG(maxiter=n, tol=1e-12), id="CG"),
    pytest.param(lambda n: hg.Neumann(maxiter=60, alpha=0.4), id="Neumann"),
    pytest.param(lambda n: hg.Nystrom(rank=n, rho=1e-13, sketch="column", seed=0), id="Nys-col"),
    pytest.param(lambda n: hg.Nystrom(rank=n, rho=1e-13, sketch="gaussian", seed=0), id="Nys-g"),
    pytest.param(lambda n: hg.NystromPCG(rank=n // 2, tol=1e-12, seed=0), id="NystromPCG"),
    pytest.param(lambda n: hg.Exact(), id="Exact"),
    pytest.param(lambda n: hg.FixedPoint(maxiter=60, tol=1e-12, omega=0.4), id="FixedPoint"),
]


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 1e-4), (torch.float64, 1e-10)], ids=["f32", "f64"]
)
@pytest.mark.parametrize("factory", DTYPE_SOLVERS)
def test_float32_and_float64_on_a_well_conditioned_system(factory, dtype, tol, device):
    # Eigenvalues in [1, 4]: alpha = 0.4 contracts by at most 0.6 per product (0.6^60 ~ 5e-14).
    s = random_spd(20, seed=81, lo=1.0, hi=4.0)
    A, b = s.A.to(dtype), s.b.to(dtype)
    ref = torch.linalg.solve(A.to(DT), b.to(DT))  # the float32 system, solved in float64
    sol = factory(s.n).solve(hg.MatrixOperator(to_device(device, A)), to_device(device, b))
    assert sol.value.dtype == dtype and sol.value.device.type == device.type
    assert rel(sol.value, ref) < tol


# ----------------------------------------------------------------------------- devices
# (the ``device`` fixture is in conftest.py: cpu, and cuda / mps where available)


@pytest.mark.parametrize(("factory", "tol", "budget"), SOLVERS)
def test_solvers_on_device(factory, tol, budget, device):
    s = random_spd(12, seed=91)
    A, b = to_device(device, (s.A, s.b))
    op = hg.MatrixOperator(A)
    solver = factory(s.n, s.lo, s.hi)
    sol = solver.solve(op, b)
    assert sol.value.device.type == device.type
    lo, hi = budget(solver, s.n)
    assert lo <= sol.num_hvps <= hi and sol.num_hvps == op.num_matvecs
    assert rel(sol.value, s.x) <= max(tol, 1e-8)


def test_lambda_max_estimate_and_auto_neumann_on_device(device):
    """The power iteration's start vector is drawn on the CPU: the same on every device."""
    s = random_spd(12, seed=92, lo=1.0, hi=5.0)
    A, b = to_device(device, (s.A, s.b))
    lam = hg.estimate_lambda_max(hg.MatrixOperator(A), 200, gen(0))
    assert lam == pytest.approx(s.hi, rel=1e-6)
    sol = hg.Neumann(maxiter=400, alpha="auto", tol=1e-13).solve(hg.MatrixOperator(A), b)
    assert sol.converged and sol.value.device.type == device.type
    assert rel(sol.value, s.x) < 1e-11


@pytest.mark.parametrize(
    "solver",
    [hg.Neumann(maxiter=3, alpha=0.1), hg.Nystrom(rank=2, rho=0.5, seed=0)],
    ids=["neumann", "nystrom"],
)
def test_warm_start_from_the_solution_returns_it(solver):
    """Fixed-budget solvers solve for the correction b - A x0, so x0 = A^{-1} b is kept."""
    s = random_spd(6, seed=90, lo=1.0, hi=3.0)
    sol = solver.solve(hg.MatrixOperator(s.A), s.b, x0=s.x)
    assert rel(sol.value, s.x) < 1e-12
    cold = solver.solve(hg.MatrixOperator(s.A), s.b)
    assert rel(cold.value, s.x) > 1e-3  # the budget alone is not enough


def test_cg_with_zero_tolerance_stops_at_rounding_level_not_at_false_curvature():
    """tol=0 must not iterate until p^T A p underflows and reads as negative curvature."""
    s = random_spd(12, seed=91, lo=0.5, hi=5.0)
    for solver in (
        hg.CG(maxiter=500, tol=0.0),
        hg.NystromPCG(rank=12, maxiter=500, tol=0.0, seed=0),
    ):
        sol = solver.solve(hg.MatrixOperator(s.A), s.b)
        assert sol.status == "converged", sol.status
        assert sol.iterations < 100
        assert rel(sol.value, s.x) < 1e-12


def test_residual_false_skips_the_diagnostic_product():
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(30, 4, generator=g, dtype=DT), torch.randn(30, generator=g, dtype=DT)
    lam = torch.full((4,), 0.5, dtype=DT)
    w = torch.linalg.solve(X.T @ X + torch.diag(lam), X.T @ y)

    def inner(w, lam):
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (lam * w**2).sum()

    def outer(w, lam):
        return 0.5 * ((X[:10] @ w - y[:10]) ** 2).sum()

    solver = hg.Neumann(6, alpha=0.01)
    on, info_on = hg.implicit(inner, outer, w, lam, solver, return_info=True)
    off, info_off = hg.implicit(inner, outer, w, lam, solver, return_info=True, residual=False)
    assert torch.equal(on, off)
    assert info_on.extra_hvps == 1 and info_on.residual_norm is not None
    assert info_off.extra_hvps == 0 and info_off.residual_norm is None
    assert info_on.num_hvps == info_off.num_hvps == 6
    assert hg.Implicit(residual=False).config()["residual"] is False
    with pytest.raises(TypeError, match="residual"):
        hg.Implicit(residual="no")
