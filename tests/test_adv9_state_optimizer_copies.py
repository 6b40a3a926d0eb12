"""A hyper-optimizer's checkpoint in memory is a snapshot, and one loaded from it shares no
buffer with anything.

``torch.optim.Optimizer.state_dict()`` holds the live momentum and Adam buffers, and its
``load_state_dict`` keeps the given tensors as the live ones. ``hopt.state_dict()`` passed
them on: a checkpoint kept in memory while the run went on held the hyperparameters of its
step with the optimizers' buffers of later steps, and ``h1.load_state_dict(h0.state_dict())``
(forking a run, evaluating a copy) made ``h1`` step ``h0``'s buffers in place: both runs
then trained on a mixed momentum, silently. Both are now copies."""

from __future__ import annotations

import copy

import pytest
import torch

import hypergradient as hg
from test_hyperoptimizer_support import assert_same, batches, build, everything, run

METHODS = {
    "IFT": lambda: hg.IFT(hg.CG(maxiter=5), damping=1.0),
    "Unrolled": hg.Unrolled,
}


def _resumed(make, weights, state, steps):
    """A fresh hyper-optimizer loaded from ``state``, run over ``steps`` alone."""
    model, hopt = build(make())
    model.load_state_dict(copy.deepcopy(weights))
    hopt.load_state_dict(state)
    run(hopt, steps)
    return everything(model, hopt)


@pytest.mark.parametrize("name", list(METHODS))
def test_a_checkpoint_in_memory_is_not_changed_by_the_run_going_on(name):
    model, hopt = build(METHODS[name]())
    run(hopt, batches(4))
    state = hopt.state_dict()
    frozen = copy.deepcopy(state)
    run(hopt, batches(5, seed=4))
    assert_same(frozen, state)  # momentum and Adam's moments included


@pytest.mark.parametrize("name", list(METHODS))
def test_two_hyper_optimizers_loaded_from_one_checkpoint_run_independently(name):
    make = METHODS[name]
    model, source = build(make())
    run(source, batches(4))
    weights = copy.deepcopy(model.state_dict())
    state = source.state_dict()
    rest = batches(6, seed=7)
    alone = _resumed(make, weights, copy.deepcopy(state), rest)  # the reference

    # the source, and two more loaded from the same dict, all trained on: each must be
    # the reference run (bit for bit), not a run on momentum the others moved too
    m1, h1 = build(make())
    m1.load_state_dict(copy.deepcopy(weights))
    h1.load_state_dict(state)
    m2, h2 = build(make())
    m2.load_state_dict(copy.deepcopy(weights))
    h2.load_state_dict(state)
    buffers = [
        opt.state[p][key]
        for h in (source, h1, h2)
        for opt in (h.inner_optimizer, h.outer_optimizer)
        for p in opt.state
        for key in opt.state[p]
        if isinstance(opt.state[p][key], torch.Tensor) and opt.state[p][key].dim() > 0
    ]
    assert len({b.data_ptr() for b in buffers}) == len(buffers)
    for m, h in ((m1, h1), (m2, h2)):
        torch.set_rng_state(state["rng"][0])  # as the load left it
        run(h, rest)
        assert_same(alone, everything(m, h))
