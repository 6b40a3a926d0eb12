"""``damping="auto"`` on every implicit method (issue 10, item 2).

The damping comes from a Lanczos estimate of the extreme eigenvalues of ``H``
(``lambda = max(0, -lambda_min) + rel * radius``), cached across the calls of a method
object, refreshed every ``refresh_every`` calls and at once when a solve with the cached
damping meets negative curvature. References: on systems of at most ``maxiter``
unknowns Lanczos finds the exact eigenvalues (an invariant subspace), so the damping is
known in closed form and the hypergradient is a dense solve of the damped system.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg
from hypergradient.solvers import AutoDamping

DT = torch.float64
REL = 1e-3


def quadratic(diag, seed=0):
    """``f = 0.5 w^T (Q diag Q^T) w - (h * w).sum()``, ``g = 0.5 ||w - t||^2``: the
    hypergradient with damping ``d`` is ``(H + d I)^{-1} (w - t)`` (d_phi grad f = -I)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(diag)
    Q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT)).Q
    H = Q @ torch.diag(torch.tensor(diag, dtype=DT)) @ Q.T
    H = 0.5 * (H + H.T)
    t = torch.randn(n, generator=gen, dtype=DT)
    w = torch.randn(n, generator=gen, dtype=DT)
    h = torch.randn(n, generator=gen, dtype=DT)

    def f(w, h):
        return 0.5 * w @ (H @ w) - (h * w).sum()

    def g(w, h):
        return 0.5 * ((w - t) ** 2).sum()

    def reference(d):
        return torch.linalg.solve(H + d * torch.eye(n, dtype=DT), w - t)

    return f, g, w, h, H, reference


def closed_damping(diag, rel=REL):
    lo, hi = min(diag), max(diag)
    return max(0.0, -lo) + rel * max(hi, abs(lo), 0.0)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def test_hg_implicit_auto_damping_on_an_indefinite_hessian():
    diag = [-0.5, 0.01, 0.3, 1.0, 2.0, 4.0]
    f, g, w, h, H, reference = quadratic(diag)
    out, info = hg.implicit(
        f,
        g,
        w,
        h,
        hg.CG(maxiter=50, tol=1e-13),
        damping="auto",
        return_info=True,
        stationarity=None,
    )
    d = closed_damping(diag)  # 0.5 + 1e-3 * 4
    assert info.stats["damping"] == pytest.approx(d, rel=1e-10)
    assert info.stats["damping_estimated"] and info.stats["damping_hvps"] == 6
    assert info.stats["lambda_min"] == pytest.approx(-0.5, rel=1e-10)
    assert info.status == "converged"
    assert rel_err(out, reference(d)) < 1e-9
    # the products of the estimate are counted
    assert info.num_hvps == 6 + info.iterations + info.stats.get("verify_hvps", 0)


def test_the_estimate_is_cached_refreshed_and_checkpointed():
    diag = [0.02, 0.3, 1.0, 2.0, 4.0]
    f, g, w, h, H, reference = quadratic(diag, seed=1)
    problem = hg.Problem(f, g, w, h)
    method = hg.Implicit(hg.CG(maxiter=50, tol=1e-13), damping=AutoDamping(refresh_every=2, seed=0))
    estimated = []
    for _ in range(3):
        out, info = method(problem)
        estimated.append(info.stats["damping_estimated"])
        assert info.stats["damping"] == pytest.approx(closed_damping(diag), rel=1e-10)
        assert rel_err(out, reference(closed_damping(diag))) < 1e-9
    assert estimated == [True, False, True]  # every refresh_every=2 calls
    state = method.state_dict()
    assert set(state) == {"damping"} and state["damping"]["calls"] == 3
    twin = hg.Implicit(hg.CG(maxiter=50, tol=1e-13), damping=AutoDamping(refresh_every=2, seed=5))
    twin.load_state_dict(state)
    a, ia = method(problem)
    b, ib = twin(problem)
    assert torch.equal(a, b) and ia.stats["damping_estimated"] == ib.stats["damping_estimated"]


def test_negative_curvature_with_a_cached_damping_re_estimates_at_once():
    pd = [0.02, 0.3, 1.0, 2.0, 4.0]
    indefinite = [-1.0, 0.3, 1.0, 2.0, 4.0]
    f1, g1, w1, h1, _, _ = quadratic(pd, seed=2)
    f2, g2, w2, h2, _, reference = quadratic(indefinite, seed=2)  # the same Q, t, w, h
    method = hg.Implicit(hg.CG(maxiter=50, tol=1e-13), damping=AutoDamping(seed=0))
    method(hg.Problem(f1, g1, w1, h1))  # caches 1e-3 * 4
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)  # the retry converges
        out, info = method(hg.Problem(f2, g2, w2, h2))
    assert info.stats["damping_retries"] == 1 and info.stats["damping_estimated"]
    assert info.stats["damping"] == pytest.approx(closed_damping(indefinite), rel=1e-10)
    assert info.status == "converged"
    assert rel_err(out, reference(closed_damping(indefinite))) < 1e-9
    assert info.num_hvps > info.stats["first_solve_hvps"] + info.iterations


def test_a_fresh_estimate_that_misses_negative_curvature_is_raised_past_it():
    # One Lanczos step sees only the Rayleigh quotient of its start vector: it misses the
    # negative eigenvalue -1; CG meets it, and the retry damps past the curvature seen.
    indefinite = [-1.0, 0.3, 1.0, 2.0, 4.0]
    f, g, w, h, H, reference = quadratic(indefinite, seed=3)
    method = hg.Implicit(hg.CG(maxiter=50, tol=1e-13), damping=AutoDamping(maxiter=1, seed=0))
    out, info = method(hg.Problem(f, g, w, h))
    d = info.stats["damping"]
    assert info.stats["damping_retries"] >= 1
    assert float(torch.linalg.eigvalsh(H + d * torch.eye(5, dtype=DT))[0]) > 0
    assert info.status == "converged"
    assert rel_err(out, reference(d)) < 1e-9


@pytest.mark.parametrize(
    "make",
    [
        lambda: hg.HOAG(maxiter=50, tol=1e-12, min_tol=1e-12, damping="auto"),
        lambda: hg.Implicit(hg.NystromPCG(rank=3, maxiter=50, tol=1e-13, seed=0), damping="auto"),
    ],
    ids=["HOAG", "NystromPCG"],
)
def test_every_implicit_method_takes_auto_damping(make):
    diag = [-0.5, 0.3, 1.0, 2.0, 4.0]
    f, g, w, h, H, reference = quadratic(diag, seed=4)
    method = make()
    out, info = method(hg.Problem(f, g, w, h, lr=0.1))
    d = closed_damping(diag)
    assert info.stats["damping"] == pytest.approx(d, rel=1e-10)
    assert rel_err(out, reference(d)) < 1e-9
    assert "damping" in method.state_dict()
    assert method.config()["damping"]["type"] == "AutoDamping"


def test_ift_default_neumann_series_on_the_damped_system():
    # The 11-term series alpha sum_j (I - alpha (H + d I))^j b with the step it reports
    diag = [-0.5, 0.3, 1.0, 2.0, 4.0]
    f, g, w, h, H, _ = quadratic(diag, seed=4)
    method = hg.IFT(damping="auto", seed=0)
    out, info = method(hg.Problem(f, g, w, h, lr=0.1))
    d, alpha = info.stats["damping"], info.stats["alpha"]
    assert d == pytest.approx(closed_damping(diag), rel=1e-10) and alpha == 0.1  # lr is safe
    A = H + d * torch.eye(5, dtype=DT)
    b = torch.func.grad(g)(w, h)  # w - t
    term, total = b.clone(), b.clone()
    for _ in range(10):
        term = term - alpha * (A @ term)
        total = total + term
    assert rel_err(out, alpha * total) < 1e-12


def test_bad_damping_is_refused():
    with pytest.raises(ValueError, match="damping"):
        hg.Implicit(damping="fast")
    with pytest.raises(ValueError, match="damping"):
        hg.HOAG(damping=-1.0)
    with pytest.raises(TypeError, match="damping"):
        hg.IFT(damping=True)
    with pytest.raises(ValueError, match="refresh_every"):
        AutoDamping(refresh_every=0)
    method = hg.Implicit(damping="auto")
    before = method.state_dict()
    with pytest.raises(ValueError):
        method.load_state_dict({"damping": {"calls": -1, "estimate": None, "generator": None}})
    assert before["damping"]["calls"] == method.state_dict()["damping"]["calls"] == 0
