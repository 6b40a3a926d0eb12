"""T1T2 in ``HyperOptimizer`` differentiates the step ``torch.optim.SGD`` took, whatever its
flags: momentum's buffer starts at the gradient (no dampening) on a parameter's first step
and is ``mu buf + (1 - dampening) g`` after; Nesterov steps with ``g + mu buf``. T1T2 took
the learning rate alone: 2x off with dampening 0.5, ``1 / (1 + mu)`` with Nesterov (0.0187
for an exact 0.0356). Checked against a float64 central difference of the validation loss
after one real ``torch.optim.SGD`` step from the same weights and optimizer state, over a
grid of the flags (weight decay, param groups of different settings, first and later steps).
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
G = torch.Generator().manual_seed(0)
X, Y = torch.randn(16, 4, generator=G, dtype=DT), torch.randn(16, 1, generator=G, dtype=DT)
XV, YV = torch.randn(16, 4, generator=G, dtype=DT), torch.randn(16, 1, generator=G, dtype=DT)
BATCHES = [(X[i : i + 8], Y[i : i + 8]) for i in (0, 8)]


def train_loss(m, h, b):
    pen = h["pen"]
    return (
        F.mse_loss(m(b[0]), b[1])
        + pen[0] * (m[0].weight ** 2).sum()
        + pen[1] * (m[2].weight ** 2).sum()
    )


def val_loss(m, h, b):
    return F.mse_loss(m(b[0]), b[1])


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).double()


PEN = torch.tensor([0.05, 0.02], dtype=DT)


def make_sgd(model, kw, groups):
    if not groups:
        return torch.optim.SGD(model.parameters(), lr=0.1, **kw)
    first = [model[0].weight, model[0].bias]
    second = [model[2].weight, model[2].bias]
    other = {"momentum": 0.5, "dampening": 0.25, "lr": 0.05}
    return torch.optim.SGD([{"params": first}, {"params": second, **other}], lr=0.1, **kw)


def hyper_optimizer(model, inner, outer_lr, inner_steps, method=None):
    """T1T2 (or ``method``) on ``pen`` with an SGD outer step (``inner_steps=None``: the
    default)."""
    steps = {} if inner_steps is None else {"inner_steps": inner_steps}
    return hg.HyperOptimizer(
        model,
        {"pen": PEN.clone()},
        inner_optimizer=inner,
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=outer_lr),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(XV, YV),
        method=method or hg.T1T2(),
        **steps,
    )


def run(kw, steps, groups=False, method=None):
    """``steps`` T1T2 steps (the outer optimizer frozen); the last hypergradient, the
    weights and inner optimizer state before the last step, and the warnings."""
    model = net()
    inner = make_sgd(model, kw, groups)
    hopt = hyper_optimizer(model, inner, 0.0, 1, method)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(steps):
            batch = BATCHES[t % 2]
            weights = copy.deepcopy(model.state_dict())
            state = copy.deepcopy(inner.state_dict())
            hopt.zero_grad()
            hopt.train_loss(batch).backward()
            hopt.step(batch)
    hyper = hopt.history[-1].hypergrad["pen"].detach().clone()
    return hyper, weights, state, batch, [w for w in caught if "jit" not in str(w.message)]


def after_one_step(pen, weights, state, kw, groups, batch):
    """The validation loss after one real torch SGD step from ``weights`` and ``state``."""
    model = net()
    model.load_state_dict(weights)
    inner = make_sgd(model, kw, groups)
    inner.load_state_dict(copy.deepcopy(state))
    inner.zero_grad()
    train_loss(model, {"pen": pen}, batch).backward()
    inner.step()
    with torch.no_grad():
        return float(val_loss(model, None, (XV, YV)))


def finite_difference(weights, state, kw, groups, batch, h=1e-6):
    out = []
    for i in range(PEN.numel()):
        e = torch.zeros_like(PEN)
        e[i] = h
        up = after_one_step(PEN + e, weights, state, kw, groups, batch)
        down = after_one_step(PEN - e, weights, state, kw, groups, batch)
        out.append((up - down) / (2 * h))
    return torch.tensor(out, dtype=DT)


FLAGS = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "dampening": 0.5},
    {"momentum": 0.9, "dampening": 1.0 - 1e-3},
    {"momentum": 0.9, "nesterov": True},
    {"momentum": 0.9, "nesterov": True, "foreach": True},  # adds the buffer to .grad in place
    {"momentum": 0.7, "dampening": 0.3, "weight_decay": 0.01},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 0.05},
    {"weight_decay": 0.05},
]


@pytest.mark.parametrize("groups", [False, True], ids=["one_group", "two_groups"])
@pytest.mark.parametrize("steps", [1, 3], ids=["first_step", "warm_buffer"])
@pytest.mark.parametrize("kw", FLAGS, ids=lambda kw: "-".join(map(str, kw.items())) or "plain")
def test_t1t2_is_the_derivative_of_the_real_sgd_step(kw, steps, groups):
    hyper, weights, state, batch, caught = run(kw, steps, groups)
    exact = finite_difference(weights, state, kw, groups, batch)
    torch.testing.assert_close(hyper, exact, rtol=1e-6, atol=1e-9)
    assert not caught, [str(w.message) for w in caught]  # healthy runs: no warning


def test_the_probe_numbers_and_unrolled_agree():
    """The defect's probe: dampening 0.5 was 2x off, Nesterov 0.526x; now both equal
    Unrolled over a one-step window (the buffer from earlier steps a constant there too)."""
    for kw in ({"momentum": 0.9, "dampening": 0.5}, {"momentum": 0.9, "nesterov": True}):
        t1t2 = run(kw, 4)[0]
        unrolled = run(kw, 4, method=hg.Unrolled())[0]
        torch.testing.assert_close(t1t2, unrolled, rtol=1e-9, atol=1e-12)


def test_a_buffer_zeroed_by_dampening_one_skips_with_a_reason():
    """dampening=1 after the first step steps with the old buffer alone: nothing of this
    step depends on the hyperparameters, which T1T2 (a learning-rate factor) cannot take;
    the hyper-step is skipped and says why (the first step, undamped, is differentiated)."""
    kw = {"momentum": 0.9, "dampening": 1.0}
    hyper, weights, state, batch, caught = run(kw, 1)
    torch.testing.assert_close(hyper, finite_difference(weights, state, kw, False, batch))
    assert not caught
    with pytest.warns(hg.HypergradientWarning, match="dampening=1"):
        model = net()
        inner = torch.optim.SGD(model.parameters(), lr=0.1, **kw)
        hopt = hyper_optimizer(model, inner, 0.1, 1)
        for t in range(2):
            hopt.zero_grad()
            hopt.train_loss(BATCHES[t]).backward()
            hopt.step(BATCHES[t])
    assert hopt.skipped == 1 and hopt.hyper_steps == 1


def test_maximize_is_refused_before_anything_changes():
    model = net()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, maximize=True)
    with pytest.raises(ValueError, match="maximize"):
        hyper_optimizer(model, inner, 0.1, None)


def test_a_step_taken_outside_is_differentiated_with_its_own_factor():
    """begin_step()/end_step() (a Lightning-style loop): the optimizer state before the
    step is the one begin_step snapshotted."""
    kw = {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}
    model = net()
    inner = make_sgd(model, kw, False)
    hopt = hyper_optimizer(model, inner, 0.0, 2)
    for t in range(4):
        batch = BATCHES[t % 2]
        weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(inner.state_dict())
        hopt.begin_step()
        inner.zero_grad()
        train_loss(model, hopt.hparams, batch).backward()
        inner.step()
        hopt.end_step(batch)
    exact = finite_difference(weights, state, kw, False, batch)
    torch.testing.assert_close(hopt.history[-1].hypergrad["pen"], exact, rtol=1e-6, atol=1e-9)
