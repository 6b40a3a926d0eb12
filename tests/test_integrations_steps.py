"""Inner steps taken by someone else (a Lightning ``Trainer``): ``hopt.begin_step()`` before
the step's forward pass, the caller's own ``optimizer.step()``, ``hopt.end_step(batch)``.

The reference is ``hopt.step(batch)``: a run driven through ``begin_step``/``end_step`` is
bit-for-bit the same run (weights, hyperparameters, optimizers, samplers, window, history,
random-number state), for an implicit method, for T1T2 (which differentiates the last inner
step from the parameters before it) and for a trajectory method replaying dropout."""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg
from test_hyperoptimizer_support import assert_same, batches, build, everything, mlp, run

METHODS = {
    "ift": lambda: None,
    "t1t2": lambda: hg.T1T2(),
    "unrolled": lambda: hg.Unrolled(),
}


def external(hopt, steps):
    """The loop of a framework that owns the optimizer step (and hands the step's loss to
    the divergence watch, as ``hopt.train_loss`` does for ``step``)."""
    for batch in steps:
        hopt.begin_step()
        hopt.inner_optimizer.zero_grad()
        loss = hopt.train_loss_fn(hopt.view.loop_model(), hopt.hparams, batch)
        loss.backward()
        hopt.inner_optimizer.step()
        hopt.end_step(batch, loss=loss)


@pytest.mark.parametrize("method", list(METHODS))
def test_begin_end_is_the_same_run_as_step(method):
    steps = batches(8)
    model_a, hopt_a = build(METHODS[method](), model=mlp(dropout=0.3, seed=1))
    torch.manual_seed(3)
    run(hopt_a, steps)
    model_b, hopt_b = build(METHODS[method](), model=mlp(dropout=0.3, seed=1))
    torch.manual_seed(3)
    external(hopt_b, steps)
    assert hopt_a.hyper_steps == hopt_b.hyper_steps == 2
    assert_same(everything(model_a, hopt_a), everything(model_b, hopt_b))


def test_end_without_begin_raises_and_begin_again_replaces():
    _, hopt = build()
    with pytest.raises(ValueError, match="begin_step"):
        hopt.end_step(batches(1)[0])
    model_a, hopt_a = build()
    run(hopt_a, batches(3))
    model_b, hopt_b = build()
    hopt_b.begin_step()  # a step that did not happen (gradient accumulation)
    external(hopt_b, batches(3))
    assert_same(everything(model_a, hopt_a), everything(model_b, hopt_b))
    with pytest.raises(ValueError, match="begin_step"):
        hopt_b.end_step(batches(1)[0])  # begun once, ended once


def test_a_failed_hyper_step_is_undone_but_the_outside_step_stands():
    class Boom(Exception):
        pass

    class FailOnce(hg.Method):
        name = "fail-once"
        needs_trajectory = True

        def __init__(self):
            self.inner, self.fired = hg.Unrolled(), False

        def __call__(self, problem):
            if not self.fired:
                self.fired = True
                raise Boom
            return self.inner(problem)

    model, hopt = build(FailOnce())
    steps = batches(6)
    external(hopt, steps[:2])
    raw = hopt.raw_hparams()[0].detach().clone()
    drawn = hopt.val_sampler.generator.get_state()
    with pytest.raises(Boom):
        external(hopt, steps[2:3])
    weights = model[0].weight.detach().clone()
    assert torch.equal(hopt.raw_hparams()[0], raw) and hopt.hyper_steps == 0
    assert torch.equal(hopt.val_sampler.generator.get_state(), drawn)
    assert hopt.state_dict()["counters"]["count"] == 3 and hopt.loop.window is None
    external(hopt, steps[3:6])  # a fresh window of 3 steps, then the next hyper-step
    assert hopt.hyper_steps == 1 and not torch.equal(model[0].weight, weights)
    assert hopt.history[-1].step == 6


def test_end_step_needs_the_batch_where_a_replay_does():
    _, hopt = build(hg.Unrolled())
    hopt.begin_step()
    with pytest.raises(ValueError, match="batch"):
        hopt.end_step()
