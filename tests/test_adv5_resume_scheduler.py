"""A trajectory window whose inner learning rate a scheduler changed before the checkpoint
was saved: the resumed run must skip that window's hyper-step as the uninterrupted run does
(the window's start settings are part of the checkpoint; they used to be re-read at the
first step after the load, so the change went unseen and the resumed run hyper-stepped
with a replay at the wrong learning rate)."""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg
from test_hyperoptimizer_support import (
    DT,
    VAL,
    assert_same,
    batches,
    everything,
    mlp,
    roundtrip,
    train_loss,
    val_loss,
    weights,
)

STEPS = batches(6)


def _build():
    model = mlp()
    decay = hg.Positive(torch.full(tuple(weights(model).shape), 1e-2, dtype=DT))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.9)
    hopt = hg.HyperOptimizer(
        model,
        {"decay": decay},
        inner_optimizer=opt,
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.05),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=VAL,
        val_batch_size=16,
        inner_steps=3,
        method=hg.Unrolled(),
    )
    return model, hopt, sched


def _run(hopt, sched, steps):
    for batch in steps:
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        hopt.step(batch)
        sched.step()


@pytest.mark.parametrize("cut", [1, 2, 4, 5])
def test_a_scheduler_change_before_the_save_is_still_seen_after_the_load(cut):
    warnings.simplefilter("ignore", hg.HypergradientWarning)
    model, hopt, sched = _build()
    _run(hopt, sched, STEPS)
    expected = everything(model, hopt)
    assert hopt.hyper_steps == 0  # StepLR changes lr inside both windows: both skipped

    model, hopt, sched = _build()
    _run(hopt, sched, STEPS[:cut])
    saved = [roundtrip(x.state_dict()) for x in (model, hopt, sched)]
    model2, hopt2, sched2 = _build()
    for obj, state in zip((model2, hopt2, sched2), saved):
        obj.load_state_dict(state)
    _run(hopt2, sched2, STEPS[cut:])
    got = everything(model2, hopt2)
    got["grads"] = expected["grads"] = None
    assert hopt2.hyper_steps == 0
    assert_same(expected, got)


def test_malformed_start_settings_are_refused_and_change_nothing():
    model, hopt, sched = _build()
    _run(hopt, sched, STEPS[:2])
    state = roundtrip(hopt.state_dict())
    state["window"]["settings0"] = "lr=0.1"
    before = everything(model, hopt)
    with pytest.raises(ValueError, match="settings0"):
        hopt.load_state_dict(state)
    assert_same(before, everything(model, hopt))
