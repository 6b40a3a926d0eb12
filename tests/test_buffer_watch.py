"""Buffers that a training forward pass updates and reads (a running input normalizer,
``spectral_norm``'s power-iteration vectors): T1T2 and the trajectory methods re-evaluate past
steps with the buffers as they are at the hyper-step, so their hypergradients are approximate
(docs/guide/modes.md). T1T2 said nothing (2.3e-2 off a central difference, no replay to
compare); it now warns once, as every method that re-evaluates past steps does, naming the
buffers. BatchNorm's running statistics (updated, not read, in train mode), constant buffers
and implicit methods (which evaluate at the current point) stay silent."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hypergradient as hg
from hypergradient.hyperoptimizer.buffers import BufferWatch

DT = torch.float64
F = nn.functional


class RunningNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(4, dtype=DT))
        self.register_buffer("count", torch.zeros((), dtype=DT))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.count += 1
                self.mean += (x.mean(0) - self.mean) / self.count
        return x - self.mean


class Shift(nn.Module):  # a constant buffer: read, never updated
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.full((4,), 0.5, dtype=DT))

    def forward(self, x):
        return x - self.shift


def model(first):
    torch.manual_seed(0)
    return nn.Sequential(first, nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def spectral():
    torch.manual_seed(0)
    lin = nn.utils.parametrizations.spectral_norm(nn.Linear(4, 6).to(DT))
    return nn.Sequential(lin, nn.Tanh(), nn.Linear(6, 3).to(DT))


def run(net, method, steps=8):
    g = torch.Generator().manual_seed(1)
    data = [
        (2 + 3 * torch.randn(8, 4, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g))
        for _ in range(steps)
    ]
    val = (torch.randn(16, 4, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g))
    decay = torch.tensor(1e-2, dtype=DT)
    hopt = hg.HyperOptimizer(
        net,
        {"decay": hg.Positive(decay)},
        inner_optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
        train_loss=lambda m, h, b: (
            F.cross_entropy(m(b[0]), b[1]) + h["decay"] * sum((p**2).sum() for p in m.parameters())
        ),
        val_loss=lambda m, h, b: F.cross_entropy(m(b[0]), b[1]),
        val_data=[val],
        method=method,
        inner_steps=2,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in data:
            hopt.zero_grad()
            hopt.train_loss(batch).backward()
            hopt.step(batch)
    assert len(hopt.history) == steps // 2
    return [str(w.message) for w in caught if "training forward passes update" in str(w.message)]


@pytest.mark.parametrize("method", [hg.T1T2, hg.Unrolled, hg.ForwardMode, hg.DrMAD])
def test_methods_that_re_evaluate_past_steps_warn_once_naming_the_buffers(method):
    said = run(model(RunningNorm()), method())
    assert len(said) == 1  # four hyper-steps, one warning
    assert "'0.mean', '0.count'" in said[0] and method.__name__ in said[0]


def test_spectral_norm_vectors_are_named():
    said = run(spectral(), hg.T1T2())
    assert len(said) == 1 and "parametrizations.weight.0._u" in said[0]


@pytest.mark.parametrize(
    "net, method",
    [
        (lambda: model(RunningNorm()), lambda: hg.IFT(hg.CG(maxiter=5), damping=0.1)),
        (lambda: model(nn.BatchNorm1d(4).to(DT)), hg.T1T2),
        (lambda: model(nn.BatchNorm1d(4).to(DT)), hg.Unrolled),
        (lambda: model(Shift()), hg.T1T2),
        (lambda: model(Shift()), hg.Unrolled),
    ],
    ids=["implicit", "batchnorm-t1t2", "batchnorm-unrolled", "constant-t1t2", "constant-unrolled"],
)
def test_silent_where_the_hyper_step_sees_what_training_saw(net, method):
    assert run(net(), method()) == []


def test_a_rollback_is_not_a_training_update():
    """Restoring the buffers (a rolled-back hyper-step) writes them in place: not a change."""
    net = model(Shift())
    watch = BufferWatch(net)
    watch.note()
    net[0].shift.copy_(net[0].shift.clone())  # what ModelView.restore does
    watch.restart()
    watch.note()
    assert watch.moved == []
    net[0].shift.add_(1.0)
    watch.note()
    assert watch.moved == ["0.shift"]
