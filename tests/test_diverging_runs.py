"""Finite but diverged runs are reported, not returned silently.

Float64 reaches 1e300 before it overflows: gradient descent above ``2 / lambda_max`` through
``hg.unrolled`` returned a hypergradient of 1e150, MAML's and first-order MAML's
meta-gradients of a diverged adaptation 1e31-1e131, each with no warning and an ``ok``
status (only overflow was caught). The hypergradient stays the exact one of the run taken
(checked against a hand-written loop); the info says ``diverged`` and a warning tells why.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hypergradient as hg
from hypergradient import meta
from hypergradient.methods.growth import loss_diverging

F64 = torch.float64


def quadratic(seed: int, n: int = 4):
    """``f = 0.5 w^T A w - c^T w + 0.5 h ||w||^2``, ``g = 0.5 ||w - t||^2``; ``A``'s top
    eigenvalue is 1 (so GD diverges for ``lr > 2 / (1 + h)``)."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    A = Q @ torch.diag(torch.linspace(0.1, 1.0, n, dtype=F64)) @ Q.T
    c, t = torch.randn(n, generator=gen, dtype=F64), torch.randn(n, generator=gen, dtype=F64)

    def f(p, h):
        w = p["w"]
        return 0.5 * w @ A @ w - c @ w + 0.5 * h * (w @ w) + 10.0  # positive: a loss

    def g(p, h):
        return 0.5 * ((p["w"] - t) ** 2).sum()

    return f, g, {"w": torch.zeros(n, dtype=F64)}


def by_hand(f, g, p0, h0, steps, lr):
    h = h0.clone().requires_grad_(True)
    w = p0["w"].clone().requires_grad_(True)
    for _ in range(steps):
        (gw,) = torch.autograd.grad(f({"w": w}, h), w, create_graph=True)
        w = w - lr * gw
    (gh,) = torch.autograd.grad(g({"w": w}, h), h)
    return gh


def unrolled_caught(lr: float, steps: int = 20):
    f, g, p0 = quadratic(0)
    h0 = torch.tensor(0.05, dtype=F64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, info = hg.unrolled(f, g, p0, h0, steps, hg.optim.sgd(lr=lr), return_info=True)
    ref = by_hand(f, g, p0, h0, steps, lr)
    return out, info, ref, [str(w.message) for w in caught]


def test_unrolled_reports_a_diverged_run_and_still_returns_its_exact_hypergradient():
    out, info, ref, caught = unrolled_caught(lr=3.0)  # 3 > 2 / (1 + 0.05): diverges
    assert math.isfinite(float(out)) and abs(float(out)) > 1e8
    assert float(out) == pytest.approx(float(ref), rel=1e-9)
    assert info.status == hg.Status.DIVERGED and not info.status.ok
    assert "grew" in info.stats["diverging"]
    assert any("The inner run diverged" in w for w in caught), caught


def test_unrolled_healthy_run_is_not_flagged():
    out, info, ref, caught = unrolled_caught(lr=1.5)  # below 2 / (1 + 0.05)
    assert float(out) == pytest.approx(float(ref), rel=1e-9)
    assert info.status == hg.Status.FIXED_BUDGET
    assert "diverging" not in info.stats
    assert not any("diverged" in w for w in caught), caught


def tasks(seed: int, scale: float):
    gen = torch.Generator().manual_seed(seed)

    def one(s):
        xs = s * torch.randn(8, 3, generator=gen, dtype=F64)
        xq = torch.randn(6, 3, generator=gen, dtype=F64)
        w = torch.randn(3, generator=gen, dtype=F64)
        return (xs, xs @ w), (xq, xq @ w)

    return [one(1.0), one(scale), one(1.0)]


def loss_fn(p, batch):
    x, y = batch
    return ((x @ p["w"] + p["b"] - y) ** 2).mean()


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("steps", [1, 5])
def test_maml_names_the_task_whose_adaptation_diverged(first_order, vectorize, steps):
    theta = {"w": torch.zeros(3, dtype=F64), "b": torch.zeros((), dtype=F64)}
    kw = dict(inner_steps=steps, inner_lr=0.5, first_order=first_order, vectorize=vectorize)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grad, info = meta.maml_step(loss_fn, theta, tasks(0, 30.0), **kw)
    texts = [str(w.message) for w in caught]
    assert all(torch.isfinite(v).all() for v in grad.values())
    assert info.status == hg.Status.DIVERGED
    assert [t.status for t in info.tasks][1] == "diverged"
    assert info.tasks[1].support_loss_after > 10 * info.tasks[1].support_loss_before
    assert [t.status == "diverged" for t in info.tasks] == [False, True, False]
    flagged = [w for w in texts if "diverged" in w]
    assert len(flagged) == 1 and "tasks[1]" in flagged[0], texts  # once, in meta's words


def test_maml_healthy_tasks_are_not_flagged():
    theta = {"w": torch.zeros(3, dtype=F64), "b": torch.zeros((), dtype=F64)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, info = meta.maml_step(loss_fn, theta, tasks(0, 1.0), inner_steps=5, inner_lr=0.05)
    assert info.status == hg.Status.FIXED_BUDGET
    assert not any("diverged" in str(w.message) for w in caught)


def test_loss_diverging_rules():
    assert loss_diverging([1.0, 3.0, 9.0, 27.0]) is not None  # sustained 3x
    assert loss_diverging([1.0, 2.9, 9.0, 27.0]) is None  # one ratio short
    assert loss_diverging([1.0, 3.0, 9.0]) is None  # too short to tell
    slow = [1.5**t for t in range(40)]  # 1.5x a step: 1e7 over the run, still growing
    assert loss_diverging(slow) is not None
    assert loss_diverging(slow[:-1] + [slow[-2] / 2]) is None  # no longer growing
    assert loss_diverging([1.0, float("inf"), 2.0, 3.0]) is None  # finiteness: not here


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(2, 6),
    frac=st.floats(0.05, 0.99),
    steps=st.integers(4, 60),
)
def test_stable_gradient_descent_on_a_quadratic_is_never_flagged(seed, n, frac, steps):
    """GD with ``lr < 2 / lambda_max`` decreases a convex quadratic at every step."""
    f, _, p0 = quadratic(seed, n)
    lr, w, losses = frac * 2.0 / 1.05, p0["w"].clone().requires_grad_(True), []
    h = torch.tensor(0.05, dtype=F64)
    for _ in range(steps):
        value = f({"w": w}, h)
        losses.append(float(value.detach()))
        (gw,) = torch.autograd.grad(value, w)
        w = (w - lr * gw).detach().requires_grad_(True)
    assert loss_diverging(losses) is None
