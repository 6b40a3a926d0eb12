"""A copied ``CSVLogger`` kept the rows of the hyper-steps a resumed run redoes.

``docs/api/integrations.md`` ("Checkpointing a run with its loggers") said a resumed run's
CSV drops the redone hyper-steps' rows, as TensorBoard's copy purges them; but the rows a
``CSVLogger`` purges were those the file held when the logger was made, so a hyper-optimizer
saved with ``torch.save(hopt)``, trained on (a crash) and resumed from the copy wrote
hyper-steps ``1, 2, 3, 4, 3, 4``. A copy now drops, at its first row, every row from one past
the last hyper-step the copied logger had written.
"""

from __future__ import annotations

import copy
import io

import torch

import hypergradient as hg
from hypergradient.integrations import CSVLogger

torch.manual_seed(0)
X, Y = torch.randn(200, 5), torch.randn(200)


def loss(m, h, b):
    return ((m(b[0]).squeeze(1) - b[1]) ** 2).mean()


def train_loss(m, h, b):
    return loss(m, h, b) + 0.5 * (h["decay"] * m.weight**2).sum()


def outer(hp):
    return torch.optim.Adam(hp, lr=0.05)


def build(logger):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    return hg.HyperOptimizer(
        model, {"decay": hg.Positive(torch.full((5,), 0.1))},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=outer, train_loss=train_loss,
        val_loss=loss, val_data=(X[100:], Y[100:]), method=hg.IFT(hg.CG(maxiter=20)),
        inner_steps=5, logger=logger,
    )  # fmt: skip


def steps(hopt, n):
    for i in range(n):
        batch = (X[i % 4 * 25 : i % 4 * 25 + 25], Y[i % 4 * 25 : i % 4 * 25 + 25])
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        hopt.step(batch)


def saved(hopt):
    buffer = io.BytesIO()
    torch.save(hopt, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_a_run_resumed_from_a_checkpoint_has_one_row_per_hyper_step(tmp_path):
    path = tmp_path / "hyper.csv"
    hopt = build(CSVLogger(path))
    steps(hopt, 10)  # hyper-steps 1, 2
    checkpoint = saved(hopt)
    steps(hopt, 10)  # 3, 4, then a crash
    crashed = [r["hypergrad/decay"] for r in CSVLogger(path, append=True).rows()]
    steps(checkpoint, 10)  # 3, 4 again
    rows = CSVLogger(path, append=True).rows()
    assert [r["hyper_step"] for r in rows] == ["1", "2", "3", "4"]
    assert [r["hypergrad/decay"] for r in rows] == crashed  # (the same run, redone)
    steps(checkpoint, 5)  # and on: 5, no purge after the first row
    assert [r["hyper_step"] for r in CSVLogger(path, append=True).rows()][-2:] == ["4", "5"]


def test_a_copy_made_before_its_first_row_drops_from_that_rows_hyper_step(tmp_path):
    path = tmp_path / "hyper.csv"
    hopt = build(CSVLogger(path))
    twin = copy.deepcopy(hopt)
    steps(hopt, 10)
    steps(twin, 5)
    assert [r["hyper_step"] for r in CSVLogger(path, append=True).rows()] == ["1"]


def test_the_original_keeps_its_rows_and_an_uncopied_logger_purges_nothing(tmp_path):
    path = tmp_path / "hyper.csv"
    hopt = build(CSVLogger(path))
    steps(hopt, 10)
    saved(hopt)  # a checkpoint the run never resumes from
    steps(hopt, 10)
    assert [r["hyper_step"] for r in CSVLogger(path, append=True).rows()] == ["1", "2", "3", "4"]
