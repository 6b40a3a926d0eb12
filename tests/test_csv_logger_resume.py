"""``CSVLogger(append=True)`` on a run resumed from a checkpoint after a crash: the hyper-steps
redone after the checkpoint had two rows each (the crashed run's and the resumed run's), so a
dashboard or ``pandas.read_csv`` saw two values per step."""

from __future__ import annotations

import torch

from hypergradient.integrations import CSVLogger, record_scalars
from test_hyperoptimizer_support import batches, build, run


def _state(hopt):
    weights = {k: v.clone() for k, v in hopt.view.module.state_dict().items()}
    return weights, hopt.state_dict()


def _resume(weights, state, logger):
    _, hopt = build(inner_steps=2, logger=logger)
    hopt.view.module.load_state_dict(weights)
    hopt.load_state_dict(state)
    return hopt


def test_a_resumed_run_replaces_the_rows_of_the_hyper_steps_it_redoes(tmp_path):
    path, data = tmp_path / "run.csv", batches(12)
    torch.manual_seed(0)
    _, first = build(inner_steps=2, logger=CSVLogger(path))
    run(first, data[:4])  # hyper-steps 1, 2: the checkpoint
    saved = _state(first)
    run(first, data[4:8])  # hyper-steps 3, 4 written, then the crash
    assert [int(r["hyper_step"]) for r in CSVLogger(path, append=True).rows()] == [1, 2, 3, 4]
    second = _resume(*saved, CSVLogger(path, append=True))
    run(second, data[4:12])  # hyper-steps 3..6 again
    rows = CSVLogger(path, append=True).rows()
    assert [(int(r["step"]), int(r["hyper_step"])) for r in rows] == [
        (2, 1),
        (4, 2),
        (6, 3),
        (8, 4),
        (10, 5),
        (12, 6),
    ]
    want = list(second.history)  # the checkpoint's records (1, 2), then the resumed run's
    assert [r.hyper_step for r in want] == [1, 2, 3, 4, 5, 6]
    for row, record in zip(rows, want):  # every number the surviving record's
        for name, value in record_scalars(record).items():
            assert float(row[name]) == value, name


def test_appending_loggers_made_together_purge_nothing(tmp_path):
    """Two hyper-optimizers sharing one file from the start: no row is inherited, none purged
    (each writes hyper-steps 1, 2)."""
    path = tmp_path / "run.csv"
    a, b = CSVLogger(path, append=True), CSVLogger(path, append=True)
    _, ha = build(inner_steps=2, logger=a)
    _, hb = build(inner_steps=2, logger=b)
    for batch in batches(4):
        for h in (ha, hb):
            h.zero_grad()
            h.train_loss(batch).backward()
            h.step(batch)
    assert [int(r["hyper_step"]) for r in a.rows()] == [1, 1, 2, 2]


def test_a_later_start_keeps_the_earlier_rows(tmp_path):
    """Appending hyper-steps after the last one written (a clean stop, no crash) keeps all."""
    path, data = tmp_path / "run.csv", batches(8)
    _, first = build(inner_steps=2, logger=CSVLogger(path))
    run(first, data[:4])
    second = _resume(*_state(first), CSVLogger(path, append=True))
    run(second, data[4:])
    assert [int(r["hyper_step"]) for r in CSVLogger(path, append=True).rows()] == [1, 2, 3, 4]
