"""Honest warnings of the implicit methods (issue 10, item 5).

A ``HypergradientWarning`` names the knob to turn when

- ``hg.implicit`` is called where the inner gradient is large next to the outer one
  (``||grad_theta f|| > stationarity * ||grad_theta g||``, default 0.05): measured on
  per-feature L2 logistic regression (breast cancer), the hypergradient's relative error
  was 0.2 to 1.0 wherever the ratio exceeded 0.05 (ratios 0.73 at 5 gradient steps,
  0.03 at 500, 1e-5 at 5,000 and 0 at the Newton optimum, for errors 0.94, 0.17, 4e-4, 0);
- an iterative solver stops at ``maxiter`` with a relative residual more than 10 times
  its tolerance;

and a healthy call (a converged inner problem, a solver that meets its tolerance) warns
about nothing. IFT's default Neumann series is a fixed budget by design: no warning.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F

import hypergradient as hg

DT = torch.float64


@functools.cache
def logreg():
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X, y = torch.tensor(X, dtype=DT), torch.tensor(y, dtype=DT)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    X, y = X[perm], y[perm]
    X = (X - X[:284].mean(0)) / X[:284].std(0)
    Xt, yt, Xv, yv = X[:284], y[:284], X[284:], y[284:]
    h = torch.linspace(-7.0, -2.0, 30, dtype=DT)

    def f(p, h):
        return (
            F.binary_cross_entropy_with_logits(Xt @ p[0] + p[1], yt)
            + 0.5 * (h.exp() * p[0] ** 2).sum()
        )

    def g(p, h):
        return F.binary_cross_entropy_with_logits(Xv @ p[0] + p[1], yv)

    return f, g, h, Xt, yt


def gradient_descent(f, h, steps, lr=1.0):
    p = [torch.zeros(30, dtype=DT), torch.zeros(1, dtype=DT)]
    for _ in range(steps):
        p = [t.detach().requires_grad_(True) for t in p]
        grads = torch.autograd.grad(f(p, h), p)
        p = [t.detach() - lr * gr for t, gr in zip(p, grads)]
    return tuple(p)


@functools.cache
def optimum():
    """The inner optimum by Newton's method with the closed-form Hessian
    ``[X 1]^T diag(s (1 - s)) [X 1] / n + diag(exp(h), 0)``."""
    f, _, h, X, y = logreg()
    A = torch.cat([X, torch.ones(len(y), 1, dtype=DT)], 1)
    decay = torch.cat([h.exp(), torch.zeros(1, dtype=DT)])
    theta = torch.zeros(31, dtype=DT)
    for _ in range(50):
        s = torch.sigmoid(A @ theta)
        grad = A.T @ (s - y) / len(y) + decay * theta
        if float(grad.norm()) < 1e-14:
            break
        hess = A.T @ (A * (s * (1 - s))[:, None]) / len(y) + torch.diag(decay)
        theta = theta - torch.linalg.solve(hess, grad)
    return (theta[:30], theta[30:])


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_far_from_the_inner_optimum_warns_with_the_numbers():
    f, g, h = logreg()[:3]
    exact = hg.implicit(f, g, optimum(), h, hg.Exact())
    p5 = gradient_descent(f, h, 5)
    with pytest.warns(hg.HypergradientWarning, match="stationarity") as caught:
        out, info = hg.implicit(f, g, p5, h, hg.Exact(), return_info=True)
    message = str(caught[0].message)
    ratio = info.inner_grad_norm / info.outer_grad_norm
    assert ratio > 0.5 and f"{info.inner_grad_norm:.3g}" in message
    assert f"{ratio:.3g} times" in message and "Train the inner problem further" in message
    assert rel(out, exact) > 0.66  # the error the warning is about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hg.implicit(f, g, p5, h, hg.Exact(), stationarity=None)  # the knob: no check
        hg.implicit(f, g, p5, h, hg.Exact(), stationarity=2.0)  # or a looser ratio


def test_a_converged_call_warns_about_nothing():
    f, g, h = logreg()[:3]
    p = optimum()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, info = hg.implicit(f, g, p, h, hg.CG(maxiter=100, tol=1e-10), return_info=True)
        exact = hg.implicit(f, g, p, h, hg.Exact())
        # IFT's default Neumann series: a fixed budget, no maxiter warning
        hg.IFT(seed=0)(hg.Problem(f, g, p, h, lr=0.5))
        hg.IFT(hg.Neumann(maxiter=3, alpha=0.5))(hg.Problem(f, g, p, h))
    assert info.status == "converged" and info.inner_grad_norm < 1e-12
    assert rel(out, exact) < 1e-8


def test_cg_stopped_far_from_its_tolerance_warns():
    f, g, h = logreg()[:3]
    p = optimum()
    _, info = hg.implicit(f, g, p, h, hg.CG(maxiter=5, tol=0.0), return_info=True)
    achieved = info.relative_residual  # 5 steps on a system of condition ~1e3
    assert 1e-3 < achieved < 1.0
    with pytest.warns(hg.HypergradientWarning, match="maxiter=5") as caught:
        hg.implicit(f, g, p, h, hg.CG(maxiter=5, tol=achieved / 100))
    message = str(caught[0].message)
    assert f"{achieved:.3g}" in message and "Raise maxiter" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hg.implicit(f, g, p, h, hg.CG(maxiter=5, tol=achieved / 5))  # within 10x: silent
        hg.implicit(f, g, p, h, hg.CG(maxiter=5, tol=0.0))  # tol=0: a fixed budget
    # HOAG's CG alike
    with pytest.warns(hg.HypergradientWarning, match="maxiter=5"):
        hg.HOAG(maxiter=5, tol=achieved / 100)(hg.Problem(f, g, p, h))
