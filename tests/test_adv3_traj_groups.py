"""Trajectory methods replay param groups with their own learning rate and weight decay.

The usual ``no weight decay on biases and norms`` groups (and per-group learning rates)
were refused by every trajectory method ("Use one param group"). Each parameter now steps
with its group's ``lr`` and ``weight_decay``; a setting linked to a hyperparameter is one
value for every group (the link writes it into each). Reference: central finite
differences of the real ``torch.optim`` loop in float64.
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
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2)).double()
    batches = [(x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8]) for i in range(4)]
    return model, batches, val


def train_loss(m, h, b):
    return F.mse_loss(m(b[0]), b[1]) + h["pen"] * (m[0].weight ** 2).sum()


def val_loss(m, h, b):
    return F.mse_loss(m(b[0]), b[1])


def groups(m, lr, wd):
    """Matrices decayed; biases and the norm's affine at their own lr, not decayed."""
    named = list(m.named_parameters())
    decay = [p for _, p in named if p.dim() > 1]
    rest = [p for _, p in named if p.dim() == 1]
    return [{"params": decay}, {"params": rest, "lr": lr, "weight_decay": wd}]


CASES = {
    "sgd_momentum": (
        lambda m, h: torch.optim.SGD(groups(m, 0.3, 0.0), lr=0.1, momentum=0.9, weight_decay=0.05),
        None,
    ),
    "sgd_nesterov": (
        lambda m, h: torch.optim.SGD(
            groups(m, 0.05, 0.01), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05
        ),
        None,
    ),
    "adam": (
        lambda m, h: torch.optim.Adam(groups(m, 0.003, 0.0), lr=0.01, eps=1e-3, weight_decay=0.05),
        None,
    ),
    "sgd_tuned_momentum": (
        lambda m, h: torch.optim.SGD(
            groups(m, 0.3, 0.0), lr=0.1, momentum=float(h["mom"]), weight_decay=0.05
        ),
        {"momentum": "mom"},
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


def finite_differences(model0, make, h, batches, val, eps=1e-6):
    out = {}
    for k, v in h.items():
        up = {**h, k: v + eps}
        down = {**h, k: v - eps}
        out[k] = (
            val_after(model0, make, up, batches, val) - val_after(model0, make, down, batches, val)
        ) / (2 * eps)
    return out


@pytest.mark.parametrize("method", [hg.Unrolled, hg.ForwardMode, hg.DrMAD])
@pytest.mark.parametrize("case", sorted(CASES))
def test_param_groups_step_with_their_own_lr_and_weight_decay(case, method):
    make, links = CASES[case]
    model0, batches, val = setup()
    h = {"pen": torch.tensor(1e-2, dtype=DT)}
    if links:
        h["mom"] = torch.tensor(0.8, dtype=DT)
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
    if method is hg.DrMAD:  # an approximation of the reverse path: the replay is the check
        return
    want = finite_differences(model0, make, h, batches, val)
    for k in h:
        assert float(record.hypergrad[k]) == pytest.approx(want[k], rel=1e-6)


def test_groups_differing_in_another_setting_are_refused_naming_it():
    model0, _, _ = setup()
    params = groups(model0, 0.1, 0.0)
    params[1]["momentum"] = 0.5
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"differ in `momentum`.*lr and weight_decay"):
        hg.optim.from_torch(opt, list(model0.parameters()))


@pytest.mark.parametrize("tensor_first", [True, False])
def test_a_tensor_setting_in_one_group_and_a_number_in_another_is_refused(tensor_first):
    # A tuned lr (a tensor) in the first group and 0.01 in the second: the replay stepped the
    # second group with the tensor too (its own rate dropped, d/dlr -11.3 against -4.77
    # through the real run), silently; the other order was already refused.
    w, v = (
        torch.zeros(3, dtype=DT, requires_grad=True),
        torch.zeros(2, dtype=DT, requires_grad=True),
    )
    lr = torch.tensor(0.05, dtype=DT)
    rates = [lr, 0.01] if tensor_first else [0.01, lr]
    opt = torch.optim.SGD([{"params": [w], "lr": rates[0]}, {"params": [v], "lr": rates[1]}])
    with pytest.raises(ValueError, match=r"differ in `lr`.*same tensor in every group"):
        hg.optim.from_torch(opt, [w, v])
    same = torch.optim.SGD([{"params": [w], "lr": lr}, {"params": [v], "lr": lr}])
    hg.optim.from_torch(same, [w, v])  # one tensor shared by the groups: accepted
