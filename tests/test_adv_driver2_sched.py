"""A learning-rate scheduler stepped between the optimizer's step and ``end_step()``: the
hyper-step differentiates the step taken, with the learning rate it used.

Lightning steps ``interval="step"`` schedulers (and, on an epoch's last batch,
``interval="epoch"`` ones) before ``on_train_batch_end``, where the callback calls
``end_step``; a hand-written loop may do the same. The hyper-step used to read the
scheduler's *next* rate: with ``StepLR(step_size=3, gamma=0.1)`` and a hyper-step every 3
steps, T1T2's hypergradient was 10x too small and IFT's default Neumann 85% off.
Reference: the same run without the scheduler (identical up to the hyper-step).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg
from test_hyperoptimizer_support import DT, Recording, batches, build, train_loss

METHODS = {"T1T2": hg.T1T2, "IFT": lambda: hg.IFT(damping=0.1)}


def _first_hypergrad(method, schedule):
    model, hopt = build(method(), outer_lr=0.0, inner_steps=3)
    sched = torch.optim.lr_scheduler.StepLR(hopt.inner_optimizer, step_size=3, gamma=0.1)
    for b in batches(3):
        hopt.begin_step()
        hopt.zero_grad()
        hopt.train_loss(b).backward()
        hopt.inner_optimizer.step()
        if schedule:
            sched.step()  # before end_step, as Lightning does
        hopt.end_step(b)
    assert hopt.hyper_steps == 1
    assert hopt.inner_optimizer.param_groups[0]["lr"] == pytest.approx(0.03 if schedule else 0.3)
    return hopt.history[0].hypergrad["decay"]


@pytest.mark.parametrize("method", list(METHODS))
def test_scheduler_before_end_step(method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        ref = _first_hypergrad(METHODS[method], schedule=False)
        got = _first_hypergrad(METHODS[method], schedule=True)
    assert ref.abs().max() > 0
    assert torch.equal(got, ref)


def _halved_last_step(abandoned_begin):
    model, hopt = build(hg.T1T2(), outer_lr=0.0, inner_steps=3)
    for i, b in enumerate(batches(3)):
        if i == 2:
            if abandoned_begin:
                hopt.begin_step()  # abandoned: the step below is step()'s own
            hopt.inner_optimizer.param_groups[0]["lr"] = 0.15
        hopt.zero_grad()
        hopt.train_loss(b).backward()
        hopt.step(b)
    return hopt.history[0].hypergrad["decay"]


def test_step_uses_the_current_rate_after_an_abandoned_begin_step():
    """``step()`` after an unfinished ``begin_step()`` takes the step itself, at the rates
    of that moment (not those begin_step saw)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        ref = _halved_last_step(abandoned_begin=False)
        got = _halved_last_step(abandoned_begin=True)
        full = _first_hypergrad(hg.T1T2, schedule=False)
    assert torch.equal(got, ref) and not torch.equal(ref, full)


def _warmup_run(method, hopt_from_step):
    """LambdaLR warm-up from lr=0 (the first step moves nothing), a hyper-step every step
    from step ``hopt_from_step`` (earlier steps taken by the bare optimizer)."""
    model = build(method(), outer_lr=0.0)[0]  # the same initial weights as below
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / 3))
    hopt = None
    for i, b in enumerate(batches(4)):
        if i == hopt_from_step:
            hopt = build(method(), model=model, inner_steps=1, outer_lr=0.05)[1]
            hopt.inner_optimizer = opt  # the loop's optimizer (same parameters)
        if hopt is None:
            opt.zero_grad()
            train_loss(model, {"decay": torch.full((4, 6), 1e-2, dtype=DT)}, b).backward()
            opt.step()
        else:
            hopt.zero_grad()
            hopt.train_loss(b).backward()
            hopt.step(b)
        sched.step()
    return hopt


@pytest.mark.parametrize("method", list(METHODS))
def test_warmup_from_zero(method):
    """A step at lr=0 (the first of a linear warm-up) used to end training with
    "`lr` must be a number > 0" (T1T2, IFT's default Neumann); its hyper-step is skipped
    with a warning, and the later ones are those of a run whose hyper-optimizer starts
    after that step."""
    make = {"T1T2": hg.T1T2, "IFT": lambda: hg.IFT(seed=0)}[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        ref = _warmup_run(make, hopt_from_step=1)
    with pytest.warns(hg.HypergradientWarning, match="learning rate 0"):
        got = _warmup_run(make, hopt_from_step=0)
    assert (got.hyper_steps, got.skipped) == (3, 1) and ref.hyper_steps == 3
    for a, b in zip(got.history, ref.history):
        assert torch.equal(a.hypergrad["decay"], b.hypergrad["decay"])
    assert torch.equal(got.raw_hparams()[0], ref.raw_hparams()[0])


def test_ift_default_with_a_frozen_group_at_lr_zero():
    """A param group frozen by ``lr=0`` (the second layer) next to a trained one: IFT's
    default Neumann series steps with the smallest *positive* rate (it got 0 and every
    hyper-step raised). Reference: the same method called on the recorded problem with
    that rate."""
    recording = Recording(hg.IFT(seed=0))
    model, hopt = build(recording, inner_steps=3, outer_lr=0.0)
    groups = hopt.inner_optimizer.param_groups
    first, second = list(model[0].parameters()), list(model[3].parameters())
    groups[0]["params"] = first
    hopt.inner_optimizer.add_param_group({"params": second, "lr": 0.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        for b in batches(3):
            hopt.zero_grad()
            hopt.train_loss(b).backward()
            hopt.step(b)
        assert hopt.hyper_steps == 1
        problem = recording.problems[0]
        assert problem.lr == 0.3
        expected, _ = hg.IFT(seed=0)(problem)
    assert torch.equal(hopt.history[0].hypergrad["decay"], expected["decay"])
