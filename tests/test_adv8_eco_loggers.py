"""Adversarial checks of the logging sinks (round 8): a hypergradient histogram that shared
its tag with the norm's scalar (TensorBoard's scalars dashboard failed on it and its
histograms dashboard did not show it), and two hypergradient norms written under one name."""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg
from hypergradient.integrations import TensorBoardLogger, record_scalars
from test_adv6_eco_loggers import _events
from test_hyperoptimizer_support import BCE, DT, VAL, batches, build, mlp, run, weights


def test_tensorboard_dashboards_read_the_hypergradient_norm_and_its_histogram(tmp_path):
    """``hypergrad/decay`` held both the norm's scalars and the histograms: TensorBoard's
    scalars dashboard raised "can only convert an array of size 1" reading the run, and the
    histograms dashboard listed only ``hparams/decay``."""
    pytest.importorskip("tensorboard")
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider
    from tensorboard.backend.event_processing import plugin_event_multiplexer as pem

    with TensorBoardLogger(tmp_path) as tb:
        _, hopt = build(inner_steps=2, logger=tb)  # decay: 24 elements, histograms
        run(hopt, batches(4))
    mux = pem.EventMultiplexer({".": str(tmp_path)})
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(tmp_path))
    ctx = context.RequestContext()
    scalars = provider.read_scalars(
        ctx, experiment_id="", plugin_name="scalars", run_tag_filter=None, downsample=100
    )["."]
    got = [(p.step, p.value) for p in scalars["hypergradient/hypergrad/decay"]]
    want = [(r.step, r.summaries["decay"]["hypergrad_norm"]) for r in hopt.history]
    assert [s for s, _ in got] == [s for s, _ in want] == [2, 4]
    assert [v for _, v in got] == [torch.tensor(v, dtype=torch.float32).item() for _, v in want]
    hist = provider.list_tensors(
        ctx, experiment_id="", plugin_name="histograms", run_tag_filter=None
    )["."]
    assert set(hist) == {"hypergradient/hparams/decay", "hypergradient/hypergrad_values/decay"}


def test_two_hypergradient_norms_under_one_name_are_refused_and_the_step_rolled_back():
    """A hyperparameter named ``norm`` is logged as ``hypergrad/norm/norm``, so is one
    named ``norm/norm``: the first's norm was silently overwritten by the second's."""
    model = mlp()
    hp = {
        "norm": torch.tensor(0.01, dtype=DT, requires_grad=True),
        "norm/norm": torch.tensor(0.02, dtype=DT, requires_grad=True),
    }

    def train_loss(m, h, b):
        fit = BCE(m(b[0]).reshape(-1), b[1])
        return fit + (0.5 * h["norm"] + 3 * h["norm/norm"]) * (weights(m) ** 2).sum()

    records = []

    def sink(record):
        records.append(record)
        record_scalars(record)

    hopt = hg.HyperOptimizer(
        model,
        hp,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        train_loss=train_loss,
        val_loss=lambda m, h, b: BCE(m(b[0]).reshape(-1), b[1]),
        val_data=VAL,
        method=hg.T1T2(),
        inner_steps=2,
        logger=sink,
    )
    with pytest.raises(ValueError, match="'hypergrad/norm/norm'.*rename"):
        run(hopt, batches(2))
    assert hopt.hparams["norm"].item() == 0.01 and hopt.hparams["norm/norm"].item() == 0.02
    assert hopt.hyper_steps == 0
    summaries = records[-1].summaries  # the two norms differ: one would have hidden the other
    assert summaries["norm"]["hypergrad_norm"] != summaries["norm/norm"]["hypergrad_norm"]


@pytest.mark.filterwarnings("ignore::hypergradient.HypergradientWarning")
def test_two_resumed_hyper_optimizers_sharing_a_csv_file_keep_each_others_rows(tmp_path):
    """Two hyper-optimizers write one CSV file, crash after hyper-step 2 and resume from
    hyper-step 1. The first's purge removed both old step-2 rows, shifting the file; the
    second then took the first's new step-2 row for one it inherited and dropped it."""
    from hypergradient.integrations import CSVLogger

    path, data = tmp_path / "run.csv", batches(6)

    def pair(append):
        _, a = build(inner_steps=2, logger=CSVLogger(path, append=append))
        _, b = build(inner_steps=2, logger=CSVLogger(path, append=True), outer_lr=0.2)
        return a, b

    a, b = pair(append=False)
    for batch in data[:2]:
        run(a, [batch])
        run(b, [batch])
    saved = [
        (h.state_dict(), {k: v.clone() for k, v in h.view.module.state_dict().items()})
        for h in (a, b)
    ]
    for batch in data[2:4]:  # hyper-step 2 of both, then the crash
        run(a, [batch])
        run(b, [batch])
    first = [h.history[0] for h in (a, b)]
    resumed = pair(append=True)
    for h, (state, weights_) in zip(resumed, saved):
        h.view.module.load_state_dict(weights_)
        h.load_state_dict(state)
    for batch in data[2:6]:
        for h in resumed:
            run(h, [batch])
    records = first + [r for h in resumed for r in list(h.history)[1:]]
    want = sorted((r.hyper_step, repr(record_scalars(r)["hparams/decay/mean"])) for r in records)
    rows = CSVLogger(path, append=True).rows()
    got = sorted((int(r["hyper_step"]), r["hparams/decay/mean"]) for r in rows)
    assert [s for s, _ in want] == [1, 1, 2, 2, 3, 3]
    assert got == want


@pytest.mark.filterwarnings("ignore::hypergradient.HypergradientWarning")
def test_a_nan_holdout_score_is_written_as_nan_not_as_no_holdout(tmp_path):
    """The holdout scores 2.36, NaN, 3.06 were written 2.36, (nothing), 3.06: a diverged
    held-out loss looked like a run without holdout data (and Lightning's callback_metrics
    kept the previous score for a monitor)."""
    import math

    from hypergradient.hyperoptimizer import HyperStepRecord
    from hypergradient.integrations import CSVLogger
    from test_holdout import HOLD
    from test_hyperoptimizer_support import val_loss

    calls = []

    def holdout_loss(m, h, b):
        calls.append(1)
        value = 3.0 * val_loss(m, h, b)
        return value * math.nan if len(calls) == 2 else value

    path = tmp_path / "run.csv"
    _, hopt = build(
        inner_steps=2, holdout_data=HOLD, holdout_loss=holdout_loss, logger=CSVLogger(path)
    )
    run(hopt, batches(6))
    records = list(hopt.history)
    assert [r.holdout_scored for r in records] == [True, True, True]
    got = [r["loss/holdout"] for r in CSVLogger(path, append=True).rows()]
    assert got == [repr(r.holdout_loss) for r in records] and got[1] == "nan"
    # Without holdout data nothing is scored; a checkpoint of an older version (no
    # holdout_scored) reads it from the loss.
    _, plain = build(inner_steps=2)
    run(plain, batches(2))
    assert not plain.history[0].holdout_scored
    assert "loss/holdout" not in record_scalars(plain.history[0])
    old = records[0].to_dict()
    del old["holdout_scored"]
    assert HyperStepRecord.from_dict(old).holdout_scored
    old["holdout_loss"] = math.nan
    assert not HyperStepRecord.from_dict(old).holdout_scored
    assert HyperStepRecord.from_dict(records[1].to_dict()).holdout_scored


def test_a_histogram_and_a_scalar_under_one_tag_are_refused_before_writing(tmp_path):
    """``a`` (2 elements: scalars ``hparams/a/0``, ``hparams/a/1``) and ``a/0`` (9: a
    histogram ``hparams/a/0``) shared a tag; TensorBoard's scalars dashboard then failed."""
    pytest.importorskip("tensorboard")
    model = mlp()
    hp = {
        "a": torch.full((2,), 0.01, dtype=DT, requires_grad=True),
        "a/0": torch.full((9,), 0.01, dtype=DT, requires_grad=True),
    }

    def train_loss(m, h, b):
        fit = BCE(m(b[0]).reshape(-1), b[1])
        return fit + (h["a"].sum() + h["a/0"].sum()) * (weights(m) ** 2).sum()

    with TensorBoardLogger(tmp_path) as tb:
        hopt = hg.HyperOptimizer(
            model,
            hp,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
            outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            train_loss=train_loss,
            val_loss=lambda m, h, b: BCE(m(b[0]).reshape(-1), b[1]),
            val_data=VAL,
            method=hg.T1T2(),
            inner_steps=2,
            logger=tb,
        )
        with pytest.raises(ValueError, match="'hparams/a/0' would hold a scalar and a histogram"):
            run(hopt, batches(2))
    assert hopt.hyper_steps == 0 and torch.equal(
        hopt.hparams["a"], torch.full((2,), 0.01, dtype=DT)
    )
    assert _events(tmp_path).Tags()["scalars"] == []  # nothing written for the refused record
