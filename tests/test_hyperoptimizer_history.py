"""History and growth (defect family 5): the history is bounded by default and feeds a
pluggable logging sink; records hold the method's Info and tensors only for small
hyperparameters; checkpoint size stays constant over many hyper-steps; resuming with a
DataLoader as val_data fetches no batch drawn before."""

from __future__ import annotations

import math

import pytest
import torch

import hypergradient as hg
from hypergradient.hyperoptimizer import History, HyperStepRecord
from test_hyperoptimizer_support import (
    DT,
    TRAIN,
    VAL,
    batches,
    build,
    mlp,
    roundtrip,
    run,
    size_of,
    train_loss,
    val_loss,
)


def _t1t2(**kw):
    return build(hg.T1T2(), inner_steps=1, **kw)


def test_history_is_bounded_by_default_and_the_logger_sees_every_record():
    seen = []
    model, hopt = _t1t2(logger=seen.append)
    run(hopt, batches(130, size=8))
    assert hopt.hyper_steps == 130 and len(hopt.history) == 100 == hopt.history.maxlen
    assert [r.hyper_step for r in hopt.history] == list(range(31, 131))
    assert hopt.history[-1] is seen[-1] and len(seen) == 130
    assert [r.hyper_step for r in seen] == list(range(1, 131))


@pytest.mark.parametrize("size, kept", [(None, 12), (0, 0), (5, 5)])
def test_history_size_is_configurable(size, kept):
    class Sink:
        def __init__(self):
            self.records = []

        def log(self, record):
            self.records.append(record)

    sink = Sink()
    model, hopt = _t1t2(history_size=size, logger=sink)
    run(hopt, batches(12, size=8))
    assert len(hopt.history) == kept and hopt.hyper_steps == 12 and len(sink.records) == 12
    assert all(isinstance(r, HyperStepRecord) for r in sink.records)


def test_records_hold_the_info_and_tensors_only_for_small_hyperparameters():
    model = mlp(width=200)  # a (200, 6) decay: 1200 elements, above the limit of 1000
    small = torch.tensor(0.5, dtype=DT)

    def loss(m, h, batch):
        return train_loss(m, h, batch) * h["scale"]

    hopt = hg.HyperOptimizer(
        model,
        {"decay": hg.Positive(torch.full((200, 6), 1e-2, dtype=DT)), "scale": small},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.01),
        train_loss=loss,
        val_loss=val_loss,
        val_data=VAL,
        method=hg.T1T2(),
        inner_steps=2,
    )
    run(hopt, batches(4))
    newest, record = hopt.history[-1], hopt.history[-2]
    # the newest record is complete (a benchmark or a debugger reads the whole hypergradient)
    assert list(newest.hparams) == ["decay", "scale"] and list(newest.hypergrad) == [
        "decay",
        "scale",
    ]
    assert torch.equal(newest.hparams["decay"], hopt.hparams["decay"])
    # older records keep tensors only for the small hyperparameters
    assert isinstance(record.info, hg.Info) and record.info.method == "t1t2"
    assert record.diagnostics["method"] == "t1t2" and record.diagnostics["status"] == "fixed_budget"
    assert record.val_loss == record.info.outer_loss and math.isfinite(record.val_loss)
    assert list(record.hparams) == ["scale"] and list(record.hypergrad) == ["scale"]
    record = newest
    assert torch.equal(record.hparams["scale"], hopt.hparams["scale"])
    decay = hopt.hparams["decay"]
    s = record.summaries["decay"]
    assert s["norm"] == pytest.approx(float(decay.norm()), rel=1e-12)
    assert s["mean"] == pytest.approx(float(decay.mean()), rel=1e-12)
    assert (s["min"], s["max"]) == (float(decay.min()), float(decay.max()))
    total = math.hypot(s["hypergrad_norm"], record.summaries["scale"]["hypergrad_norm"])
    assert record.hypergrad_norm == pytest.approx(total, rel=1e-12)
    assert record.summaries["scale"]["hypergrad_norm"] == pytest.approx(
        float(record.hypergrad["scale"].abs()), rel=1e-12
    )


def test_checkpoint_size_stays_constant_over_many_hyper_steps():
    """10,000 per-weight decays, 200 hyper-steps: the checkpoint at hyper-step 200 is the
    size of the one at 100 (the history is full at both) and less than twice the one at
    10 (it held every hyperparameter and hypergradient of every step before)."""
    n = 10_000
    g = torch.Generator().manual_seed(0)
    X, Xv = torch.randn(16, n, generator=g, dtype=DT), torch.randn(16, n, generator=g, dtype=DT)
    y, yv = (X[:, 0] > 0).to(DT), (Xv[:, 0] > 0).to(DT)
    model = torch.nn.Linear(n, 1).double()
    hopt = hg.HyperOptimizer(
        model,
        {"decay": hg.Positive(torch.full((1, n), 1e-3, dtype=DT))},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.01),
        train_loss=lambda m, h, b: val_loss(m, h, b) + 0.5 * (h["decay"] * m.weight**2).sum(),
        val_loss=val_loss,
        val_data=(Xv, yv),
        method=hg.T1T2(),
        inner_steps=1,
    )
    sizes = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small products: one thread is faster on a shared machine
    try:
        for step in range(1, 201):
            run(hopt, [(X, y)])
            if step in (10, 100, 200):
                sizes[step] = size_of(hopt.state_dict())
    finally:
        torch.set_num_threads(threads)
    assert hopt.hyper_steps == 200
    assert abs(sizes[200] - sizes[100]) < 0.01 * sizes[100], sizes
    assert sizes[200] < 2 * sizes[10] and sizes[10] > 3 * 8 * n, sizes


class Counting(torch.utils.data.Dataset):
    """The validation set, counting how many items were fetched."""

    def __init__(self):
        self.fetched = 0

    def __len__(self):
        return len(VAL[1])

    def __getitem__(self, i):
        self.fetched += 1
        return VAL[0][i], VAL[1][i]


def test_resuming_with_a_dataloader_fetches_no_batch_drawn_before():
    data = Counting()
    loader = torch.utils.data.DataLoader(data, batch_size=8)  # 5 batches per pass
    model, hopt = _t1t2(val_data=loader, val_batch_size=None)
    run(hopt, batches(12, size=8))
    assert data.fetched == 12 * 8
    ck = roundtrip(hopt.state_dict())
    assert ck["val_sampler"] == {"kind": "iterable", "drawn": 12}

    fresh = Counting()
    model_b, hopt_b = _t1t2(
        val_data=torch.utils.data.DataLoader(fresh, batch_size=8), val_batch_size=None
    )
    model_b.load_state_dict(model.state_dict())
    hopt_b.load_state_dict(ck)
    assert fresh.fetched == 0  # nothing replayed
    run(hopt_b, batches(1, size=8))
    assert fresh.fetched == 8 and hopt_b.hyper_steps == 13
    assert hopt_b.val_sampler.drawn == 13
    # a fresh pass: the batch drawn is the loader's first one, not the 13th of the stream
    first = next(iter(torch.utils.data.DataLoader(Counting(), batch_size=8)))
    with torch.no_grad():
        assert hopt_b.history[-1].val_loss == pytest.approx(
            float(val_loss(model_b, {}, first)), rel=1e-12
        )


def _same(a: dict, b: dict) -> bool:
    """Dict equality where NaN equals NaN (T1T2's hyperparameters-first order reports
    ``inner_grad_norm`` NaN: nothing computes ``grad_theta f``)."""
    nan = lambda v: isinstance(v, float) and math.isnan(v)  # noqa: E731
    return a.keys() == b.keys() and all(a[k] == b[k] or (nan(a[k]) and nan(b[k])) for k in a)


def test_a_history_roundtrip_keeps_the_records():
    h = History(3)
    model, hopt = _t1t2(history_size=3)
    run(hopt, batches(5, size=8))
    h.load_state_dict(roundtrip(hopt.history.state_dict()))
    assert h.total == 5 and [r.hyper_step for r in h] == [3, 4, 5]
    for a, b in zip(h, hopt.history):
        assert _same(a.info.as_dict(), b.info.as_dict()) and _same(a.diagnostics, b.diagnostics)
        assert torch.equal(a.hparams["decay"], b.hparams["decay"])
    with pytest.raises(ValueError, match="history count"):
        History(3).load_state_dict(
            {"total": 1, "records": list(hopt.history.state_dict()["records"])}
        )


def test_training_data_sampled_from_tensors_is_used_when_step_gets_no_batch():
    sizes = []

    def loss(m, h, batch):
        sizes.append(len(batch[0]))
        return train_loss(m, h, batch)

    model, hopt = build(
        hg.T1T2(), train_data=TRAIN, train_batch_size=8, inner_steps=2, train_loss=loss
    )
    for batch in batches(4):  # batches of 16 rows in the loop
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        hopt.step()
    assert hopt.hyper_steps == 2
    assert sizes.count(16) == 4 and sizes.count(8) >= 2 and set(sizes) == {8, 16}
