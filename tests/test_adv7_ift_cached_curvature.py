"""IFT's default series keeps the "indefinite" verdict of its cached curvature estimate for
``refresh_every`` calls (``stats["indefinite_estimate"] == "cached"``), and warned at each
of them that it "met non-positive curvature p^T H p <= 0 after 50 iteration(s): the Hessian
is not positive definite at `params`", also once the Hessian was positive definite
(eigenvalues 0.5, 1, 3): a false claim. The warning now says where the verdict comes from."""

from __future__ import annotations

import warnings

import torch

import hypergradient as hg


def _problem(shift):
    H = torch.diag(torch.tensor([3.0, 1.0, shift], dtype=torch.float64))

    def f(t, h):
        return 0.5 * t @ H @ t - h * t.sum()

    def g(t, h):
        return (t**2).sum()

    theta = torch.ones(3, dtype=torch.float64)
    return hg.Problem(f, g, theta, torch.tensor(0.2, dtype=torch.float64), lr=0.1)


def _messages(method, problem):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, info = method(problem)
    return [str(w.message) for w in caught if issubclass(w.category, hg.HypergradientWarning)], info


def test_a_cached_indefinite_verdict_is_not_reported_as_met_curvature():
    method = hg.IFT(seed=0, maxiter=50)
    first, info = _messages(method, _problem(-0.5))  # indefinite, estimated this call
    assert info.status == "negative_curvature" and "met non-positive curvature" in first[0]
    later, info = _messages(method, _problem(0.5))  # positive definite, cached verdict
    assert info.stats["indefinite_estimate"] == "cached" and not info.stats["estimated"]
    assert len(later) == 1 and "met non-positive curvature" not in later[0]
    assert "cached curvature estimate" in later[0] and "earlier call" in later[0]
    # the series itself is that of the PD system: x = sum_k (I - a H)^k a b, k <= 50
    H = torch.diag(torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64))
    b = 2 * torch.ones(3, dtype=torch.float64)
    a = info.stats["alpha"]
    M = torch.eye(3, dtype=torch.float64) - a * H
    x = sum(torch.linalg.matrix_power(M, k) @ (a * b) for k in range(51))
    assert torch.allclose(info.solution, x, rtol=1e-12, atol=0)
