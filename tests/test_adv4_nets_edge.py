"""Momentum SGD just past its stability limit ``2 (1 + beta) / lambda_max``.

At ``lr * lambda_max = 3.9`` with ``beta = 0.9`` the top component grows 1.32x per step
and the loss 1.73x: below the divergence watch's doubling and tripling rules, so 30 steps
that grew the weights 600-fold gave a hypergradient of 2e7 (exact for that run: central
differences agree) applied without a word. Steady growth of both the loss and the norm
now warns; healthy runs just inside the limit (3.7) and at 3.0 do not.
Reference for the limit: the closed form of gradient descent with momentum on a quadratic.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hypergradient as hg
from hypergradient.hyperoptimizer import divergence

DT = torch.float64
GEN = torch.Generator().manual_seed(0)
X, Y = torch.randn(40, 4, generator=GEN, dtype=DT), torch.randn(40, 1, generator=GEN, dtype=DT)
XV, YV = torch.randn(20, 4, generator=GEN, dtype=DT), torch.randn(20, 1, generator=GEN, dtype=DT)
A = torch.cat([X, torch.ones(40, 1, dtype=DT)], 1)
LAMBDA_MAX = float(torch.linalg.eigvalsh(2 * A.T @ A / 40).max())  # mse's Hessian (w, b)
mse = nn.functional.mse_loss


def run(ratio, steps=30):
    torch.manual_seed(0)
    model = nn.Linear(4, 1).double()
    hopt = hg.HyperOptimizer(
        model,
        {"decay": torch.tensor(0.0, dtype=DT)},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=ratio / LAMBDA_MAX, momentum=0.9),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.0),
        train_loss=lambda m, h, b: mse(m(b[0]), b[1]) + 0.5 * h["decay"] * (m.weight**2).sum(),
        val_loss=lambda m, h, b: mse(m(b[0]), b[1]),
        val_data=(XV, YV),
        method=hg.Unrolled(),
        inner_steps=steps,
        on_divergence="skip",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            hopt.zero_grad()
            hopt.train_loss((X, Y)).backward()
            hopt.step((X, Y))
    diverging = [w for w in caught if "is diverging" in str(w.message)]
    return hopt, model, diverging


@pytest.mark.parametrize("ratio", [3.0, 3.7])
def test_inside_the_limit_no_warning(ratio):
    hopt, _, diverging = run(ratio)
    assert not diverging and hopt.hyper_steps == 1 and hopt.skipped == 0


def test_just_past_the_limit_the_growth_is_caught():
    beta, a = 0.9, 3.9  # the top mode's roots: z^2 - (1 + beta - a) z + beta = 0
    roots = torch.linalg.eigvals(torch.tensor([[1 + beta - a, -beta], [1.0, 0.0]], dtype=DT))
    assert 1.3 < float(roots.abs().max()) < 1.35
    hopt, model, diverging = run(a)
    assert float(model.weight.norm()) > 100  # the run diverged
    assert len(diverging) == 1 and "1.4x" in str(diverging[0].message)
    assert hopt.skipped == 1 and hopt.hyper_steps == 0  # on_divergence="skip"


def test_the_rule_on_exact_sequences():
    t = lambda xs: tuple(torch.tensor(x, dtype=DT) for x in xs)  # noqa: E731
    grow = [1.0, 1.32, 1.32**2, 1.32**3]
    assert divergence.diagnose(t(grow), t([x * x for x in grow])) is not None
    assert divergence.diagnose(t(grow), t([1.0, 0.9, 0.8, 0.7])) is None  # loss falls
    assert divergence.diagnose(t(grow), t([1.0, 1.3, 1.69, 2.2])) is None  # loss 1.3x
