"""``hg.implicit`` / ``hg.IFT`` with ``hg.Exact()`` at a saddle point say so.

Probe round 16 (identities). At an indefinite Hessian (a stationary point that is no
minimum) the iterative solvers report ``negative_curvature`` with a warning, and iMAML warns
about its dense solve's negative eigenvalues, but ``hg.implicit(..., solver=hg.Exact())``
returned the stationary point's derivative with status ``"exact"`` and no warning at all
(the eigenvalues only in ``info.stats``), and so did ``HyperOptimizer(method=hg.IFT(hg.Exact()))``
on a non-convex model. The number is still the exact derivative of that stationary point
(checked against a dense float64 solve); it now comes with a ``HypergradientWarning`` naming
the negative eigenvalues and the damping that removes them.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

DT = torch.float64
GEN = torch.Generator().manual_seed(0)
Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=GEN, dtype=DT))
A = Q @ torch.diag(torch.tensor([3.0, 2.0, 1.0, -0.5], dtype=DT)) @ Q.T  # one negative
B = torch.randn(4, generator=GEN, dtype=DT)
C = torch.randn(4, generator=GEN, dtype=DT)


def f(w, h):
    return 0.5 * w @ A @ w + 0.5 * h * (w @ w) - B @ w


def g(w, h):
    return 0.5 * ((w - C) ** 2).sum()


def stationary(h):
    return torch.linalg.solve(A + h * torch.eye(4, dtype=DT), B)


def reference(h, damping=0.0):
    Ah = A + h * torch.eye(4, dtype=DT)
    w = stationary(h)
    x = torch.linalg.solve(Ah + damping * torch.eye(4, dtype=DT), w - C)
    return -(w @ x)  # d/dh of grad_w f is w


def caught(call):
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        out = call()
    return out, [str(w.message) for w in ws if issubclass(w.category, hg.HypergradientWarning)]


def test_exact_at_a_saddle_warns_and_is_exact():
    h = torch.tensor(0.1, dtype=DT)
    (out, info), messages = caught(
        lambda: hg.implicit(f, g, stationary(h), h, solver=hg.Exact(), return_info=True)
    )
    torch.testing.assert_close(out, reference(0.1), rtol=1e-12, atol=0.0)
    assert info.status == hg.Status.EXACT
    assert info.stats["negative_eigenvalues"] == 1
    assert info.stats["lambda_min"] == pytest.approx(-0.4, abs=1e-12)
    assert any("indefinite Hessian (1 negative eigenvalue" in m for m in messages)
    assert any("damping above 0.4" in m for m in messages)


def test_exact_with_enough_damping_is_silent():
    h = torch.tensor(0.1, dtype=DT)
    out, messages = caught(lambda: hg.implicit(f, g, stationary(h), h, hg.Exact(), damping=1.0))
    torch.testing.assert_close(out, reference(0.1, damping=1.0), rtol=1e-12, atol=0.0)
    assert not messages


def test_exact_at_a_minimum_is_silent():
    h = torch.tensor(1.0, dtype=DT)  # A + I is positive definite
    out, messages = caught(lambda: hg.implicit(f, g, stationary(h), h, solver=hg.Exact()))
    torch.testing.assert_close(out, reference(1.0), rtol=1e-12, atol=0.0)
    assert not messages


def test_hyperoptimizer_ift_exact_on_a_saddle_warns():
    x = torch.randn(6, 4, generator=GEN, dtype=DT)
    y = torch.randn(6, 1, generator=GEN, dtype=DT)
    lin = torch.nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(stationary(torch.tensor(0.1, dtype=DT)))

    def train_loss(m, h, batch):
        w = m.weight.reshape(-1)
        return f(w, h["h"]) + 0.0 * m(batch[0]).sum()

    def val_loss(m, h, batch):
        return g(m.weight.reshape(-1), h["h"])

    hopt = hg.HyperOptimizer(
        lin,
        {"h": torch.tensor(0.1, dtype=DT)},
        inner_optimizer=torch.optim.SGD(lin.parameters(), lr=1e-3),
        outer_optimizer=lambda r: torch.optim.SGD(r, lr=1e-3),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(x, y),
        method=hg.IFT(hg.Exact()),
        inner_steps=1,
    )
    hopt.zero_grad()
    hopt.train_loss((x, y)).backward()
    _, messages = caught(lambda: hopt.step((x, y)))
    assert any("indefinite Hessian" in m for m in messages)


# iMAML keeps its one warning, in its own words (the core's is not relayed): the ``(w,) = ...``
# of test_adv6_meta_imaml.py::test_an_indefinite_system_solved_exactly_is_reported.
