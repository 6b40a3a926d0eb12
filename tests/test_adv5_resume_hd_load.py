"""SGDHD/AdamHD.load_state_dict checks the saved groups as the constructor checks its
arguments: a state of another optimizer failed later at ``step()`` with a KeyError, and a
NaN ``lr`` or negative ``hypergrad_lr`` loaded silently. A negative ``lr`` (which
hypergradient descent itself can reach: it is not clipped) still round-trips."""

from __future__ import annotations

import pytest
import torch

from hypergradient.optim.hd import SGDHD, AdamHD


def _stepped(cls, **kw):
    p = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = cls([p], lr=0.1, **kw)
    (p**2).sum().backward()
    opt.step()
    return opt


def _fresh(cls):
    return cls([torch.ones(3, dtype=torch.float64, requires_grad=True)], lr=0.3)


@pytest.mark.parametrize(
    ("cls", "key", "value", "match"),
    [
        (SGDHD, "hypergrad_lr", -1.0, "hypergrad_lr"),
        (SGDHD, "lr", float("nan"), "lr"),
        (SGDHD, "momentum", True, "momentum"),
        (SGDHD, "nesterov", 1, "nesterov"),
        (AdamHD, "betas", (0.9, 1.0), "betas"),
        (AdamHD, "eps", -1e-8, "eps"),
    ],
)
def test_bad_saved_settings_are_refused_and_nothing_loads(cls, key, value, match):
    state = _stepped(cls).state_dict()
    state["param_groups"][0][key] = value
    opt = _fresh(cls)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == 0.3 and not opt.state


@pytest.mark.parametrize(("src", "dst"), [(AdamHD, SGDHD), (SGDHD, AdamHD)])
def test_a_state_of_the_other_optimizer_is_refused_naming_the_missing_settings(src, dst):
    opt = _fresh(dst)
    with pytest.raises(ValueError, match="another optimizer"):
        opt.load_state_dict(_stepped(src).state_dict())
    assert opt.param_groups[0]["lr"] == 0.3 and not opt.state


@pytest.mark.parametrize("cls", [SGDHD, AdamHD])
def test_a_negative_adapted_lr_and_an_old_state_without_maximize_round_trip(cls):
    opt = _stepped(cls)
    opt.param_groups[0]["lr"] = -0.25
    state = opt.state_dict()
    del state["param_groups"][0]["maximize"]
    new = _fresh(cls)
    new.load_state_dict(state)
    assert new.param_groups[0]["lr"] == -0.25 and new.param_groups[0]["maximize"] is False
    key = "prev_direction"
    assert torch.equal(
        new.state[new.param_groups[0]["params"][0]][key],
        opt.state[opt.param_groups[0]["params"][0]][key],
    )
