"""The validation-overfit guard: ``HyperOptimizer(..., holdout_data=..., keep_best=...,
patience=...)``.

Checked against exact references: the recorded holdout score is the held-out loss at the
weights of the hyper-step with the hyperparameters before its update (computed here by
hand); the best values are those of the best-scoring hyper-step; early stopping happens
after exactly ``patience`` non-improving scores (a scripted holdout loss); the guard's
state survives a checkpoint (bit-for-bit against the uninterrupted run) and a rolled-back
hyper-step leaves it untouched."""

from __future__ import annotations

import copy
import datetime
import math
import os
import traceback

import pytest
import torch
import torch.distributed as dist

import hypergradient as hg
from ranks import shared_dict, spawn
from test_hyperoptimizer_support import (
    DT,
    VAL,
    assert_same,
    batches,
    build,
    data,
    everything,
    mlp,
    roundtrip,
    run,
    val_loss,
)

HOLD = data(30, 7)


class Scripted:
    """A holdout loss returning ``values[i]`` at its ``i``-th call."""

    def __init__(self, values):
        self.values, self.calls = list(values), 0

    def __call__(self, m, h, batch):
        self.calls += 1
        return torch.tensor(self.values[self.calls - 1], dtype=DT)


def test_the_holdout_score_is_the_held_out_loss_before_the_update():
    """A hyper-step does not move the weights, so the weights after ``step`` are those it
    scored; the hyperparameters are those before its update."""
    model, hopt = build(holdout_data=HOLD)  # all 30 rows at every score
    for i, batch in enumerate(batches(9)):
        before = {k: v.clone() for k, v in hopt.hparams.items()}
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        hopt.step(batch)
        if (i + 1) % hopt.inner_steps == 0:
            with torch.no_grad():
                expected = float(val_loss(model, before, HOLD))
            record = hopt.history[-1]
            assert record.holdout_loss == pytest.approx(expected, rel=1e-13, abs=0)
            assert not torch.equal(record.hparams["decay"], before["decay"])  # it moved
    scores = [r.holdout_loss for r in hopt.history]
    assert len(scores) == 3 and hopt.best_holdout_loss == min(scores)
    assert len(set(scores)) == 3


def test_best_hparams_are_those_scored_best_and_restore_best_sets_them():
    values = [0.5, 0.3, 0.4, 0.35, 0.6]
    model, hopt = build(holdout_data=HOLD, holdout_loss=Scripted(values), inner_steps=1)
    seen = []  # the values before each hyper-step's update
    for batch in batches(5):
        seen.append({k: v.clone() for k, v in hopt.hparams.items()})
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        hopt.step(batch)
    assert [r.holdout_loss for r in hopt.history] == values
    assert hopt.best_holdout_loss == 0.3 and hopt.guard.state.best_hyper_step == 2
    best = hopt.best_hparams
    assert torch.equal(best["decay"], seen[1]["decay"])
    assert not torch.equal(hopt.hparams["decay"], best["decay"])
    assert torch.equal(hopt.restore_best()["decay"], best["decay"])
    assert torch.equal(hopt.hparams["decay"], seen[1]["decay"])
    assert not hopt.stopped  # no patience: never stops


def test_patience_stops_the_hyper_steps_and_restores_the_best():
    values = [0.5, 0.3, 0.31, 0.4, 0.29, 0.3, 0.3, 0.3]
    model, hopt = build(
        holdout_data=HOLD, holdout_loss=Scripted(values), inner_steps=1, patience=2, min_delta=0.02
    )
    seen = []
    for batch in batches(7):
        seen.append({k: v.clone() for k, v in hopt.hparams.items()})
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        hopt.step(batch)
    # 0.31 and 0.4 do not improve on 0.3, so hyper-steps stop at the 4th; 0.29 is never scored
    assert hopt.stopped and hopt.hyper_steps == 4
    assert hopt.best_holdout_loss == 0.3 and hopt.guard.state.bad == 2
    assert torch.equal(hopt.hparams["decay"], seen[1]["decay"])  # restored at the stop
    assert torch.equal(hopt.history[-1].hparams["decay"], seen[1]["decay"])
    assert hopt.state_dict()["counters"]["count"] == 7  # training went on
    weights = model[0].weight.detach().clone()
    hopt.zero_grad()
    hopt.train_loss(batches(1)[0]).backward()
    hopt.step(batches(1)[0])
    assert not torch.equal(model[0].weight, weights) and hopt.hyper_steps == 4


def test_min_delta_counts_small_improvements_as_none():
    values = [1.0, 0.995, 0.99, 0.5]
    _, hopt = build(
        holdout_data=HOLD, holdout_loss=Scripted(values), inner_steps=1, patience=2, min_delta=0.01
    )
    run(hopt, batches(4))
    assert hopt.stopped and hopt.hyper_steps == 3 and hopt.best_holdout_loss == 1.0


def test_keep_best_false_scores_and_stops_but_keeps_no_copy():
    values = [0.5, 0.6, 0.7]
    _, hopt = build(
        holdout_data=HOLD, holdout_loss=Scripted(values), inner_steps=1, patience=2, keep_best=False
    )
    run(hopt, batches(3))
    assert hopt.stopped and hopt.best_hparams is None and hopt.best_holdout_loss == 0.5
    assert hopt.history[-1].hparams["decay"].equal(hopt.hparams["decay"])  # not restored
    with pytest.raises(ValueError, match="keep_best=True"):
        hopt.restore_best()


def test_without_holdout_the_record_says_nan_and_nothing_is_kept():
    _, hopt = build()
    run(hopt, batches(3))
    assert math.isnan(hopt.history[-1].holdout_loss)
    assert hopt.best_hparams is None and hopt.best_holdout_loss is None and not hopt.stopped
    with pytest.raises(ValueError, match="holdout_data"):
        hopt.restore_best()


@pytest.mark.parametrize(
    "kw, error, match",
    [
        ({"patience": 3}, ValueError, "need `holdout_data`"),
        ({"holdout_batch_size": 8}, ValueError, "need `holdout_data`"),
        ({"holdout_data": HOLD, "patience": 0}, ValueError, "`patience` must be an integer >= 1"),
        ({"holdout_data": HOLD, "patience": 1.5}, hg.ArgumentTypeError, "`patience`"),
        ({"holdout_data": HOLD, "keep_best": 1}, hg.ArgumentTypeError, "`keep_best`"),
        ({"holdout_data": HOLD, "min_delta": -1.0}, ValueError, "`min_delta`"),
        ({"holdout_data": HOLD, "holdout_loss": 3}, hg.ArgumentTypeError, "`holdout_loss`"),
        ({"holdout_data": HOLD, "holdout_batch_size": 0}, ValueError, "`holdout_batch_size`"),
        ({"holdout_data": "rows"}, hg.ArgumentTypeError, "`holdout_data`"),
    ],
)
def test_bad_arguments_raise_naming_them(kw, error, match):
    with pytest.raises(error, match=match):
        build(**kw)


@pytest.mark.parametrize("method", ["ift", "unrolled"])
def test_resume_with_the_guard_is_bit_for_bit(method):
    """Interrupt after 3 steps (mid-window), save, load into a fresh run, finish: the same as
    the run that never stopped, guard state (sampler, best, counter, stop flag) included.
    The scores on 8 random held-out rows rise after the first, so the hyper-steps stop
    after the resume (at the 3rd) and the last 8 steps train without them."""
    make = {"ift": lambda: None, "unrolled": lambda: hg.Unrolled()}[method]
    kw = {"holdout_data": HOLD, "holdout_batch_size": 8, "patience": 2, "inner_steps": 2}
    steps = batches(14)
    model_a, hopt_a = build(make(), **kw)
    run(hopt_a, steps)
    model_b, hopt_b = build(make(), **kw)
    run(hopt_b, steps[:3])
    saved = roundtrip({"model": model_b.state_dict(), "hopt": hopt_b.state_dict()})
    assert saved["hopt"]["holdout"]["best_hyper_step"] == 1
    model_c, hopt_c = build(make(), **kw)
    model_c.load_state_dict(saved["model"])
    hopt_c.load_state_dict(saved["hopt"])
    run(hopt_c, steps[3:])
    assert_same(everything(model_a, hopt_a), everything(model_c, hopt_c))
    assert hopt_c.hyper_steps == 3 and hopt_c.stopped and hopt_c.guard.state.best_hyper_step == 1


def test_a_checkpoint_without_guard_state_starts_the_guard_fresh_and_bad_state_raises():
    model, hopt = build()
    run(hopt, batches(3))
    state = hopt.state_dict()
    _, guarded = build(holdout_data=HOLD)
    guarded.load_state_dict(state)
    assert guarded.best_holdout_loss is None and guarded.guard.state.bad == 0
    _, other = build(holdout_data=HOLD)
    run(other, batches(3))
    good = other.state_dict()
    for key, value, match in [
        ("best_loss", float("nan"), "best holdout loss"),
        ("stopped", 1, "stopped"),
        ("bad", -1, "bad"),
        ("best_raw", {"decay": torch.zeros(3, dtype=DT)}, "decay"),
    ]:
        bad = copy.deepcopy(good)
        bad["holdout"][key] = value
        _, target = build(holdout_data=HOLD)
        before = everything(mlp(), target)
        with pytest.raises(ValueError, match=match):
            target.load_state_dict(bad)
        assert_same(before, everything(mlp(), target))


def test_a_failed_hyper_step_leaves_the_guard_as_before():
    class Boom(Exception):
        pass

    class FailingSecond(hg.Method):
        name = "failing"

        def __init__(self):
            self.inner, self.calls = hg.IFT(hg.CG(maxiter=5), damping=1.0), 0

        def __call__(self, problem):
            self.calls += 1
            out = self.inner(problem)
            if self.calls == 2:
                raise Boom
            return out

    model, hopt = build(FailingSecond(), holdout_data=HOLD, holdout_batch_size=8, patience=3)
    steps = batches(6)
    run(hopt, steps[:3])
    for batch in steps[3:5]:
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        hopt.step(batch)
    hopt.zero_grad()
    hopt.train_loss(steps[5]).backward()
    before = everything(model, hopt)
    guard_before = hopt.guard.snapshot()
    with pytest.raises(Boom):
        hopt.step(steps[5])
    assert_same(before, everything(model, hopt))
    assert hopt.guard.state == guard_before
    hopt.step(steps[5])  # the retry scores the same held-out rows as the failed call drew
    assert hopt.hyper_steps == 2


def test_trajectory_methods_stop_recording_once_stopped():
    values = [0.5, 0.6]
    model, hopt = build(
        hg.Unrolled(), holdout_data=HOLD, holdout_loss=Scripted(values), inner_steps=1, patience=1
    )
    run(hopt, batches(2))
    assert hopt.stopped and hopt.hyper_steps == 2
    run(hopt, batches(3))
    assert hopt.loop.window is None and hopt.state_dict()["window"] is None


# ------------------------------------------------------------------ data-parallel


def _worker(rank, port, results):
    try:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
        )
        shard = (HOLD[0][rank::2], HOLD[1][rank::2])  # 15 rows each
        model, hopt = build(holdout_data=shard, process_group=dist.group.WORLD, inner_steps=2)
        for batch in batches(2):
            before = {k: v.clone() for k, v in hopt.hparams.items()}
            hopt.zero_grad()
            hopt.train_loss(batch).backward()
            hopt.step(batch)
        with torch.no_grad():
            local = float(val_loss(model, before, shard))
        results[rank] = (local, hopt.history[-1].holdout_loss, hopt.best_holdout_loss)
    except BaseException:  # noqa: BLE001 - reported to the parent
        results[(rank, "error")] = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_under_a_process_group_the_score_is_the_mean_over_ranks():
    from ranks import free_port as _free_port

    results = shared_dict()
    spawn(_worker, (_free_port(), results))
    for rank in range(2):
        assert (rank, "error") not in results, results[(rank, "error")]
    mean = (results[0][0] + results[1][0]) / 2
    for rank in range(2):
        assert results[rank][1] == pytest.approx(mean, rel=1e-13)
        assert results[rank][2] == results[rank][1]
    assert results[0][0] != results[1][0]


def test_val_data_is_untouched_by_the_guard():
    """The holdout draws from its own generator: the validation batches are those of a run
    without the guard."""
    _, plain = build(val_batch_size=8)
    _, guarded = build(val_batch_size=8, holdout_data=HOLD, holdout_batch_size=8)
    run(plain, batches(6))
    run(guarded, batches(6))
    states = [h.val_sampler.generator.get_state() for h in (plain, guarded)]
    assert torch.equal(*states)
    assert plain.history[-1].val_loss == guarded.history[-1].val_loss
    assert VAL[0].shape[0] == 40
