"""``hg.Exact`` on models below float64: its cut and its residual are at the products'
rounding level, not float64's.

- An overparameterized linear model (10 samples, 40 weights) has a Hessian of rank 10. In
  float32 its 30 zero eigenvalues are read as rounding noise (~1e-8 relative, 16 of them
  negative); the cut ``rcond=1e-13`` kept them, and inverting them gave a hypergradient 11
  times the exact one (``||x|| ~ 1e8`` against 0.68), with ``negative_eigenvalues=16`` at a
  minimum. Reference: the minimum-norm interpolant ``theta*(h) = X^+ (y + h)``, whose
  hypergradient is ``(X^+)^T grad_theta g`` in closed form.
- A float16 or bfloat16 model's materialized Hessian is symmetric only to its rounding; the
  residual was read against the unsymmetrized matrix (5e-5 relative for float16), and
  ``hg.implicit`` warned that a well-conditioned Hessian was singular.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

F64 = torch.float64


def _overparameterized():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(10, 40, generator=g, dtype=F64)
    y = torch.randn(10, generator=g, dtype=F64)
    Xv = torch.randn(15, 40, generator=g, dtype=F64)
    yv = torch.randn(15, generator=g, dtype=F64)
    return X, y, Xv, yv


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_singular_float32_hessian_gets_the_minimum_norm_hypergradient(dtype):
    X, y, Xv, yv = _overparameterized()
    theta = torch.linalg.pinv(X) @ y  # a minimum of the inner loss (it interpolates)
    ref = torch.linalg.pinv(X).T @ (Xv.T @ (Xv @ theta - yv) / 15)
    Xd, yd, Xvd, yvd = X.to(dtype), y.to(dtype), Xv.to(dtype), yv.to(dtype)

    def f(t, h):  # h: offsets of the training targets (enters the inner loss only)
        return 0.5 * ((Xd @ t - yd - h) ** 2).mean()

    def g(t, h):
        return 0.5 * ((Xvd @ t - yvd) ** 2).mean()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)  # (b leaves the range)
        out, info = hg.implicit(
            f, g, theta.to(dtype), torch.zeros(10, dtype=dtype), hg.Exact(), return_info=True
        )
    rel = float((out.double() - ref).norm() / ref.norm())
    assert rel < (1e-12 if dtype == F64 else 1e-5)  # was 11.0 in float32
    assert float(info.solution.norm()) < 1.0  # was 1.1e8 (the exact one: 0.68)
    assert info.stats["negative_eigenvalues"] == 0  # a minimum (was 16 in float32)


def test_the_cut_stays_rcond_for_float64_and_follows_an_explicit_rcond():
    A = torch.diag(torch.tensor([1e-12, 1.0, 2.0], dtype=F64))  # resolvable in float64
    b = torch.ones(3, dtype=F64)
    sol = hg.Exact().solve(hg.MatrixOperator(A), b)
    assert float(sol.value[0]) == pytest.approx(1e12, rel=1e-9)
    sol = hg.Exact(rcond=1e-6).solve(hg.MatrixOperator(A), b)
    assert float(sol.value[0]) == 0.0 and float(sol.value[2]) == pytest.approx(0.5)
    # float32: a matrix given exactly symmetric shows no rounding (a diagonal's products are
    # exact): rcond alone, 1e-12 is inverted
    sol = hg.Exact().solve(hg.MatrixOperator(A.float()), b.float())
    assert float(sol.value[0]) == pytest.approx(1e12, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_is_not_called_singular(dtype):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(100, 6, generator=g, dtype=F64)
    Y = (torch.rand(100, generator=g) < 0.5).to(F64)
    Xv = torch.randn(50, 6, generator=g, dtype=F64)
    Yv = (torch.rand(50, generator=g) < 0.5).to(F64)
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def losses(dt):
        Xd, Yd, Xvd, Yvd = X.to(dt), Y.to(dt), Xv.to(dt), Yv.to(dt)
        return (
            lambda t, h: bce(Xd @ t, Yd) + 0.5 * h * (t**2).sum(),
            lambda t, h: bce(Xvd @ t, Yvd),
        )

    theta = torch.zeros(6, dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=200, tolerance_grad=1e-14, tolerance_change=0)
    f64, g64 = losses(F64)
    lam = torch.tensor(0.1, dtype=F64)

    def closure():
        opt.zero_grad()
        loss = f64(theta, lam)
        loss.backward()
        return loss

    opt.step(closure)
    theta = theta.detach()
    ref = hg.implicit(f64, g64, theta, lam, hg.Exact())
    f, g = losses(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)  # was "singular" (float16)
        out, info = hg.implicit(
            f, g, theta.to(dtype), lam.to(dtype), hg.Exact(), return_info=True, stationarity=None
        )
    assert info.relative_residual < 1e-12  # of the (symmetric) matrix solved: was 5e-5
    eps = torch.finfo(dtype).eps
    assert abs(float(out) - float(ref)) <= 4 * eps * abs(float(ref))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_singular_fixed_point_system_gets_the_minimum_norm_solution(dtype):
    """The non-symmetric path (``I - J^T`` of a fixed-point map): LU of the singular
    ``I - J^T = lr H``, invertible by its rounding, returned ``||x|| ~ 1e17`` (float64,
    relative residual 3.1, error 2.6) and ``1e9`` (float32, error 5.7, no warning)."""
    X, y, Xv, yv = _overparameterized()
    theta = torch.linalg.pinv(X) @ y
    ref = torch.linalg.pinv(X).T @ (Xv.T @ (Xv @ theta - yv) / 15)
    Xd, yd, Xvd, yvd = X.to(dtype), y.to(dtype), Xv.to(dtype), yv.to(dtype)

    def step(t, h):  # one gradient step: its fixed points are the inner minima
        return t - 0.1 * Xd.T @ (Xd @ t - yd - h) / 10

    def g(t, h):
        return 0.5 * ((Xvd @ t - yvd) ** 2).mean()

    with pytest.warns(hg.HypergradientWarning, match="singular"):  # true now: b leaves it
        out, info = hg.implicit_fixed_point(
            step, g, theta.to(dtype), torch.zeros(10, dtype=dtype), hg.Exact(), return_info=True
        )
    rel = float((out.double() - ref).norm() / ref.norm())
    assert rel < (1e-12 if dtype == F64 else 1e-5)
    x = info.solution.double()  # the minimum-norm solution: ||x|| = 6.8
    assert float(x.norm()) < 10.0
    assert info.relative_residual == pytest.approx(0.902, abs=1e-3)  # b's part off the range


def test_a_regular_non_symmetric_system_is_still_solved_by_lu():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(12, 12, generator=g, dtype=F64) + 4 * torch.eye(12, dtype=F64)
    b = torch.randn(12, generator=g, dtype=F64)
    sol = hg.Exact().solve(hg.MatrixOperator(A, symmetric=False), b)
    assert torch.allclose(sol.value, torch.linalg.solve(A, b), rtol=1e-12, atol=1e-14)
    assert sol.residual_norm < 1e-13


def test_the_cut_does_not_drop_real_eigenvalues_of_a_bfloat16_model():
    """A cut at a fixed 10 eps of bfloat16 (7.8 % of the largest eigenvalue) dropped most
    directions of a ridge model of condition 100 (hypergradient 96 % off)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 20, generator=g, dtype=F64) * torch.logspace(0, -1.5, 20, dtype=F64)
    y = torch.randn(200, generator=g, dtype=F64)
    Xv, yv = torch.randn(50, 20, generator=g, dtype=F64), torch.randn(50, generator=g, dtype=F64)
    lam = torch.tensor(0.01, dtype=F64)
    theta = torch.linalg.solve(X.T @ X / 200 + lam * torch.eye(20, dtype=F64), X.T @ y / 200)

    def losses(dt):
        Xd, yd, Xvd, yvd = X.to(dt), y.to(dt), Xv.to(dt), yv.to(dt)
        return (
            lambda t, h: 0.5 * ((Xd @ t - yd) ** 2).mean() + 0.5 * h * (t**2).sum(),
            lambda t, h: 0.5 * ((Xvd @ t - yvd) ** 2).mean(),
        )

    ref = float(hg.implicit(*losses(F64), theta, lam, hg.Exact()))
    bf = torch.bfloat16
    out = hg.implicit(*losses(bf), theta.to(bf), lam.to(bf), hg.Exact(), stationarity=None)
    assert abs(float(out) - ref) < 0.02 * abs(ref)  # measured 0.5 %


def test_small_real_eigenvalues_of_a_float32_relu_network_are_inverted():
    """A ReLU network with dead units: exact zero rows, and real eigenvalues down to 1.8e-8
    of the largest that float32 resolves (its hypergradient matches float64's to 1e-6); a
    cut at a fixed 10 eps of float32 dropped them (23 % off). Saddle: 8 negative ones."""
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(60, 5, generator=g, dtype=F64), torch.randn(60, generator=g, dtype=F64)
    Xv, Yv = torch.randn(30, 5, generator=g, dtype=F64), torch.randn(30, generator=g, dtype=F64)
    W1, b1 = torch.randn(12, 5, generator=g, dtype=F64), torch.randn(12, generator=g, dtype=F64)
    b1[:4] = -50.0  # four dead units
    W2 = 0.3 * torch.randn(1, 12, generator=g, dtype=F64)

    def run(dt):
        Xd, Yd, Xvd, Yvd = X.to(dt), Y.to(dt), Xv.to(dt), Yv.to(dt)

        def net(p, x):
            return (torch.relu(x @ p[0].T + p[1]) @ p[2].T).squeeze(-1)

        def f(p, lam):
            return (net(p, Xd) - Yd).pow(2).mean() + lam * (p[2] ** 2).sum()

        def gv(p, lam):
            return (net(p, Xvd) - Yvd).pow(2).mean()

        params = [W1.to(dt), b1.to(dt), W2.to(dt)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hg.HypergradientWarning)
            return hg.implicit(
                f, gv, params, torch.tensor(0.1, dtype=dt), hg.Exact(), return_info=True,
                stationarity=None,
            )  # fmt: skip

    ref, info64 = run(F64)
    out, info = run(torch.float32)
    assert abs(float(out) - float(ref)) < 1e-5 * abs(float(ref))
    assert info.stats["negative_eigenvalues"] == info64.stats["negative_eigenvalues"] > 0
