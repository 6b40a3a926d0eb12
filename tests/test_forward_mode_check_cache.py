"""ForwardMode checks its batched pass once per shape, not at every hyper-step.

The check of the batched tangents against a looped product (torch's ``group_norm``
batching rule is silently wrong for some shapes, ``tests/test_adv4_nets_groupnorm.py``)
ran at every sweep until every output had been reached: three extra products per window,
which took a ForwardMode hyper-step on an MNIST-sized MLP from 27 to 31.7 training steps
(``benchmarks/hyperstep_cost.py``, goal 30). A method remembers the shapes of leaves and
batches its check held for; the hypergradients are those of a method that checks every
time, bit for bit.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

import hypergradient as hg
from hypergradient.methods import forward_tangents
from hypergradient.methods.forward_tangents import batching_key

F32 = torch.float32


def make(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(seed)
    data = [
        (torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(4)
    ]
    val = (torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
    ce = nn.functional.cross_entropy
    hopt = hg.HyperOptimizer(
        model,
        {"decay": hg.Positive(torch.full((1,), 1e-2))},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.05),
        train_loss=lambda m, h, b: ce(m(b[0]), b[1]) + 0.5 * h["decay"] * (m[0].weight ** 2).sum(),
        val_loss=lambda m, h, b: ce(m(b[0]), b[1]),
        val_data=val,
        inner_steps=3,
        method=hg.ForwardMode(),
    )
    return model, hopt, data


def run(hopt, data, steps: int, forget: bool) -> list[torch.Tensor]:
    for t in range(steps):
        batch = data[t % len(data)]
        if forget:
            hopt.method._batching_ok.clear()  # a method that checks at every sweep
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        hopt.step(batch)
    return [r.hypergrad["decay"] for r in hopt.history]


def test_the_check_runs_in_the_first_window_only_and_changes_no_number(monkeypatch):
    calls = []
    original = forward_tangents.GradientTangents._rows_agree

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(forward_tangents.GradientTangents, "_rows_agree", counted)
    _, cached, data = make()
    got = run(cached, data, 18, forget=False)
    per_window_cached = len(calls) / len(got)
    calls.clear()
    _, always, data = make()
    want = run(always, data, 18, forget=True)
    assert len(got) == len(want) == 6
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert len(calls) >= 6  # every window checked at least once without the memory
    assert per_window_cached * len(got) <= 3  # with it: the first window's steps only


def test_the_key_tells_batch_shapes_apart_and_declines_data_inside_the_losses():
    _, hopt, data = make()
    run(hopt, data, 3, forget=False)
    (key,) = hopt.method._batching_ok
    leaves, batches = key
    assert len(leaves) == 5  # four parameter leaves and the decay
    assert batches == frozenset(
        {(((16, 6), F32, torch.device("cpu")), ((16,), torch.int64, torch.device("cpu")))}
    )

    class FakeRun:
        p0 = (torch.zeros(2),)
        h = (torch.zeros(1),)

    a, b, none = FakeRun(), FakeRun(), FakeRun()
    a.batches = [(torch.zeros(4, 2),)] * 2
    b.batches = [(torch.zeros(4, 2),), (torch.zeros(1, 2),)]  # a last batch of one row
    none.batches = [None, None]  # hg.forward_mode's data captured in the losses
    assert batching_key(a) != batching_key(b)
    assert batching_key(none) is None


def test_batches_of_a_new_shape_every_window_keep_the_memory_bounded(monkeypatch):
    # padded batches of their own length: a new key each window, kept forever before
    # (1.4-13 KB a hyper-step); the last CHECKED_KEYS are kept, the oldest go first
    module = importlib.import_module("hypergradient.methods.forward_mode")  # (not the function)
    monkeypatch.setattr(module, "CHECKED_KEYS", 3)
    _, hopt, _ = make()
    g = torch.Generator().manual_seed(1)
    keys = []
    for t in range(18):  # 6 windows, rows 5, 6, ..., 10
        rows = 5 + t // 3
        batch = (torch.randn(rows, 6, generator=g), torch.randint(0, 3, (rows,), generator=g))
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        hopt.step(batch)
        keys = list(hopt.method._batching_ok)
    assert len(hopt.history) == 6 and len(keys) == 3
    rows = [next(iter(batches))[0][0][0] for _, batches in keys]
    assert rows == [8, 9, 10]
