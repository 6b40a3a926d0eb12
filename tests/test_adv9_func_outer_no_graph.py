"""An outer loss with no autograd graph to its arguments is named (adversarial round 9).

A common client pattern, an evaluation helper decorated with ``@torch.no_grad()`` used as
``outer_loss``, gave every method a silent zero hypergradient: the hyperparameter is used by
the inner loss, so no "unused" warning fired, and the outer gradient was simply absent. Now
each method warns once that ``outer_loss`` depends on neither ``params`` nor ``hparams``; an
outer loss of the hyperparameters alone, or of the parameters alone, does not warn.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

DT = torch.float64
T_STAR = torch.full((3,), 2.0, dtype=DT)  # the minimum of f for every h
H = torch.tensor(0.5, dtype=DT)


def inner(t, h):
    return ((t - 2.0 * h.exp() / h.exp()) ** 2).sum() * h.exp()


@torch.no_grad()
def evaluate(t, h):
    return (t**2).sum()


def detached(t, h):
    return (t.detach() ** 2).sum() + h.item()


CALLS = {
    "implicit": lambda g: hg.implicit(inner, g, T_STAR, H),
    "implicit_fixed_point": lambda g: hg.implicit_fixed_point(lambda t, h: t / 2 + h, g, T_STAR, H),
    "hoag": lambda g: hg.HOAG()(hg.Problem(inner, g, T_STAR, H))[0],
    "t1t2": lambda g: hg.T1T2()(hg.Problem(inner, g, T_STAR, H, lr=0.1))[0],
    "unrolled": lambda g: hg.unrolled(inner, g, T_STAR, H, 2, hg.optim.sgd(0.1)),
    "forward_mode": lambda g: hg.forward_mode(inner, g, T_STAR, H, 2, hg.optim.sgd(0.1)),
    "drmad": lambda g: hg.drmad(inner, g, T_STAR, H, 2, hg.optim.sgd(0.1)),
}


@pytest.mark.parametrize("outer", [evaluate, detached], ids=["no_grad", "detached"])
@pytest.mark.parametrize("name", list(CALLS))
def test_an_outer_loss_without_a_graph_warns(name, outer):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = CALLS[name](outer)
    texts = [str(w.message) for w in record if "outer_loss depends on neither" in str(w.message)]
    assert len(texts) == 1 and "torch.no_grad()" in texts[0]
    assert float(out) == 0.0


@pytest.mark.parametrize("name", list(CALLS))
def test_outer_losses_of_either_argument_do_not_warn(name):
    for outer in (lambda t, h: (t**2).sum(), lambda t, h: h**2 + 0.0 * t.detach().sum()):
        with warnings.catch_warnings():
            warnings.simplefilter("error", hg.HypergradientWarning)
            warnings.filterwarnings("ignore", "the gradient of inner_loss", hg.HypergradientWarning)
            warnings.filterwarnings("ignore", ".*neither directly", hg.HypergradientWarning)
            CALLS[name](outer)
