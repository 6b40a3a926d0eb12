"""A loss with the wrong number of arguments gets the same message from every method.

Adversarial round 9: ``methods/_checks.py`` promises it, but only the trajectory methods'
``inner_loss`` was checked. ``hg.implicit`` with a one-argument ``inner_loss``, and every
method with an ``outer_loss`` of three arguments (or ``hg.implicit_fixed_point`` with a
one-argument map), failed inside the call with Python's "<lambda>() takes 1 positional
argument but 2 were given", naming no argument, after the inner run for the trajectory
methods. Now an ``ArgumentTypeError`` names the argument and its signature before any
computation.
"""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg
from hypergradient._vocab import ArgumentTypeError

DT = torch.float64
P = torch.ones(3, dtype=DT)
H = torch.tensor(0.5, dtype=DT)
calls: list[int] = []


def f(t, h):
    calls.append(1)
    return ((t - 2.0) ** 2).sum() * h.exp()


def g(t, h):
    calls.append(1)
    return (t**2).sum()


def f1(t):
    return f(t, H)


def g3(t, h, batch):
    return g(t, h)


OPT = hg.optim.sgd(0.1)
CASES = {
    "implicit_inner": (
        lambda: hg.implicit(f1, g, P, H),
        r"`inner_loss` must take \(params, hparams\)",
    ),
    "implicit_outer": (
        lambda: hg.implicit(f, g3, P, H),
        r"`outer_loss` must take .* outer_loss\(t, h, batch\)",
    ),
    "hoag_outer": (lambda: hg.HOAG()(hg.Problem(f, g3, P, H)), "`outer_loss` must take"),
    "t1t2_inner": (lambda: hg.T1T2()(hg.Problem(f1, g, P, H, lr=0.1)), "`inner_loss` must take"),
    "unrolled_outer": (lambda: hg.unrolled(f, g3, P, H, 3, OPT), "`outer_loss` must take"),
    "forward_mode_outer": (lambda: hg.forward_mode(f, g3, P, H, 3, OPT), "`outer_loss` must take"),
    "drmad_outer": (lambda: hg.drmad(f, g3, P, H, 3, OPT), "`outer_loss` must take"),
    "fixed_point_map": (
        lambda: hg.implicit_fixed_point(lambda t: t / 2, g, P, H),
        r"`fixed_point_map` must take \(params, hparams\)",
    ),
    "fixed_point_outer": (
        lambda: hg.implicit_fixed_point(lambda t, h: t / 2 + h, g3, P, H),
        "`outer_loss` must take",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_loss_of_the_wrong_arity_is_named_before_any_evaluation(name):
    call, match = CASES[name]
    calls.clear()
    with pytest.raises(ArgumentTypeError, match=match):
        call()
    assert calls == []


def test_losses_with_defaults_or_varargs_are_accepted_and_exact():
    # f = e^h |t - 2|^2 at its minimum t = 2: the hypergradient of g = |t|^2 in h is 0
    # (t* does not depend on h); with g = |t|^2 h it is |t*|^2 = 12.
    t_star = torch.full((3,), 2.0, dtype=DT)
    out = hg.implicit(lambda t, h, scale=1.0: f(t, h) * scale, lambda *a: g(*a) * a[1], t_star, H)
    assert float(out) == pytest.approx(12.0, rel=1e-12)
