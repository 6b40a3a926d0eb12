"""A hyper-step that raises (anything, KeyboardInterrupt included) is undone entirely
(defect family 8): continuing after the failed call is bit-for-bit the run in which that
call never happened. Faults are injected through the constructor (method, outer
optimizer, logger), never by patching the hyper-optimizer."""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg
from test_hyperoptimizer_support import (
    DT,
    assert_same,
    batches,
    build,
    everything,
    mlp,
)


class Boom(Exception):
    pass


class Faults:
    """Raises ``error`` once, at the ``at``-th call of whichever injected piece asks."""

    def __init__(self, at, error):
        self.at, self.error, self.calls, self.fired = at, error, 0, False

    def tick(self):
        self.calls += 1
        if self.calls == self.at and not self.fired:
            self.fired = True
            raise self.error("injected")


class FailingMethod(hg.Method):
    """Runs ``method`` (so its state, the RNG and the samplers have moved), then raises."""

    def __init__(self, method, faults):
        self.method, self._faults = method, faults
        self.name = method.name
        self.needs_trajectory = method.needs_trajectory
        self.tunes_optimizer = method.tunes_optimizer

    def __call__(self, problem):
        out = self.method(problem)
        problem.outer_loss(problem.params, problem.hparams)  # draws dropout masks
        if self._faults is not None:
            self._faults.tick()
        return out

    def state_dict(self):
        return self.method.state_dict()

    def load_state_dict(self, state):
        self.method.load_state_dict(state)


def failing_adam(faults):
    class FailingAdam(torch.optim.Adam):
        def step(self, closure=None):
            out = super().step(closure)  # the raw hyperparameters and Adam's state moved
            if faults is not None:
                faults.tick()
            return out

    return lambda hp: FailingAdam(hp, lr=0.05)


def failing_logger(faults):
    def log(record):
        if faults is not None:
            faults.tick()

    return log


METHODS = {
    "hoag": lambda: hg.HOAG(maxiter=5, damping=1.0),  # state: warm start and counter
    "unrolled": lambda: hg.Unrolled(),  # a window of batches and RNG states
}


def _run(method, where, faults, steps):
    model = mlp(dropout=0.2, batchnorm=True, seed=1)
    kw = {
        "method": FailingMethod(METHODS[method](), faults if where == "method" else None),
        "outer_optimizer": failing_adam(faults if where == "outer optimizer" else None),
        "logger": failing_logger(faults if where == "logger" else None),
    }
    model, hopt = build(model=model, **kw)
    torch.manual_seed(5)
    failures = 0
    for batch in steps:
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        try:
            hopt.step(batch)
        except (Boom, KeyboardInterrupt):
            failures += 1
            hopt.step(batch)  # the same call again: as if the failed one never happened
    return model, hopt, failures


CASES = [
    ("hoag", "method", Boom),
    ("hoag", "outer optimizer", KeyboardInterrupt),
    ("hoag", "logger", Boom),
    ("unrolled", "method", KeyboardInterrupt),
    ("unrolled", "outer optimizer", Boom),
    ("unrolled", "logger", KeyboardInterrupt),
]


# The trajectory engine does not replay the recorded RNG states yet (the methods' part of
# issue 10), so Unrolled warns under dropout; the rollback is what is checked here.
@pytest.mark.filterwarnings("ignore:The differentiable replay:UserWarning")
@pytest.mark.parametrize(
    "method, where, error", CASES, ids=[f"{m}-{w}-{e.__name__}" for m, w, e in CASES]
)
def test_a_failed_hyper_step_leaves_no_trace(method, where, error):
    steps = batches(9)
    model_a, hopt_a, failures = _run(method, where, Faults(2, error), steps)
    assert failures == 1
    model_b, hopt_b, failures = _run(method, where, None, steps)
    assert failures == 0
    assert hopt_a.hyper_steps == hopt_b.hyper_steps == 3
    assert_same(everything(model_a, hopt_a), everything(model_b, hopt_b))


def test_the_state_right_after_the_failed_call_is_the_state_before_it():
    faults = Faults(1, Boom)
    model, hopt = build(
        FailingMethod(hg.HOAG(maxiter=5, damping=1.0), faults),
        model=mlp(dropout=0.2, batchnorm=True, seed=1),
    )
    steps = batches(3)
    for batch in steps[:2]:
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        hopt.step(batch)
    hopt.zero_grad()
    hopt.train_loss(steps[2]).backward()
    before = everything(model, hopt)
    with pytest.raises(Boom):
        hopt.step(steps[2])
    assert_same(before, everything(model, hopt))


def test_nonfinite_skip_keeps_the_inner_step_and_undoes_the_hyper_step():
    """``nonfinite="skip"``: the inner step stands, the hyper-step leaves no trace but its
    draw (the next hyper-step takes the next validation batch: drawn again, a batch holding
    a NaN made every later hyper-step skip)."""

    class NaNOnce(hg.Method):
        name = "nan-once"

        def __init__(self):
            self.inner, self.calls = hg.T1T2(), 0

        def __call__(self, problem):
            self.calls += 1
            hyper, info = self.inner(problem)
            if self.calls == 1:
                hyper = {k: v * torch.nan for k, v in hyper.items()}
            return hyper, info

    def make(method):
        return build(method, nonfinite="skip", inner_steps=2, val_batch_size=8)

    model, hopt = make(NaNOnce())
    steps = batches(4)
    raw = [r.detach().clone() for r in hopt.raw_hparams()]
    drawn = hopt.val_sampler.generator.get_state()
    with pytest.warns(hg.HypergradientWarning, match="skipped.*not finite"):
        for batch in steps[:2]:
            hopt.zero_grad()
            hopt.train_loss(batch).backward()
            hopt.step(batch)
    assert hopt.skipped == 1 and hopt.hyper_steps == 0 and len(hopt.history) == 0
    assert torch.equal(hopt.raw_hparams()[0], raw[0])
    assert not torch.equal(hopt.val_sampler.generator.get_state(), drawn)
    assert hopt.val_sampler.drawn == 1  # the skipped hyper-step's draw stands
    assert hopt.state_dict()["counters"]["count"] == 2  # the inner steps stand
    # and a plain inner step is what happened to the weights
    ref_model, ref = make(hg.T1T2())
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.3, momentum=0.9)
    for batch in steps[:2]:
        ref.zero_grad()
        from test_hyperoptimizer_support import train_loss

        train_loss(ref_model, {"decay": torch.full((4, 6), 1e-2, dtype=DT)}, batch).backward()
        ref.step()
    assert_same(ref_model.state_dict(), model.state_dict())
