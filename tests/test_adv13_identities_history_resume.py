"""A resumed HyperOptimizer keeps every hyper-step record its checkpoint holds.

Probe round 16 (identities). ``History.parse_state`` kept ``records[len - maxlen:]``: with
fewer records than ``history_size`` but more than half of it the start was negative, so a
checkpoint of 60 records under the default ``history_size=100`` came back with the last 40,
and one of 2 records under ``history_size=3`` with the last 1.
"""

from __future__ import annotations

import io

import pytest
import torch

import hypergradient as hg
from hypergradient.hyperoptimizer import History

DT = torch.float64


def build(history_size):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    x = torch.randn(10, 3, dtype=DT)
    y = torch.randn(10, 1, dtype=DT)
    hopt = hg.HyperOptimizer(
        model,
        {"d": torch.tensor(0.1, dtype=DT)},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=lambda r: torch.optim.SGD(r, lr=0.1),
        train_loss=lambda m, h, b: ((m(b[0]) - b[1]) ** 2).mean() + h["d"] * (m.weight**2).sum(),
        val_loss=lambda m, h, b: ((m(b[0]) - b[1]) ** 2).mean(),
        val_data=(x, y),
        method=hg.T1T2(),
        inner_steps=1,
        history_size=history_size,
    )
    return model, hopt, (x, y)


@pytest.mark.parametrize(("history_size", "steps"), [(3, 2), (100, 60), (5, 5), (4, 9), (None, 7)])
def test_resume_keeps_the_saved_records(history_size, steps):
    model, hopt, batch = build(history_size)
    for _ in range(steps):
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        hopt.step(batch)
    buffer = io.BytesIO()
    torch.save(hopt.state_dict(), buffer)
    buffer.seek(0)
    _, resumed, _ = build(history_size)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    kept = steps if history_size is None else min(steps, history_size)
    assert len(hopt.history) == kept
    assert [r.step for r in resumed.history] == [r.step for r in hopt.history]
    assert resumed.history.total == hopt.history.total == steps
    for a, b in zip(resumed.history, hopt.history):
        assert a.val_loss == b.val_loss
        assert a.hparams.keys() == b.hparams.keys()
        assert all(torch.equal(a.hparams[k], b.hparams[k]) for k in a.hparams)


def test_parse_state_keeps_at_most_maxlen():
    _, hopt, batch = build(None)
    for _ in range(6):
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        hopt.step(batch)
    state = hopt.history.state_dict()
    for maxlen, kept in [(None, 6), (10, 6), (7, 6), (6, 6), (4, 4), (1, 1), (0, 0)]:
        records, total = History(maxlen).parse_state(state)
        assert total == 6
        assert [r.step for r in records] == list(range(7 - kept, 7))
