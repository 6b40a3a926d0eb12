"""A diverging inner run whose training loss starts at or below zero is reported as diverged.

Probe round 16 (identities). Adding a constant to the inner loss changes neither the run nor
its hypergradient, but ``loss_diverging``'s blow-up rule asked the first loss to be positive:
gradient descent at ``lr * lambda_max = 2.5`` (weights growing 1.5x per step, the loss from
0 or -100 to 1e14 over 40 steps) came back from ``hg.forward_mode`` and from a truncated
``hg.unrolled`` with ``status="fixed_budget"`` and no warning, while the same run with a
loss offset of +1 was reported as ``diverged``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg
from hypergradient._vocab import HypergradientWarning, Status
from hypergradient.methods.growth import loss_diverging

DT = torch.float64
A = torch.diag(torch.tensor([1.0, 2.0, 10.0], dtype=DT))
B = torch.ones(3, dtype=DT)


def inner(offset):
    def f(w, h):
        return 0.5 * w @ A @ w - B @ w + 0.5 * (h["d"] * w * w).sum() + offset

    return f


def outer(w, h):
    return 0.5 * (w**2).sum()


def run(method, offset, lr, **kw):
    w0 = torch.zeros(3, dtype=DT)
    h = {"d": torch.full((3,), 0.1, dtype=DT)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, info = method(
            inner(offset), outer, w0, h, 40, hg.optim.sgd(lr), return_info=True, **kw
        )
    warned = [w for w in caught if issubclass(w.category, HypergradientWarning)]
    return out["d"], info, warned


def exact_d(lr, steps=40, truncate=None):
    """Closed form: the run is diagonal, w_i(t+1) = (1 - lr a_i) w_i + lr b_i, a_i = A_ii + d_i."""
    d = torch.full((3,), 0.1, dtype=DT, requires_grad=True)
    a = torch.diagonal(A) + d
    w = torch.zeros(3, dtype=DT)
    for t in range(steps):
        if truncate is not None and t < steps - truncate:
            w = ((1 - lr * a) * w + lr * B).detach()
        else:
            w = (1 - lr * a) * w + lr * B
    return torch.autograd.grad(0.5 * (w**2).sum(), d)[0]


METHODS = {
    "forward_mode": (hg.forward_mode, {}),
    "unrolled_truncated": (hg.unrolled, {"truncate": 5}),
}


@pytest.mark.parametrize("offset", [0.0, -100.0, 1.0])
@pytest.mark.parametrize("name", list(METHODS))
def test_diverging_run_reported_whatever_the_loss_offset(name, offset):
    method, kw = METHODS[name]
    got, info, warned = run(method, offset, lr=0.25, **kw)
    ref = exact_d(0.25, truncate=kw.get("truncate"))
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=0.0)  # the run's exact derivative
    assert info.status == Status.DIVERGED
    assert "diverging" in info.stats
    assert any("diverged" in str(w.message) for w in warned)


@pytest.mark.parametrize("offset", [0.0, -100.0])
@pytest.mark.parametrize("name", list(METHODS))
def test_healthy_run_with_non_positive_loss_not_flagged(name, offset):
    method, kw = METHODS[name]
    got, info, warned = run(method, offset, lr=0.05, **kw)
    torch.testing.assert_close(
        got, exact_d(0.05, truncate=kw.get("truncate")), rtol=1e-10, atol=0.0
    )
    assert info.status != Status.DIVERGED
    assert not warned


def test_loss_diverging_rule():
    # a loss from -100 to 1e9, still growing: diverged
    assert loss_diverging([-100.0, -50.0, 1e3, 1e6, 1e8, 1e9]) is not None
    # from 0: the scale is the first non-zero loss
    assert loss_diverging([0.0, -1.0, 10.0, 1e3, 1e5, 1e7]) is not None
    # healthy: a negative loss decreasing, or rising a little at the end
    assert loss_diverging([-1.0, -2.0, -3.0, -4.0, -5.0]) is None
    assert loss_diverging([0.0, -5.0, -6.0, -5.9, -5.8, -5.7]) is None
    assert loss_diverging([-100.0, -200.0, 1.0, 2.0, 3.0, 4.0]) is None
    # all zero: no scale
    assert loss_diverging([0.0, 0.0, 0.0, 0.0, 0.0]) is None
    # unchanged for a positive start
    assert loss_diverging([1.0, 10.0, 100.0, 1e4, 2e6]) is not None
    assert loss_diverging([1.0, 0.5, 0.6, 0.7, 0.8]) is None
