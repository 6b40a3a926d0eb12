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
from test_hyperoptimizer_support import batches, build

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
