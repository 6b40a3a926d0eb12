"""Hypergradient descent that takes the learning rate below zero says so (adversarial round 12).

SGD-HD with Nesterov momentum and ``hypergrad_lr`` 0.02 on a small tanh regression: the
second group's rate went 0.05 -> 0.728 -> -3.17 at the third step, the steps then ascended
the loss (4.41 at the start, 6.9e10 four steps later, inf after seven) and the first warning
came only when the numbers overflowed (/work/scratch/s15/traj/p9_sgdhd_negative_lr.py). The
rate is still not clipped (documented), but the crossing below zero now warns, once per
crossing; the numbers are unchanged (the update is the docstring's formula, by hand).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

DT = torch.float64


def problem():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 4, generator=g, dtype=DT), torch.randn(6, generator=g, dtype=DT)
    w = torch.tensor([0.5, -1.0, 1.5, 0.3], dtype=DT, requires_grad=True)
    v = torch.tensor([1.2, 0.9], dtype=DT, requires_grad=True)
    return a, b, w, v


def loss(a, b, w, v):
    return ((torch.tanh(a @ w) * v.sum() - b) ** 2).mean()


def test_a_rate_driven_below_zero_warns_once_and_is_the_formulas():
    a, b, w, v = problem()
    opt = hg.optim.SGDHD(
        [{"params": [w], "hypergrad_lr": 0.0}, {"params": [v]}], lr=0.05, hypergrad_lr=2.0
    )
    lrs, seen = [], []
    by_hand, prev = 0.05, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad()
            loss(a, b, w, v).backward()
            gv = v.grad.detach().clone()
            if prev is not None:
                by_hand += 2.0 * float(gv @ prev)
            prev = gv
            opt.step()
            lrs.append(opt.param_groups[1]["lr"])
            seen.append(len([c for c in caught if "below zero" in str(c.message)]))
    assert lrs[-1] == pytest.approx(by_hand, rel=1e-12)
    crossed = [i for i in range(1, 3) if lrs[i] < 0 <= lrs[i - 1]]
    assert crossed, lrs  # the setting drives it below zero
    assert seen[crossed[0]] == 1 and seen[crossed[0] - 1] == 0
    msg = next(str(c.message) for c in caught if "below zero" in str(c.message))
    assert "hypergrad_lr" in msg and "ascends" in msg


@pytest.mark.parametrize("cls", [hg.optim.SGDHD, hg.optim.AdamHD])
def test_a_rate_that_stays_positive_does_not_warn(cls):
    a, b, w, v = problem()
    opt = cls([w, v], lr=0.01, hypergrad_lr=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)
        for _ in range(20):
            opt.zero_grad()
            loss(a, b, w, v).backward()
            opt.step()
    assert opt.param_groups[0]["lr"] > 0
