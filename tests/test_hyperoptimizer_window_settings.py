"""Trajectory methods replay a window with the inner optimizer's settings at its start: a
setting changed inside the window (a learning-rate scheduler stepped every step, a warm-up
written into ``param_groups``, a tensor ``lr`` filled in place) skips that hyper-step with
a warning instead of applying the hypergradient of steps the optimizer did not take; a
scheduler stepped right after each hyper-step keeps every replay exact."""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg
from test_hyperoptimizer_support import (
    VAL,
    assert_same,
    batches,
    build,
    mlp,
    roundtrip,
    train_loss,
    val_loss,
    weights,
)

METHODS = [hg.Unrolled, hg.ForwardMode, hg.DrMAD]


def _run(hopt, data, after=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, b in enumerate(data):
            hopt.zero_grad()
            hopt.train_loss(b).backward()
            hopt.step(b)
            if after is not None:
                after(i)
    return [str(w.message) for w in caught if issubclass(w.category, hg.HypergradientWarning)]


@pytest.mark.parametrize("make", METHODS)
def test_a_scheduler_stepped_inside_the_window_skips_the_hyper_step(make):
    model, hopt = build(make(), inner_steps=3)
    sched = torch.optim.lr_scheduler.StepLR(hopt.inner_optimizer, 1, 0.5)
    decay0 = hopt.hparams["decay"].clone()
    # the same training without a hyper-optimizer: the inner steps stand
    ref_model, ref = build(make(), inner_steps=3)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref.inner_optimizer, 1, 0.5)
    texts = _run(hopt, batches(6), after=lambda i: sched.step())
    for b in batches(6):
        ref.inner_optimizer.zero_grad()
        ref.train_loss(b).backward()
        ref.inner_optimizer.step()
        ref_sched.step()
    skipped = [t for t in texts if "hyper-step skipped" in t]
    assert len(skipped) == 2 and "'lr' (param group 0) changed from 0.3 to 0.15" in skipped[0]
    assert hopt.loop.skipped == 2 and len(hopt.history) == 0
    assert torch.equal(hopt.hparams["decay"], decay0)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("make", METHODS)
def test_a_scheduler_stepped_after_each_hyper_step_keeps_the_replay_exact(make):
    model, hopt = build(make(), inner_steps=3)
    sched = torch.optim.lr_scheduler.StepLR(hopt.inner_optimizer, 1, 0.5)
    texts = _run(hopt, batches(9), after=lambda i: sched.step() if (i + 1) % 3 == 0 else None)
    assert not [t for t in texts if "skipped" in t or "replay" in t]
    assert len(hopt.history) == 3 and hopt.loop.skipped == 0
    assert hopt.inner_optimizer.param_groups[0]["lr"] == pytest.approx(0.3 / 8)
    errors = [r.info.replay_error for r in hopt.history]
    assert all(e is not None and e < 1e-12 for e in errors)


def test_a_tensor_lr_filled_in_place_inside_the_window_is_seen():
    model, hopt = build(hg.Unrolled(), inner_steps=3)
    lr = torch.tensor(0.3, dtype=torch.float64)
    hopt.inner_optimizer.param_groups[0]["lr"] = lr
    texts = _run(hopt, batches(3), after=lambda i: lr.fill_(0.1) if i == 0 else None)
    assert any("changed from 0.3" in t and "to 0.1" in t for t in texts)
    assert len(hopt.history) == 0


def test_begin_end_step_sees_a_warm_up_written_between_steps():
    model, hopt = build(hg.Unrolled(), inner_steps=3)
    opt = hopt.inner_optimizer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, b in enumerate(batches(3)):
            for g in opt.param_groups:  # Lightning's warm-up idiom in optimizer_step
                g["lr"] = 0.3 * min(1.0, (i + 1) / 2)
            hopt.begin_step()
            opt.zero_grad()
            loss = hopt.train_loss(b)
            loss.backward()
            opt.step()
            hopt.end_step(b, loss)
    assert any("hyper-step skipped" in str(w.message) for w in caught)
    assert len(hopt.history) == 0 and hopt.loop.skipped == 1


def test_a_change_before_a_checkpoint_is_kept_by_the_resume():
    """A checkpoint between the change and the hyper-step: the resumed run skips that
    hyper-step as the uninterrupted one does, and the next windows are exact."""
    data = batches(6)
    model, hopt = build(hg.Unrolled(), inner_steps=3)

    def change(i):
        if i == 0:
            hopt.inner_optimizer.param_groups[0]["lr"] = 0.2

    _run(hopt, data[:2], after=change)
    saved = roundtrip({"model": model.state_dict(), "hopt": hopt.state_dict()})
    assert saved["hopt"]["window"]["changed"].startswith("the inner optimizer's 'lr'")
    rest = _run(hopt, data[2:])
    model2, hopt2 = build(hg.Unrolled(), inner_steps=3)
    model2.load_state_dict(saved["model"])
    hopt2.load_state_dict(saved["hopt"])
    rest2 = _run(hopt2, data[2:])
    assert rest == rest2 and sum("hyper-step skipped" in t for t in rest) == 1
    assert hopt.loop.skipped == hopt2.loop.skipped == 1
    assert len(hopt.history) == len(hopt2.history) == 1
    assert_same(model.state_dict(), model2.state_dict())
    assert_same(hopt.state_dict(), hopt2.state_dict())
    assert hopt2.history[-1].info.replay_error < 1e-12


def test_step_supersedes_an_unfinished_begin_step():
    """``begin_step()`` then ``step()``: the full step supersedes the announcement, so a later
    ``end_step()`` without its own ``begin_step()`` raises instead of counting a step that
    never happened (and replaying it in the window)."""
    model, hopt = build(hg.Unrolled(), inner_steps=3)
    b = batches(1)[0]
    hopt.begin_step()
    hopt.zero_grad()
    hopt.train_loss(b).backward()
    hopt.step(b)
    count, recorded = hopt.loop.count, len(hopt.loop.window)
    with pytest.raises(ValueError, match="end_step\\(\\) needs a begin_step\\(\\)"):
        hopt.end_step(b)
    assert (hopt.loop.count, len(hopt.loop.window)) == (count, recorded) == (1, 1)


@pytest.mark.parametrize("make", METHODS)
def test_a_scheduler_on_a_linked_lr_skips_the_hyper_step_it_would_falsify(make):
    # The lr linked to a hyperparameter, a scheduler stepped right after each hyper-step: the
    # window trained at the scheduler's rate while the replay steps with the hyperparameter's.
    # The replay error stayed under the skip threshold (7-10%) and the hypergradient (d/dlr
    # 6x, d/dlog-decay 2x that through the real run) was applied.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    decay = hg.Positive(torch.full(tuple(weights(model).shape), 1e-2, dtype=torch.float64))
    lr = hg.Positive(torch.tensor(0.3, dtype=torch.float64))
    hopt = hg.HyperOptimizer(
        model,
        {"decay": decay, "lr": lr},
        inner_optimizer=opt,
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.05),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=VAL,
        val_batch_size=16,
        method=make(),
        inner_steps=3,
        optimizer_hparams={"lr": "lr"},
    )
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.5)
    texts = _run(hopt, batches(9), after=lambda i: sched.step() if (i + 1) % 3 == 0 else None)
    skipped = [t for t in texts if "hyper-step skipped" in t]
    assert len(hopt.history) == 1 and hopt.loop.skipped == 2 and len(skipped) == 2
    assert "linked to (optimizer_hparams)" in skipped[0] and "learning-rate scheduler" in skipped[0]
    assert hopt.history[0].info.replay_error < 1e-12  # the first window was trained as replayed


def _lr_linked(model, opt):
    """A hyper-optimizer tuning only the learning rate, linked to the inner optimizer's."""
    return hg.HyperOptimizer(
        model,
        {"lr": hg.Positive(torch.tensor(0.05, dtype=torch.float64))},
        inner_optimizer=opt,
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.05),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=VAL,
        method=hg.Unrolled(),
        optimizer_hparams={"lr": "lr"},
    )


def test_linking_a_setting_the_groups_hold_apart_says_it_replaces_them():
    model = mlp()
    params = list(model.parameters())
    opt = torch.optim.SGD([{"params": params[:2], "lr": 0.1}, {"params": params[2:], "lr": 0.01}])
    with pytest.warns(hg.HypergradientWarning, match=r"groups' own values \[0\.1, 0\.01\]"):
        _lr_linked(model, opt)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.05], rel=1e-12)
    other = mlp()  # one group: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)
        _lr_linked(other, torch.optim.SGD(other.parameters(), lr=0.1))


@pytest.mark.parametrize("dropout", [0.5, 0.0])
def test_t1t2_skips_a_step_accumulated_over_random_forward_passes(dropout):
    # Two micro-batches, each through hopt.train_loss with its own dropout masks, then
    # step(concatenation): T1T2 replayed one pass over the whole batch with the last masks,
    # the hypergradient of a step not taken (1.39 relative error), silently. Without
    # dropout the same loop is exact and the hyper-step is taken.
    model, hopt = build(hg.T1T2(), model=mlp(dropout=dropout), inner_steps=1)
    decay0 = hopt.hparams["decay"].clone()
    b = batches(1, size=16)[0]
    halves = [(b[0][:8], b[1][:8]), (b[0][8:], b[1][8:])]
    hopt.zero_grad()
    for h in halves:
        (hopt.train_loss(h) / 2).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hopt.step(b)
    texts = [str(w.message) for w in caught if issubclass(w.category, hg.HypergradientWarning)]
    if dropout:
        assert hopt.loop.skipped == 1 and len(hopt.history) == 0
        assert any("accumulated over several train_loss calls" in t for t in texts)
        assert torch.equal(hopt.hparams["decay"], decay0)
    else:
        assert hopt.loop.skipped == 0 and len(hopt.history) == 1
    assert hopt.loop.drawn is False  # each step starts afresh
