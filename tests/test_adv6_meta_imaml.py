"""Adversarial review of ``hg.meta.IMAML`` on a non-convex net, against the dense formula.

Failed on the code before the review: with ``hg.Exact()``, a system ``H + lam I`` that is
indefinite at the adapted parameters (a near-saddle of the proximal objective: 300 steps
of gradient descent had not escaped it) gave status ``exact``, ``converged=True`` and no
warning, while CG on the same system reports ``negative_curvature`` and warns; the
``MetaInfo`` carried nothing that could tell. Now the status is ``negative_curvature`` with a
warning at the caller's line naming lam and damping, and the meta-gradient is still the
dense formula's (lam (H + lam I)^{-1} grad L_Q, 1e-12).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hypergradient as hg
from hypergradient import meta

DT = torch.float64
mse = nn.functional.mse_loss


def setting():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    g = torch.Generator().manual_seed(3)

    def batch(n):
        return torch.randn(n, 2, generator=g, dtype=DT), 3 * torch.randn(
            n, 1, generator=g, dtype=DT
        )

    return model, meta.parameters_of(model, copy=True), [(batch(6), batch(5))]


def dense(model, theta, task, lam, damping, steps, lr):
    """``lam (H + (lam + damping) I)^{-1} grad L_Q`` at the adapted parameters, and the
    lowest eigenvalue of the system."""
    names = list(theta)
    shapes = [theta[k].shape for k in names]

    def tree(v):
        out, i = {}, 0
        for k, s in zip(names, shapes):
            out[k] = v[i : i + s.numel()].reshape(s)
            i += s.numel()
        return out

    (xs, ys), (xq, yq) = task
    phi = meta.adapt(model, theta, task[0], steps=steps, lr=lr, lam=lam)
    v = torch.cat([phi[k].reshape(-1) for k in names])
    H = torch.autograd.functional.hessian(
        lambda w: mse(functional_call(model, tree(w), (xs,)), ys), v
    )
    gq = torch.autograd.functional.jacobian(
        lambda w: mse(functional_call(model, tree(w), (xq,)), yq), v
    )
    A = H + (lam + damping) * torch.eye(len(v), dtype=DT)
    return tree(lam * torch.linalg.solve(A, gq)), float(torch.linalg.eigvalsh(A)[0])


@pytest.mark.parametrize("vectorize", [False, True])
def test_an_indefinite_system_solved_exactly_is_reported(vectorize):
    model, theta, tasks = setting()
    ref, lowest = dense(model, theta, tasks[0], 0.05, 0.0, 300, 0.05)
    assert lowest < -0.01  # the setting: H + lam I is indefinite at phi
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, info = meta.imaml_step(
            model, theta, tasks, lam=0.05, inner_steps=300, inner_lr=0.05,
            solver=hg.Exact(), vectorize=vectorize,
        )  # fmt: skip
    assert info.status == hg.Status.NEGATIVE_CURVATURE
    assert info.tasks[0].status == "negative_curvature"
    (w,) = [w for w in caught if "indefinite" in str(w.message)]
    assert w.filename == __file__ and "damping above" in str(w.message)
    err = max(float((got[k] - ref[k]).abs().max()) for k in ref)
    assert err < 1e-12 * max(float(v.abs().max()) for v in ref.values())


@pytest.mark.parametrize("lam, damping", [(2.0, 0.0), (0.05, 1.0)])
def test_a_positive_definite_system_solved_exactly_stays_quiet(lam, damping):
    model, theta, tasks = setting()
    ref, lowest = dense(model, theta, tasks[0], lam, damping, 300, 0.05)
    assert lowest > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, info = meta.imaml_step(
            model, theta, tasks, lam=lam, inner_steps=300, inner_lr=0.05,
            solver=hg.Exact(), damping=damping,
        )  # fmt: skip
    assert info.status == hg.Status.EXACT
    err = max(float((got[k] - ref[k]).abs().max()) for k in ref)
    assert err < 1e-12 * max(float(v.abs().max()) for v in ref.values())
