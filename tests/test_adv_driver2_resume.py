"""Loading a checkpoint into a hyper-optimizer that has ``train_data`` when the checkpoint
was saved without it: the train sampler starts afresh (as a new hyper-optimizer's) and the
load warns that the saving run had no such sampler to continue.

It used to keep the live sampler's position, so the resumed run depended on what the
hyper-optimizer had done before the load: two hyper-optimizers loading the same checkpoint
drew different training batches at their hyper-steps (hyperparameters 4e-2 apart after two
hyper-steps), and neither was the fresh one's run.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import hypergradient as hg
from test_hyperoptimizer_support import TRAIN, VAL, assert_same, batches, build, everything, run


def _checkpoint_without_train_data():
    model, hopt = build()
    run(hopt, batches(6))
    ck = copy.deepcopy(hopt.state_dict())
    assert ck["train_sampler"] is None
    return copy.deepcopy(model.state_dict()), ck


def _resumed(weights, ck, used_before):
    """A hyper-optimizer with train_data, used for ``used_before`` steps (its hyper-step
    draws a training batch), then loaded from ``ck`` and run 6 steps without batches."""
    model, hopt = build(train_data=TRAIN, train_batch_size=8)
    step_batch = batches(1, seed=5)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)  # CG's maxiter
        for _ in range(used_before):
            hopt.zero_grad()
            hopt.train_loss(step_batch).backward()
            hopt.step()
        assert hopt.train_sampler.drawn == used_before // 3
        model.load_state_dict(copy.deepcopy(weights))
        with pytest.warns(hg.HypergradientWarning, match="no `train_data` sampler state"):
            hopt.load_state_dict(copy.deepcopy(ck))
        hopt.zero_grad()
        loaded = everything(model, hopt)
        for _ in range(6):
            hopt.zero_grad()
            hopt.train_loss(step_batch).backward()
            hopt.step()
    assert hopt.hyper_steps == 4 and hopt.train_sampler.drawn == 2
    return loaded, everything(model, hopt)


def test_checkpoint_without_train_data_starts_the_train_sampler_afresh():
    weights, ck = _checkpoint_without_train_data()
    fresh_loaded, fresh = _resumed(weights, ck, used_before=0)
    used_loaded, used = _resumed(weights, ck, used_before=3)
    assert_same(fresh_loaded, used_loaded)
    assert_same(fresh, used)  # bit for bit: the load does not depend on the earlier use


def test_checkpoint_with_train_data_needs_no_warning_and_resumes_exactly():
    model, hopt = build(train_data=TRAIN, train_batch_size=8)
    step_batch = batches(1, seed=5)[0]

    def steps(h, k):
        for _ in range(k):
            h.zero_grad()
            h.train_loss(step_batch).backward()
            h.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        steps(hopt, 4)
        ck, weights = copy.deepcopy(hopt.state_dict()), copy.deepcopy(model.state_dict())
        steps(hopt, 5)
        model2, hopt2 = build(train_data=TRAIN, train_batch_size=8)
        steps(hopt2, 2)
        model2.load_state_dict(weights)
        with warnings.catch_warnings():
            warnings.simplefilter("error", hg.HypergradientWarning)
            hopt2.load_state_dict(ck)
        steps(hopt2, 5)
    assert hopt.train_sampler.drawn == 3
    assert_same(everything(model, hopt), everything(model2, hopt2))
    assert torch.equal(hopt.raw_hparams()[0], hopt2.raw_hparams()[0])


def test_under_warnings_as_errors_the_refused_load_changes_nothing():
    """The warning comes before anything is assigned: with warnings turned into errors
    (a test suite's filterwarnings=error), the load raises and the hyper-optimizer is as it
    was (it used to warn halfway through the assignment: method, hyperparameters and
    optimizers loaded, counters and samplers not)."""
    weights, ck = _checkpoint_without_train_data()
    model, hopt = build(train_data=TRAIN, train_batch_size=8)
    step_batch = batches(1, seed=5)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        for _ in range(3):
            hopt.zero_grad()
            hopt.train_loss(step_batch).backward()
            hopt.step()
    hopt.zero_grad()
    before = everything(model, hopt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)
        with pytest.raises(hg.HypergradientWarning, match="no `train_data` sampler state"):
            hopt.load_state_dict(copy.deepcopy(ck))
    assert_same(before, everything(model, hopt))


def _resumed_with_holdout(weights, ck, used_before):
    model, hopt = build(holdout_data=VAL, holdout_batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)  # CG's maxiter
        run(hopt, batches(used_before, seed=5))  # its guard draws holdout batches
        model.load_state_dict(copy.deepcopy(weights))
        hopt.load_state_dict(copy.deepcopy(ck))
        hopt.zero_grad()
        loaded = everything(model, hopt)
        run(hopt, batches(6, seed=6))
    losses = [r.holdout_loss for r in hopt.history][-2:]
    return loaded, everything(model, hopt), losses


def test_checkpoint_without_holdout_starts_the_holdout_sampler_afresh():
    """The guard of a checkpoint saved without holdout data starts fresh: its sampler too
    (it kept the position of the guard's earlier draws, so the holdout batches, scores,
    best values of the resumed run depended on what ran before the load)."""
    weights, ck = _checkpoint_without_train_data()
    assert ck["holdout"] is None
    fresh_loaded, fresh, fresh_losses = _resumed_with_holdout(weights, ck, used_before=0)
    used_loaded, used, used_losses = _resumed_with_holdout(weights, ck, used_before=3)
    assert_same(fresh_loaded, used_loaded)
    assert_same(fresh, used)
    assert fresh_losses == used_losses and all(math.isfinite(v) for v in fresh_losses)
