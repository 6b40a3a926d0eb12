"""Two shortcuts on T1T2's hyper-step: the signature SharedLoss carries, and the graph match.

``SharedLoss.__signature__``: an instance's signature (read by the method's arity check at
every hyper-step) is the one ``inspect`` finds without it, and the class keeps its
constructor's. ``Tap._same_graph`` tells the replay's graph from five graphs that differ.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from hypergradient._vocab import ArgumentTypeError
from hypergradient.hyperoptimizer import step_tap
from hypergradient.methods._arity import check_arity
from hypergradient.methods.t1t2_shared import SharedLoss


def _shared() -> SharedLoss:
    return SharedLoss(lambda p, h: p["w"].sum(), [], [], torch.zeros(()))


def test_an_instance_has_its_calls_signature_and_the_class_its_constructors():
    loss = _shared()
    assert inspect.signature(loss) == inspect.signature(loss.__call__)
    assert list(inspect.signature(loss).parameters) == ["params", "hparams"]
    assert list(inspect.signature(SharedLoss).parameters) == ["loss", "params", "hparams", "value"]


def test_the_arity_check_decides_as_before():
    check_arity(_shared(), 2, "inner_loss", "(params, hparams)", "")
    with pytest.raises(ArgumentTypeError, match=r"inner_loss\(params: 'Any', hparams: 'Any'\)"):
        check_arity(_shared(), 3, "inner_loss", "(params, hparams, batch)", "")


def _loss(w, b, x, act=torch.tanh, twice=False):
    h = act(x @ w + b)
    h = h * h if twice else h
    return (h.sum(1) ** 2).mean() + 0.1 * (w**2).sum()


def test_same_graph_tells_the_replays_graph_from_others():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=g)
    params = [
        torch.randn(5, 3, generator=g, requires_grad=True),
        torch.zeros(3, requires_grad=True),
    ]
    begin = step_tap.sequence()
    loss = _loss(*params, x)
    tap = step_tap.Tap(loss, (x,), begin, step_tap.sequence(), params)
    assert tap.ok
    fresh = [p.detach().requires_grad_(True) for p in params]
    cases = {
        "same": (_loss(*fresh, x), fresh, True),
        "leaves swapped": (_loss(*fresh, x), fresh[::-1], False),
        "other activation": (_loss(*fresh, x, torch.relu), fresh, False),
        "one node more": (_loss(*fresh, x, twice=True), fresh, False),
        "a parameter detached": (_loss(fresh[0].detach(), fresh[1], x), fresh, False),
        "other leaves": (_loss(*fresh, x), [p.detach().requires_grad_(True) for p in fresh], False),
    }
    for name, (replay, leaves, expected) in cases.items():
        got = tap._same_graph(replay.grad_fn, leaves)
        assert got == expected, name
