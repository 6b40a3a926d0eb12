"""One method object shared by two hyper-optimizers.

A method keeps state across hyper-steps (HOAG's step count and warm start, a solver's
generator and step estimate, a Nystrom sketch). Two hyper-optimizers stepping in turn with
one object each started from the other's state, silently: with ``IFT(NystromPCG(rank=3))``
the hyperparameters of such a run ended 0.71 times their own run's move away from it
(HOAG: 0.022). The second one's hyper-step is now refused before anything changes. A run
that starts after another (the trials of a study) is not refused: nothing says the first
will not step again (``docs/which-method.md`` tells to build one method per run).
"""

from __future__ import annotations

import copy

import pytest
import torch

import hypergradient as hg
from test_hyperoptimizer_support import assert_same, batches, build, everything, run

STATEFUL = {
    "HOAG": lambda: hg.HOAG(damping=1.0),
    "IFT": hg.IFT,  # Neumann: its step estimate and generator
    "NystromPCG": lambda: hg.IFT(hg.NystromPCG(rank=3, maxiter=5)),
}
STATELESS = {
    "T1T2": hg.T1T2,
    "Unrolled": hg.Unrolled,
    "Implicit(CG)": lambda: hg.Implicit(hg.CG(maxiter=5), damping=1.0),
}


@pytest.mark.parametrize("name", list(STATEFUL))
def test_two_hyper_optimizers_in_turn_with_one_stateful_method_are_refused(name):
    method = STATEFUL[name]()
    model_a, a = build(method)
    _, b = build(method)
    steps = batches(6)
    run(a, steps[:3])  # a's hyper-step
    run(b, steps[:3])  # b's, from a's state
    run(a, steps[3:5])
    a.zero_grad()
    a.train_loss(steps[5]).backward()
    before = everything(model_a, a)
    with pytest.raises(ValueError, match="used by another HyperOptimizer since this one's last"):
        a.step(steps[5])
    assert_same(before, everything(model_a, a))  # nothing changed
    with pytest.raises(ValueError, match=r"own method object .*copy\.deepcopy\(method\)"):
        a.step(steps[5])  # still: b used it last


@pytest.mark.parametrize("name", list(STATELESS))
def test_a_stateless_method_shared_in_turn_is_the_same_as_two(name):
    """No state carried, nothing refused: each run is bit for bit its own."""
    shared = STATELESS[name]()
    runs = [build(shared), build(shared), build(STATELESS[name]()), build(STATELESS[name]())]
    for batch in batches(6):
        for _, hopt in runs:
            run(hopt, [batch])
    assert runs[0][1].hyper_steps == 2
    assert_same(everything(*runs[0]), everything(*runs[2]))
    assert_same(everything(*runs[1]), everything(*runs[3]))


def test_a_run_after_another_is_not_refused_but_the_first_then_is():
    method = STATEFUL["HOAG"]()
    _, a = build(method)
    run(a, batches(3))
    _, b = build(method)
    run(b, batches(6))  # the next trial of a study: documented, not refused
    with pytest.raises(ValueError, match=r"\(HOAG\) was used by another.*\(k, x\)"):
        run(a, batches(3))


def test_a_copy_of_a_hyper_optimizer_has_its_own_method():
    model, hopt = build(STATEFUL["NystromPCG"]())
    run(hopt, batches(4))
    model2, hopt2 = copy.deepcopy((model, hopt))
    steps = batches(6, seed=3)
    for batch in steps:
        rng = torch.get_rng_state()
        run(hopt, [batch])
        torch.set_rng_state(rng)
        run(hopt2, [batch])
    assert hopt.hyper_steps == 3
    assert_same(everything(model, hopt), everything(model2, hopt2))


def test_a_method_that_refuses_the_stamp_runs_unchecked():
    """A user's method class that cannot carry the stamp (``__slots__``, a guarded
    ``__setattr__``) still takes its hyper-steps, unchecked, with the same numbers."""

    class Guarded(hg.HOAG):
        def __setattr__(self, name, value):
            if name == "_hyperoptimizer":
                raise AttributeError(name)
            super().__setattr__(name, value)

    (ma, guarded), (mb, plain) = build(Guarded(damping=1.0)), build(hg.HOAG(damping=1.0))
    for hopt in (guarded, plain):
        run(hopt, batches(6))
    assert not hasattr(guarded.method, "_hyperoptimizer")
    assert hasattr(plain.method, "_hyperoptimizer")
    assert len(guarded.history) == len(plain.history) == 2
    for key, value in guarded.history[-1].hypergrad.items():
        assert torch.equal(value, plain.history[-1].hypergrad[key])
    for p, q in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(p, q)
