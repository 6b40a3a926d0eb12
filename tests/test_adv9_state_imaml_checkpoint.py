"""iMAML checkpoints its solver's state, which carries over between meta-steps.

With a ``NystromPCG`` that reuses its sketch (``refresh_every``), or a Neumann series that
reuses its step size, iMAML's meta-gradients under a fixed budget depend on what earlier
meta-steps left in the solver; ``IMAML`` had no ``state_dict``, so a
resumed meta-training run started from a fresh solver and its meta-gradients differed
from the uninterrupted run's (the architecture page says every object with state across
calls has ``state_dict`` / ``load_state_dict``). It now saves and restores it, through
``torch.load(weights_only=True)``, bit for bit."""

from __future__ import annotations

import io

import pytest
import torch

import hypergradient as hg

DT = torch.float64


def _task(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 1, generator=g, dtype=DT)
    xs, xq = torch.randn(10, 3, generator=g, dtype=DT), torch.randn(10, 3, generator=g, dtype=DT)
    return (xs, xs @ w), (xq, xq @ w)


def _learner():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    model = model.double()
    # a fixed budget: the cached sketch (the preconditioner) changes the answer
    solver = hg.NystromPCG(rank=3, maxiter=2, seed=0, refresh_every=10)
    learner = hg.meta.IMAML(model, lam=1.0, inner_steps=3, inner_lr=0.1, solver=solver)
    return learner, hg.meta.parameters_of(model, copy=True)


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _steps(learner, params, seeds):
    return [learner.step(params, [_task(s), _task(s + 50)])[0] for s in seeds]


def test_a_resumed_imaml_run_continues_bit_for_bit():
    learner, params = _learner()
    _steps(learner, params, [0, 1])
    state = _roundtrip(learner.state_dict())
    original = _steps(learner, params, [5, 6, 7])

    resumed, _ = _learner()
    resumed.load_state_dict(state)
    again = _steps(resumed, params, [5, 6, 7])
    assert all(torch.equal(a[k], b[k]) for a, b in zip(original, again) for k in a)

    fresh, _ = _learner()  # the control: without the state the run is another one
    other = _steps(fresh, params, [5, 6, 7])
    assert not all(torch.equal(a[k], b[k]) for a, b in zip(original, other) for k in a)


def test_a_checkpoint_of_another_solver_is_refused_and_changes_nothing():
    learner, params = _learner()
    _steps(learner, params, [0, 1])
    before = _roundtrip(learner.state_dict())
    model = torch.nn.Linear(3, 1).double()
    other = hg.meta.IMAML(model, lam=1.0, inner_steps=2, inner_lr=0.1, solver=hg.RecycledCG())
    with pytest.raises(ValueError, match="NystromPCG"):
        learner.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="IMAML.load_state_dict"):
        learner.load_state_dict({"U": None})
    after = learner.state_dict()
    assert after["solver"].keys() == before["solver"].keys()
    for key, value in before["solver"].items():
        now = after["solver"][key]
        assert torch.equal(value, now) if isinstance(value, torch.Tensor) else value == now
