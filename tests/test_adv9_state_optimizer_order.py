"""A checkpoint loaded into a hyper-optimizer whose optimizers hold the same tensors in
another order is refused, naming both orders, and changes nothing.

torch's optimizer state is keyed by position. Saved with ``hparams={"a": ..., "b": ...}``
and loaded where they are given as ``{"b": ..., "a": ...}`` (same names, same shapes), the
hyperparameters loaded by name but the outer Adam's moments by position: ``a`` continued
with ``b``'s moments and the run went elsewhere (1.8e-3 apart after two hyper-steps),
silently. The same held for an inner optimizer whose param groups were listed in another
order."""

from __future__ import annotations

import copy

import pytest
import torch

import hypergradient as hg
from test_hyperoptimizer_support import (
    BCE,
    DT,
    VAL,
    assert_same,
    batches,
    everything,
    mlp,
    roundtrip,
    run,
    weights,
)


def train_loss(m, h, b):
    w = weights(m)
    penalty = (h["a"] * w[:2] ** 2).sum() + (h["b"] * w[2:] ** 2).sum()
    return BCE(m(b[0]).reshape(-1), b[1]) + 0.5 * penalty


def val_loss(m, h, b):
    return BCE(m(b[0]).reshape(-1), b[1])


def _make(hparam_order="ab", group_order="01"):
    model = mlp()
    hp = {
        "a": hg.Positive(torch.full((2, 6), 1e-2, dtype=DT)),
        "b": hg.Positive(torch.full((2, 6), 3e-2, dtype=DT)),
    }
    hp = {k: hp[k] for k in hparam_order}
    groups = {"0": list(model[0].parameters()), "1": list(model[3].parameters())}
    opt = torch.optim.SGD([{"params": groups[k]} for k in group_order], lr=0.3, momentum=0.9)
    hopt = hg.HyperOptimizer(
        model,
        hp,
        inner_optimizer=opt,
        outer_optimizer=lambda raw: torch.optim.Adam(raw, lr=0.05),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=VAL,
        val_batch_size=16,
        method=hg.IFT(hg.CG(maxiter=5), damping=1.0),
        inner_steps=3,
    )
    return model, hopt


@pytest.mark.parametrize(
    ("order", "match"),
    [
        ({"hparam_order": "ba"}, r"outer_optimizer.*order \['a', 'b'\].*order \['b', 'a'\]"),
        ({"group_order": "10"}, r"inner_optimizer.*order \['0.weight', '0.bias', '3.weight'"),
    ],
    ids=["hparams", "inner param groups"],
)
def test_another_order_is_refused_and_changes_nothing(order, match):
    _, source = _make()
    run(source, batches(7))
    state = roundtrip(source.state_dict())
    model, hopt = _make(**order)
    run(hopt, batches(2, seed=5))
    before = everything(model, hopt)
    with pytest.raises(ValueError, match=match):
        hopt.load_state_dict(state)
    assert_same(before, everything(model, hopt))


def test_the_same_order_resumes_bit_for_bit():
    model, source = _make()
    run(source, batches(7))
    state = roundtrip({"model": model.state_dict(), "hopt": source.state_dict()})
    rest = batches(6, seed=3)
    run(source, rest)
    resumed_model, resumed = _make()
    resumed_model.load_state_dict(copy.deepcopy(state["model"]))
    resumed.load_state_dict(state["hopt"])
    run(resumed, rest)
    assert_same(everything(model, source), everything(resumed_model, resumed))


def test_a_checkpoint_without_the_order_loads_as_before():
    """Checkpoints written before the order was recorded have no ``params`` entry."""
    model, source = _make()
    run(source, batches(7))
    state = roundtrip(source.state_dict())
    for key in ("inner_optimizer", "outer_optimizer"):
        del state[key]["params"]
    resumed_model, resumed = _make()
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(state)
    assert_same(source.state_dict(), resumed.state_dict())
