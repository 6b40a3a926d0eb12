"""The lean hyper-step, second round: forward mode's tangents of a linear update.

For SGD with no tuned setting the update is linear in ``(params, state, gradient)``, so its
tangents are the update applied to the tangents (:func:`~hypergradient.methods.forward_mode.
linear_update`); that path must give what forward-mode AD of the update gives (to rounding),
what reverse mode gives, and central differences of the loop; every other optimizer keeps
forward-mode AD.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

import hypergradient as hg
from test_trajectory_modes import central_differences, loop, mlp_problem, rel

DT = torch.float64
FM = sys.modules["hypergradient.methods.forward_mode"]

SGDS = {
    "plain": {},
    "momentum": {"momentum": 0.9},
    "nesterov": {"momentum": 0.8, "nesterov": True},
    "damped-decayed": {"momentum": 0.7, "dampening": 0.3, "weight_decay": 1e-3},
}


def decay_problem(dtype=DT, dropout=0.0):
    """The MLP of test_trajectory_modes with its three decays as the only hyperparameters."""
    inner0, outer, params0, h = mlp_problem(dtype, dropout=dropout)

    def inner(p, hh):
        return inner0(p, {"decay": hh["decay"], "lr": h["lr"]})

    return inner, outer, params0, {"decay": h["decay"].clone()}


def _forward(inner, outer, params0, h, opt, steps=8, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, info = hg.forward_mode(inner, outer, params0, h, steps, opt, return_info=True, **kw)
    ours = [w for w in caught if issubclass(w.category, hg.HypergradientWarning)]
    return out, info, sorted(str(w.message) for w in ours)


@pytest.mark.parametrize("name", list(SGDS))
def test_the_linear_update_equals_forward_ad_reverse_mode_and_differences(name, monkeypatch):
    inner, outer, params0, h = decay_problem()
    opt = hg.optim.sgd(lr=0.3, **SGDS[name])
    fast, info, warned = _forward(inner, outer, params0, h, opt)
    rev = hg.unrolled(inner, outer, params0, h, 8, opt, hvp="double")
    monkeypatch.setattr(FM, "linear_update", lambda run: False)  # forward-mode AD instead
    ad, ad_info, ad_warned = _forward(inner, outer, params0, h, opt)
    monkeypatch.undo()
    assert rel(fast, ad) < 1e-13 and rel(fast, rev) < 1e-10
    assert warned == ad_warned
    assert info.as_dict() | {"seconds": 0} == ad_info.as_dict() | {"seconds": 0}
    fd = central_differences(lambda hh: loop(inner, outer, params0, hh, 8, opt, 0), h)
    assert rel(fast, fd) < 1e-6
    assert float(fast["decay"].abs().min()) > 0  # every entry moves: a test that can fail


def test_the_linear_update_from_a_recorded_state_and_in_float32():
    inner, outer, params0, h = decay_problem()
    opt = hg.optim.sgd(lr=0.3, momentum=0.9)
    keys = list(params0)
    p = [params0[k] for k in keys]
    state = [0.1 * torch.ones_like(x) for x in p]
    traj = hg.methods.Trajectory(
        lambda pp, hh, b: inner(pp, hh), params0, opt, [None] * 5, state0=state, step0=3
    )
    problem = hg.Problem(lambda pp, hh: inner(pp, hh), outer, params0, h, trajectory=traj)
    got, _ = hg.ForwardMode()(problem)
    rev, _ = hg.Unrolled()(problem)
    assert rel(got, rev) < 1e-10
    inner32, outer32, p32, h32 = decay_problem(torch.float32)
    got32 = hg.forward_mode(inner32, outer32, p32, h32, 5, opt)
    ref = hg.forward_mode(inner, outer, params0, h, 5, opt)
    assert got32["decay"].dtype == torch.float32 and rel(got32, ref) < 1e-4


@pytest.mark.parametrize(
    "make,linear",
    [
        (lambda h: hg.optim.sgd(lr=0.3, momentum=0.9), True),
        (lambda h: hg.optim.sgd(lr=h["lr"], momentum=0.9), False),  # a tuned setting
        (lambda h: hg.optim.adam(lr=0.05), False),  # not linear in the gradient
    ],
    ids=["sgd", "tuned-lr", "adam"],
)
def test_only_sgd_without_tuned_settings_takes_the_linear_path(make, linear, monkeypatch):
    inner, outer, params0, h = mlp_problem()
    seen = []
    real = FM.linear_update
    monkeypatch.setattr(FM, "linear_update", lambda run: seen.append(real(run)) or seen[-1])
    opt = make(h)
    fwd = hg.forward_mode(inner, outer, params0, h, 6, opt)
    rev = hg.unrolled(inner, outer, params0, h, 6, opt, hvp="double")
    assert seen == [linear] and rel(fwd, rev) < 1e-10


def test_the_linear_update_under_dropout_uses_each_steps_masks():
    inner, outer, params0, h = decay_problem(dropout=0.3)
    opt = hg.optim.sgd(lr=0.3, momentum=0.5)
    torch.manual_seed(3)
    rev = hg.unrolled(inner, outer, params0, h, 6, opt, hvp="double")
    torch.manual_seed(3)
    fwd = hg.forward_mode(inner, outer, params0, h, 6, opt)
    torch.manual_seed(4)
    other = hg.forward_mode(inner, outer, params0, h, 6, opt)
    assert rel(fwd, rev) < 1e-10
    assert rel(other, rev) > 1e-6  # other masks, another hypergradient: the test can fail
