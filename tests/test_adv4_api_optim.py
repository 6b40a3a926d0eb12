"""``hg.optim.from_torch`` takes an iterator of parameters without losing the state.

It checked ``params`` against the optimizer with a loop that spent a generator, then read
the buffers of no parameter at all: ``from_torch(sgd_momentum, (p for p in ps))`` returned
``state=None, step=0`` (the momentum buffers and Adam's moments silently dropped: a replay
would restart the optimizer). A non-optimizer was an AttributeError, and ``tuned="lr"``
(a string) was searched by substring.
"""

from __future__ import annotations

import pytest
import torch

from hypergradient.optim import from_torch


def _trained(make):
    p = torch.ones(3, dtype=torch.float64, requires_grad=True)
    q = torch.ones(2, dtype=torch.float64, requires_grad=True)
    opt = make([p, q])
    for _ in range(2):
        opt.zero_grad()
        ((p**2).sum() + (q**3).sum()).backward()
        opt.step()
    return opt, [p, q]


OPTIMIZERS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.1),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_generator_of_params_gives_the_same_state_as_a_list(name):
    opt, ps = _trained(OPTIMIZERS[name])
    _, want, want_step = from_torch(opt, ps)
    _, got, got_step = from_torch(opt, (p for p in ps))
    assert got is not None and got_step == want_step > 0
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert len(got) == len(want)


def test_the_momentum_buffers_are_torchs():
    """SGD momentum buffers after two steps: b1 = g0, b2 = 0.9 b1 + g1 (exact in float64)."""
    opt, ps = _trained(OPTIMIZERS["sgd_momentum"])
    _, state, step = from_torch(opt, iter(ps))
    assert step == 1 and state is not None
    # p: g = 2p; p0 = 1, g0 = 2, b1 = 2, p1 = 1 - 0.2 = 0.8, g1 = 1.6, b2 = 1.8 + 1.6 = 3.4
    assert torch.allclose(state[0], torch.full((3,), 3.4, dtype=torch.float64), rtol=1e-15)
    assert torch.equal(state[0], opt.state[ps[0]]["momentum_buffer"])
    assert torch.equal(state[1], opt.state[ps[1]]["momentum_buffer"])


def test_a_non_optimizer_is_named():
    with pytest.raises(TypeError, match="`optimizer` must be a torch.optim.Optimizer"):
        from_torch(object(), [])  # type: ignore[arg-type]


def test_tuned_as_a_bare_string_is_refused():
    opt, ps = _trained(OPTIMIZERS["sgd_momentum"])
    with pytest.raises(TypeError, match="`tuned` must be a sequence of setting names"):
        from_torch(opt, ps, tuned="momentum")


@pytest.mark.parametrize("which", ["params", "grads", "state"])
def test_functional_update_names_an_iterator(which):
    """Was TypeError "object of type 'generator' has no len()"."""
    from hypergradient.optim import sgd

    opt = sgd(0.1, momentum=0.9)
    args = {"params": [torch.ones(2)], "grads": [torch.ones(2)], "state": opt.init([torch.ones(2)])}
    args[which] = iter(args[which])
    with pytest.raises(TypeError, match=r"SGD.update takes lists, not iterators"):
        opt.update(args["params"], args["grads"], args["state"], 0)
    params, state = opt.update([torch.ones(2)], [torch.ones(2)], opt.init([torch.ones(2)]), 0)
    assert torch.equal(params[0], torch.full((2,), 0.9)) and torch.equal(state[0], torch.ones(2))


def test_sgd_settings_after_momentum_are_keyword_only():
    """sgd(0.1, 0.9, 0.5) meant weight_decay=0.5; torch.optim.SGD's third is dampening."""
    from hypergradient.optim import SGD, sgd

    with pytest.raises(TypeError):
        sgd(0.1, 0.9, 0.5)  # type: ignore[misc]
    a = sgd(0.1, 0.9, dampening=0.5, weight_decay=0.01)
    b = SGD(0.1, 0.9, 0.5, 0.01)
    assert a.settings == b.settings
