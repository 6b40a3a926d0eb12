"""A checkpoint whose random-number state torch would refuse is refused before anything is
loaded (twenty-fourth session): the dtype alone was checked, and ``torch.set_rng_state``
raised its own error after the hyperparameters, both optimizers, the samplers, the counters
and the window had been replaced."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hypergradient as hg


def _make():
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    model = nn.Linear(4, 1)
    hopt = hg.HyperOptimizer(
        model,
        {"decay": hg.Positive(torch.tensor(1e-2))},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.1),
        train_loss=lambda m, h, b: (
            nn.functional.mse_loss(m(b[0]), b[1]) + h["decay"] * m.weight.pow(2).sum()
        ),
        val_loss=lambda m, h, b: nn.functional.mse_loss(m(b[0]), b[1]),
        val_data=(x[32:], y[32:]),
        method=hg.Unrolled(),
        inner_steps=4,
    )
    return hopt, (x[:32], y[:32])


def _train(hopt, batch, n):
    for _ in range(n):
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        hopt.step(batch)


@pytest.mark.parametrize("where", ["rng", "window"])
def test_a_random_number_state_of_the_wrong_size_changes_nothing(where):
    saver, batch = _make()
    _train(saver, batch, 6)  # mid-window: the window holds a state per step
    state = saver.state_dict()
    bad = [torch.zeros(5, dtype=torch.uint8), None]
    if where == "rng":
        state["rng"] = bad
    else:
        state["window"]["rng_states"][0] = bad
    hopt, batch = _make()
    _train(hopt, batch, 2)
    momentum = {k: v["momentum_buffer"].clone() for k, v in hopt.inner_optimizer.state.items()}
    before = (hopt.state_dict(), torch.get_rng_state())
    with pytest.raises(ValueError, match="malformed random-number state"):
        hopt.load_state_dict(state)
    after = (hopt.state_dict(), torch.get_rng_state())
    assert torch.equal(before[1], after[1])
    assert torch.equal(before[0]["hparams"]["raw"]["decay"], after[0]["hparams"]["raw"]["decay"])
    assert before[0]["counters"] == after[0]["counters"]
    assert len(before[0]["window"]["batches"]) == len(after[0]["window"]["batches"]) == 2
    state_now = hopt.inner_optimizer.state
    assert all(torch.equal(v, state_now[k]["momentum_buffer"]) for k, v in momentum.items())
    hopt.load_state_dict(saver.state_dict())  # a sound checkpoint still loads
