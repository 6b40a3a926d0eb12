"""Dropout masks drawn from a ``torch.Generator`` of the user's own inside ``inner_loss``.

``hg.unrolled`` replays torch's global random state in its reverse sweep; a generator of
the user's own is not rewound, so the reverse sweep re-evaluated the steps with other masks
and returned a hypergradient 11 % off autograd through the loop, silently. The reverse
sweep now compares each re-evaluated loss with the forward sweep's and warns. Masks from
the global generator (the documented way) agree, and draw no warning.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import hypergradient as hg

DT = torch.float64
G0 = torch.Generator().manual_seed(0)
X, Y = torch.randn(10, 4, generator=G0, dtype=DT), torch.randint(0, 2, (10,), generator=G0)
W0 = {
    "w1": 0.5 * torch.randn(4, 6, generator=G0, dtype=DT),
    "w2": 0.5 * torch.randn(6, 2, generator=G0, dtype=DT),
}
STEPS, LR = 4, 0.5


def losses(generator):
    def inner(p, h):
        mask = (torch.rand(10, 6, generator=generator, dtype=DT) > 0.3).to(DT) / 0.7
        out = (torch.tanh(X @ p["w1"]) * mask) @ p["w2"]
        return F.cross_entropy(out, Y) + 0.5 * h * sum((v**2).sum() for v in p.values())

    def outer(p, h):
        return F.cross_entropy(torch.tanh(X @ p["w1"]) @ p["w2"], Y)

    return inner, outer


def through_the_loop(inner, outer, h):
    hr = h.clone().requires_grad_()
    q = {k: v.clone().requires_grad_() for k, v in W0.items()}
    for _ in range(STEPS):
        g = torch.autograd.grad(inner(q, hr), list(q.values()), create_graph=True)
        q = {k: v - LR * d for (k, v), d in zip(q.items(), g)}
    return float(torch.autograd.grad(outer(q, hr), hr)[0])


def unrolled(inner, outer, h, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = float(hg.unrolled(inner, outer, W0, h, STEPS, hg.optim.sgd(lr=LR), **kwargs))
    return got, [w for w in caught if "re-evaluated" in str(w.message)]


@pytest.mark.parametrize("kwargs", [{}, {"checkpoint_every": 2}], ids=["full", "checkpoints"])
def test_a_private_generator_is_not_replayed_and_says_so(kwargs):
    gen = torch.Generator()
    inner, outer = losses(gen)
    h = torch.tensor(0.1, dtype=DT)
    gen.manual_seed(5)
    want = through_the_loop(inner, outer, h)
    gen.manual_seed(5)
    got, warned = unrolled(inner, outer, h, **kwargs)
    assert abs(got - want) > 1e-2 * abs(want)  # another run's hypergradient ...
    assert len(warned) == 1 and "torch.Generator" in str(warned[0].message)  # ... and a warning


def test_the_global_generator_is_replayed_without_a_warning():
    inner, outer = losses(None)
    h = torch.tensor(0.1, dtype=DT)
    torch.manual_seed(5)
    want = through_the_loop(inner, outer, h)
    torch.manual_seed(5)
    got, warned = unrolled(inner, outer, h)
    assert abs(got - want) < 1e-12 * abs(want) and not warned
