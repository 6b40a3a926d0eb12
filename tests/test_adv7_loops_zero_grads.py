"""Trajectory methods in a loop that zeroes gradients with ``set_to_none=False``.

A parameter that a step's loss does not use (a branch taken on some batches only) then
holds a zero ``.grad``, and torch's SGD with momentum or Adam still moves it (the momentum
buffer, Adam's moments). The replay took autograd's None for it and skipped it, as torch
does for a None ``.grad``: an SGD-momentum replay ended 0.51 away from the run and every
hyper-step was skipped; with Adam it ended 0.026 away and its hypergradient was applied
with a warning. The window now notes which parameters held a gradient after every step,
and the replay steps them on zeros. Checked against central differences in float64 through
the same torch steps.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import hypergradient as hg

DT = torch.float64
GEN = torch.Generator().manual_seed(0)
X = torch.randn(16, 3, generator=GEN, dtype=DT)
Y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=DT)
XV = torch.randn(8, 3, generator=GEN, dtype=DT)
YV = XV @ torch.tensor([0.5, 1.0, -1.0], dtype=DT)
STEPS = 4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.weight = nn.Parameter(torch.randn(3, generator=g, dtype=DT))
        self.extra = nn.Parameter(torch.randn(3, generator=g, dtype=DT))

    def forward(self, x, branch):
        return x @ self.weight + ((x * self.extra).sum(-1) if branch else 0.0)


def train_loss(m, h, b):
    x, y, branch = b
    return ((m(x, bool(branch)) - y) ** 2).mean() + 0.5 * (h["decay"] * m.weight**2).sum()


def val_loss(m, h, b):
    return ((m(b[0], True) - b[1]) ** 2).mean()


def batch(i):
    return X[4 * i : 4 * i + 4], Y[4 * i : 4 * i + 4], torch.tensor(i % 2 == 0)


def optimizer(kind, model):
    if kind == "sgd_momentum":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=0.05)


def plain_run(kind, decay):
    """The loop without the hyper-optimizer: the validation loss after the steps."""
    model = Net()
    inner = optimizer(kind, model)
    h = {"decay": decay}
    for i in range(STEPS):
        inner.zero_grad(set_to_none=False)
        train_loss(model, h, batch(i)).backward()
        inner.step()
    with torch.no_grad():
        return float(val_loss(model, h, (XV, YV)))


@pytest.mark.parametrize("kind", ["sgd_momentum", "adam"])
@pytest.mark.parametrize("method", [hg.Unrolled, hg.ForwardMode, hg.DrMAD])
def test_the_replay_steps_an_unused_parameter_on_its_zero_gradient(kind, method):
    decay0 = torch.full((3,), 0.1, dtype=DT)
    model = Net()
    hopt = hg.HyperOptimizer(
        model,
        {"decay": decay0.clone()},
        inner_optimizer=optimizer(kind, model),
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(XV, YV),
        method=method(),
        inner_steps=STEPS,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=hg.HypergradientWarning)
        for i in range(STEPS):
            hopt.zero_grad(set_to_none=False)
            hopt.train_loss(batch(i)).backward()
            hopt.step(batch(i))
    assert hopt.hyper_steps == 1 and hopt.skipped == 0
    assert hopt.history[-1].diagnostics["replay_error"] < 1e-13
    if method is hg.DrMAD:  # its reverse path is an approximation: no exact reference
        return
    hypergrad = decay0 - hopt.hparams["decay"]  # outer SGD at lr 1
    eps, fd = 1e-6, torch.zeros(3, dtype=DT)
    for j in range(3):
        e = torch.zeros(3, dtype=DT)
        e[j] = eps
        fd[j] = (plain_run(kind, decay0 + e) - plain_run(kind, decay0 - e)) / (2 * eps)
    assert torch.allclose(hypergrad, fd, rtol=1e-7, atol=1e-7 * float(fd.abs().max()))


def _hopt(model):
    return hg.HyperOptimizer(
        model,
        {"decay": torch.full((3,), 0.1, dtype=DT)},
        inner_optimizer=optimizer("sgd_momentum", model),
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(XV, YV),
        method=hg.Unrolled(),
        inner_steps=STEPS,
    )


def _steps(hopt, steps):
    for i in steps:
        hopt.zero_grad(set_to_none=False)
        hopt.train_loss(batch(i)).backward()
        hopt.step(batch(i))


def test_a_checkpoint_mid_window_keeps_the_noted_gradients():
    model = Net()
    hopt = _hopt(model)
    _steps(hopt, range(2))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "hopt": hopt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    state, weights = saved["hopt"], saved["model"]
    assert state["window"]["grads"] == [False, True]  # the unused one held zeros
    _steps(hopt, range(2, STEPS))
    resumed_model = Net()
    resumed_model.load_state_dict(weights)
    resumed = _hopt(resumed_model)
    resumed.load_state_dict(state)
    for p in resumed_model.parameters():  # the loop's zero gradients, as the saved run had
        p.grad = torch.zeros_like(p)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=hg.HypergradientWarning)
        _steps(resumed, range(2, STEPS))
    assert resumed.hyper_steps == 1
    assert torch.equal(resumed.hparams["decay"], hopt.hparams["decay"])


def test_a_malformed_noted_gradients_entry_is_refused_and_changes_nothing():
    model = Net()
    hopt = _hopt(model)
    _steps(hopt, range(2))
    state = hopt.state_dict()
    state["window"]["grads"] = [True]
    fresh = _hopt(Net())
    before = fresh.state_dict()
    with pytest.raises(ValueError, match="window `grads`"):
        fresh.load_state_dict(state)
    assert fresh.loop.count == before["counters"]["count"] and fresh.loop.window is None
