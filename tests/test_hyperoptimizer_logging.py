"""Logging sinks (``hypergradient.integrations``): what is written is read back and compared
with the hyper-optimizer's own records: TensorBoard event files through tensorboard's
event reader, CSV files through ``csv``, the progress bar through its counter."""

from __future__ import annotations

import csv
import dataclasses
import io
import math

import pytest
import torch

import hypergradient as hg
from hypergradient.integrations import CSVLogger, ProgressBar, TensorBoardLogger, record_scalars
from test_holdout import HOLD
from test_hyperoptimizer_support import DT, Constant, batches, build, run


def build_two(method, logger):
    from test_hyperoptimizer_support import mlp, train_loss, val_loss

    model = mlp()
    hopt = hg.HyperOptimizer(
        model,
        {
            "decay": hg.Positive(torch.full((4, 6), 1e-2, dtype=DT)),
            "scale": torch.tensor([1.0, 2.0, 3.0], dtype=DT, requires_grad=True),
        },
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.1),
        train_loss=lambda m, h, b: train_loss(m, h, b) + 1e-3 * h["scale"].sum() * m[0].bias.sum(),
        val_loss=val_loss,
        val_data=HOLD,
        holdout_data=HOLD,
        method=method,
        inner_steps=3,
        history_size=None,
        logger=logger,
    )
    return model, hopt


def test_record_scalars_are_the_records_numbers():
    records = []
    _, hopt = build_two(Constant({"decay": 0.5, "scale": -2.0}), records.append)
    run(hopt, batches(3))
    r = records[-1]
    got = record_scalars(r, scalar_limit=8)
    assert got["loss/val"] == 1.0  # Constant's info
    assert got["loss/holdout"] == r.holdout_loss and not math.isnan(r.holdout_loss)
    assert got["hypergrad/decay"] == pytest.approx(0.5 * math.sqrt(24), rel=1e-15)
    assert got["hypergrad/scale"] == pytest.approx(2.0 * math.sqrt(3), rel=1e-15)
    assert got["hypergrad/norm"] == pytest.approx(math.sqrt(0.25 * 24 + 4 * 3), rel=1e-15)
    # SGD(lr=0.1) on raw: scale - 0.1 * (-2); decay = exp(log 0.01 - 0.05)
    assert [got[f"hparams/scale/{i}"] for i in range(3)] == pytest.approx([1.2, 2.2, 3.2])
    assert got["hparams/decay/mean"] == pytest.approx(0.01 * math.exp(-0.05), rel=1e-12)
    assert (
        got["hparams/decay/min"]
        == got["hparams/decay/max"]
        == pytest.approx(got["hparams/decay/mean"])
    )
    assert "hparams/decay/0" not in got and got["solver/num_hvps"] == 0.0
    small = record_scalars(r, scalar_limit=24)
    assert small["hparams/decay/23"] == pytest.approx(0.01 * math.exp(-0.05), rel=1e-12)


def test_a_hyperparameter_named_norm_does_not_overwrite_the_total():
    from test_hyperoptimizer_support import BCE, mlp, val_loss, weights

    model, records = mlp(), []
    hopt = hg.HyperOptimizer(
        model,
        {
            "norm": hg.Positive(torch.full((4, 6), 1e-2, dtype=DT)),
            "scale": torch.tensor([1.0, 2.0, 3.0], dtype=DT, requires_grad=True),
        },
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.1),
        train_loss=lambda m, h, b: (
            BCE(m(b[0]).reshape(-1), b[1])
            + 0.5 * (h["norm"] * weights(m) ** 2).sum()
            + 1e-3 * h["scale"].sum() * m[0].bias.sum()
        ),
        val_loss=val_loss,
        val_data=HOLD,
        method=Constant({"norm": 0.5, "scale": -2.0}),
        inner_steps=3,
        logger=records.append,
    )
    run(hopt, batches(3))
    got = record_scalars(records[-1])
    assert got["hypergrad/norm"] == pytest.approx(math.sqrt(0.25 * 24 + 4 * 3), rel=1e-15)
    assert got["hypergrad/norm/norm"] == pytest.approx(0.5 * math.sqrt(24), rel=1e-15)
    assert got["hypergrad/scale"] == pytest.approx(2.0 * math.sqrt(3), rel=1e-15)


def test_tensorboard_event_files_hold_the_records(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with TensorBoardLogger(tmp_path) as tb:
        _, hopt = build_two(hg.IFT(hg.CG(maxiter=4), damping=1.0), tb)
        run(hopt, batches(9))
    ea = EventAccumulator(
        str(tmp_path), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0}
    )
    ea.Reload()
    records = list(hopt.history)
    assert [r.step for r in records] == [3, 6, 9]
    expected = [record_scalars(r) for r in records]
    tags = ea.Tags()
    for name in expected[0]:
        events = ea.Scalars("hypergradient/" + name)
        assert [e.step for e in events] == [3, 6, 9], name
        if name == "time/seconds":
            continue
        want = [torch.tensor(x[name], dtype=torch.float32).item() for x in expected]
        assert [e.value for e in events] == want, name
    for name in ("loss/holdout", "solver/residual_norm", "hparams/scale/2", "hparams/decay/max"):
        assert "hypergradient/" + name in tags["scalars"]
    hist = ea.Histograms("hypergradient/hparams/decay")
    assert [h.step for h in hist] == [3, 6, 9]
    last = records[-1].hparams["decay"]
    assert hist[-1].histogram_value.num == 24
    assert hist[-1].histogram_value.min == pytest.approx(float(last.min()), rel=1e-6)
    assert hist[-1].histogram_value.max == pytest.approx(float(last.max()), rel=1e-6)
    assert "hypergradient/hypergrad_values/decay" in tags["histograms"]
    assert "hypergradient/hparams/scale" not in tags["histograms"]  # 3 elements: scalars
    assert any(t.startswith("hypergradient/solver/status") for t in tags["tensors"])


def test_csv_rows_are_the_records_and_a_new_column_widens_the_file(tmp_path):
    path = tmp_path / "logs" / "run.csv"
    log = CSVLogger(path)
    _, hopt = build_two(hg.IFT(hg.CG(maxiter=4), damping=1.0), log)
    run(hopt, batches(6))
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and rows == log.rows()
    for row, record in zip(rows, hopt.history):
        assert int(row["step"]) == record.step and int(row["hyper_step"]) == record.hyper_step
        assert row["status"] == record.info.status.value
        for name, value in record_scalars(record).items():
            assert float(row[name]) == value, name  # repr: exact round trip
    # a record with a diagnostic not seen before: the file gains a column
    extra = dataclasses.replace(
        hopt.history[-1],
        hyper_step=3,
        info=dataclasses.replace(hopt.history[-1].info, stats={"new_stat": 7.0}),
    )
    log.log(extra)
    rows = log.rows()
    assert len(rows) == 3 and rows[-1]["solver/new_stat"] == "7.0"
    assert rows[0]["solver/new_stat"] == "" and rows[0]["loss/val"] == repr(
        hopt.history[0].val_loss
    )
    # append: a resumed run continues the same file with the same columns
    again = CSVLogger(path, append=True)
    again.log(dataclasses.replace(hopt.history[0], hyper_step=4))
    assert len(again.rows()) == 4 and again.columns == log.columns
    assert len(CSVLogger(path).rows()) == 0  # without append: a new file


def test_a_rolled_back_hyper_step_is_never_logged(tmp_path):
    class Boom(Exception):
        pass

    class FailFirst(hg.Method):
        name = "fail-first"

        def __init__(self):
            self.fired = False

        def __call__(self, problem):
            if not self.fired:
                self.fired = True
                raise Boom
            return Constant({"decay": 0.1, "scale": 0.1})(problem)

    log = CSVLogger(tmp_path / "run.csv")
    _, hopt = build_two(FailFirst(), log)
    steps = batches(3)
    run(hopt, steps[:2])
    hopt.zero_grad()
    hopt.train_loss(steps[2]).backward()
    with pytest.raises(Boom):
        hopt.step(steps[2])
    assert log.rows() == []
    hopt.step(steps[2])
    assert [int(r["hyper_step"]) for r in log.rows()] == [1]


def test_progress_bar_counts_hyper_steps_and_several_loggers_all_receive():
    out, seen = io.StringIO(), []
    bar = ProgressBar(total=3, file=out, mininterval=0)
    _, hopt = build_two(Constant({"decay": 0.1, "scale": 0.1}), [bar, seen.append])
    run(hopt, batches(9))
    bar.close()
    assert bar.bar.n == 3 and len(seen) == 3
    assert "holdout=" in out.getvalue() and "val=1" in out.getvalue()


def test_bad_arguments_raise_naming_them(tmp_path):
    with pytest.raises(hg.ArgumentTypeError, match="`writer`"):
        TensorBoardLogger(writer=object())
    with pytest.raises(ValueError, match="`scalar_limit`"):
        CSVLogger(tmp_path / "x.csv", scalar_limit=0)
    with pytest.raises(hg.ArgumentTypeError, match="`path`"):
        CSVLogger(3)
    with pytest.raises(hg.ArgumentTypeError, match="HyperStepRecord"):
        CSVLogger(tmp_path / "y.csv").log({"val_loss": 1.0})
    with pytest.raises(hg.ArgumentTypeError, match="`logger`"):
        build(logger=[print, 3])


@pytest.mark.parametrize("mixed", ["hparams", "params"])
def test_a_diagnostic_the_method_did_not_compute_is_not_logged(mixed):
    """T1T2 with its hyperparameters-first product computes no ``grad_theta f``: its
    ``inner_grad_norm`` is NaN and no sink receives it; the other order logs the norm."""
    records = []
    _, hopt = build_two(hg.T1T2(mixed=mixed), records.append)
    run(hopt, batches(3))
    info = records[-1].info
    got = record_scalars(records[-1], scalar_limit=8)
    assert all(not math.isnan(v) for v in got.values())
    assert info.stats["mixed"] == mixed
    if mixed == "hparams":
        assert math.isnan(info.inner_grad_norm) and "solver/inner_grad_norm" not in got
    else:
        assert got["solver/inner_grad_norm"] == info.inner_grad_norm > 0
