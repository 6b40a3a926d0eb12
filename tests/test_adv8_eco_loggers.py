"""Adversarial checks of the logging sinks (round 8): a hypergradient histogram that shared
its tag with the norm's scalar (TensorBoard's scalars dashboard failed on it and its
histograms dashboard did not show it), and two hypergradient norms written under one name."""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg
from hypergradient.integrations import TensorBoardLogger, record_scalars
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
