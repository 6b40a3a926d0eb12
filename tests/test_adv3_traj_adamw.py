"""Trajectory methods replay AdamW (``torch.optim.AdamW``, ``Adam(decoupled_weight_decay=
True)``), the default optimizer of transformers, and AMSGrad, instead of refusing them.

The decoupled decay scales theta by ``1 - lr * wd`` before the Adam step (no gradient
term); AMSGrad divides by the largest second moment so far (a third buffer). Reference:
central finite differences of the real loop in float64, with the weight decay and the
learning rate themselves tuned, and a no-decay param group.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergradient as hg

DT = torch.float64


def setup():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 5, generator=g, dtype=DT), torch.randn(32, 2, generator=g, dtype=DT)
    val = (torch.randn(16, 5, generator=g, dtype=DT), torch.randn(16, 2, generator=g, dtype=DT))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 2)).double()
    return model, [(x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8]) for i in range(4)], val


def train_loss(m, h, b):
    return F.mse_loss(m(b[0]), b[1]) + h["pen"] * (m[0].weight ** 2).sum()


def val_loss(m, h, b):
    return F.mse_loss(m(b[0]), b[1])


def no_decay_groups(m):
    return [
        {"params": [p for p in m.parameters() if p.dim() > 1]},
        {"params": [p for p in m.parameters() if p.dim() == 1], "weight_decay": 0.0},
    ]


CASES = {
    "adamw": (
        lambda m, h: torch.optim.AdamW(m.parameters(), lr=0.01, eps=1e-3, weight_decay=0.1),
        None,
    ),
    "adam_decoupled": (
        lambda m, h: torch.optim.Adam(
            m.parameters(), lr=0.01, eps=1e-3, weight_decay=0.1, decoupled_weight_decay=True
        ),
        None,
    ),
    "tuned_decay": (
        lambda m, h: torch.optim.AdamW(
            m.parameters(), lr=0.01, eps=1e-3, weight_decay=float(h["wd"])
        ),
        {"weight_decay": "wd"},
    ),
    "tuned_lr": (
        lambda m, h: torch.optim.AdamW(
            m.parameters(), lr=float(h["lr"]), eps=1e-3, weight_decay=0.1
        ),
        {"lr": "lr"},
    ),
    "amsgrad": (
        lambda m, h: torch.optim.Adam(m.parameters(), lr=0.05, eps=1e-3, amsgrad=True),
        None,
    ),
    "adamw_amsgrad_foreach": (
        lambda m, h: torch.optim.AdamW(
            m.parameters(), lr=0.05, eps=1e-3, weight_decay=0.1, amsgrad=True, foreach=True
        ),
        None,
    ),
    "fused_no_decay_group": (
        lambda m, h: torch.optim.AdamW(
            no_decay_groups(m), lr=0.01, eps=1e-3, weight_decay=0.1, fused=True
        ),
        None,
    ),
}


def val_after(model0, make, h, batches, val):
    m = copy.deepcopy(model0)
    opt = make(m, h)
    for b in batches:
        opt.zero_grad()
        train_loss(m, h, b).backward()
        opt.step()
    with torch.no_grad():
        return float(val_loss(m, h, val))


@pytest.mark.parametrize("method", [hg.Unrolled, hg.ForwardMode])
@pytest.mark.parametrize("case", sorted(CASES))
def test_adamw_is_replayed_exactly(case, method):
    make, links = CASES[case]
    model0, batches, val = setup()
    h = {"pen": torch.tensor(1e-2, dtype=DT)}
    if links:
        h[next(iter(links.values()))] = torch.tensor(
            0.1 if "wd" in links.values() else 0.01, dtype=DT
        )
    model = copy.deepcopy(model0)
    hopt = hg.HyperOptimizer(
        model,
        {k: v.clone() for k, v in h.items()},
        inner_optimizer=make(model, h),
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=val,
        method=method(),
        inner_steps=len(batches),
        optimizer_hparams=links,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)
        for b in batches:
            hopt.zero_grad()
            hopt.train_loss(b).backward()
            hopt.step(b)
    record = hopt.history[-1]
    assert record.info.replay_error < 1e-12
    for k, v in h.items():
        up = val_after(model0, make, {**h, k: v + 1e-6}, batches, val)
        down = val_after(model0, make, {**h, k: v - 1e-6}, batches, val)
        assert float(record.hypergrad[k]) == pytest.approx((up - down) / 2e-6, rel=1e-6)


def test_an_amsgrad_twin_continues_torch_from_its_state():
    """from_torch of a trained AMSGrad Adam (max_exp_avg_sq held) continues bit-close."""
    g = torch.Generator().manual_seed(3)
    p = torch.randn(4, generator=g, dtype=DT, requires_grad=True)
    grads = [torch.randn(4, generator=g, dtype=DT) * s for s in (3.0, 0.1, 2.0, 0.2, 0.1)]
    opt = torch.optim.Adam([p], lr=0.1, amsgrad=True)
    for grad in grads[:3]:
        p.grad = grad.clone()
        opt.step()
    twin, state, step0 = hg.optim.from_torch(opt, [p])
    assert twin.amsgrad and len(state) == 3 and step0 == 3
    q = [p.detach().clone()]
    for t, grad in enumerate(grads[3:]):
        p.grad = grad.clone()
        opt.step()
        q, state = twin.update(q, [grad], state, step0 + t)
        torch.testing.assert_close(q[0], p.detach(), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(state[2], opt.state[p]["max_exp_avg_sq"], rtol=0, atol=0)
