"""HyperOptimizer checkpoints: a load is validated entirely and changes nothing when it
fails (defect family 4); checkpoints hold tensors and plain data only, so namedtuple,
dataclass and numpy batches survive ``torch.load(weights_only=True)`` and resume bit for
bit (family 7)."""

from __future__ import annotations

import collections
import dataclasses
import math
import types

import numpy as np
import pytest
import torch

import hypergradient as hg
from test_hyperoptimizer_support import (
    BCE,
    DT,
    Pair,
    assert_same,
    batches,
    build,
    everything,
    mlp,
    roundtrip,
    run,
    weights,
)


def trained(method=None, steps=7, **kw):
    model, hopt = build(method, **kw)
    run(hopt, batches(steps))
    return model, hopt


def _ck(**kw):
    return trained(**kw)[1].state_dict()


def _without(key):
    def make():
        ck = _ck()
        del ck[key]
        return ck

    return make


def _edit(edit):
    def make():
        ck = _ck()
        edit(ck)
        return ck

    return make


def _set(ck, path, value):
    *head, last = path
    for k in head:
        ck = ck[k]
    ck[last] = value


BAD = {
    "another method": (lambda: _ck(method=hg.HOAG(maxiter=5, damping=0.5)), r"method HOAG"),
    "another inner optimizer": (lambda: _ck(inner="adam"), r"inner_optimizer.*Adam.*SGD"),
    "a missing entry": (_without("val_sampler"), r"lacks \['val_sampler'\]"),
    "a missing hyperparameter": (
        _edit(lambda ck: ck["hparams"]["raw"].clear()),
        r"hyperparameters \[\] differ from .* \[.decay.\]",
    ),
    "another model (width)": (lambda: _ck(model=mlp(width=8)), r"another model.*0\.weight"),
    "a (6,) hyperparameter into an (8, 6) one": (
        lambda: _ck(model=mlp(width=8), decay=hg.Positive(torch.full((6,), 0.01, dtype=DT))),
        r"hparams\['decay'\] is \(6,\).*\(8, 6\)",
    ),
    "NaN hyperparameters": (
        _edit(lambda ck: ck["hparams"]["raw"]["decay"].view(-1)[3].fill_(math.nan)),
        r"decay.*not finite",
    ),
    "a Positive at 0": (
        _edit(lambda ck: ck["hparams"]["raw"]["decay"].view(-1)[0].fill_(-1e4)),
        r"decay.*reached 0",
    ),
    "a sampler of another kind": (
        _edit(lambda ck: _set(ck, ["val_sampler"], {"kind": "iterable", "drawn": 3})),
        r"val_data.*'iterable'.*'tensors'",
    ),
    "a negative counter": (_edit(lambda ck: _set(ck, ["counters", "count"], -1)), "count"),
    "a momentum buffer of another shape": (
        _edit(
            lambda ck: _set(
                ck["inner_optimizer"]["state_dict"]["state"],
                [0],
                {"momentum_buffer": torch.zeros(3, dtype=DT)},
            )
        ),  # fmt: skip
        r"momentum_buffer of shape \(3,\)",
    ),
    "a NaN learning rate": (
        _edit(
            lambda ck: ck["inner_optimizer"]["state_dict"]["param_groups"][0].update(lr=math.nan)
        ),
        r"lr=nan",
    ),
    "a checkpoint that is not a dict": (lambda: [1, 2], r"must be a dict"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_a_bad_checkpoint_raises_naming_the_difference_and_changes_nothing(case):
    make, match = BAD[case]
    bad = make()
    model = mlp(width=8) if "(8, 6)" in case else None
    model, hopt = trained(steps=5, model=model)
    before = everything(model, hopt)
    with pytest.raises(ValueError, match=match):
        hopt.load_state_dict(bad)
    assert_same(before, everything(model, hopt))


def test_a_good_checkpoint_loads_everything_it_holds():
    """The control for the test above: the same target loads a valid checkpoint and ends
    up with the source's state, entry by entry."""
    src_model, src = trained(steps=7)
    model, hopt = trained(steps=5)
    model.load_state_dict(src_model.state_dict())
    hopt.load_state_dict(roundtrip(src.state_dict()))
    assert_same(src.state_dict(), hopt.state_dict())
    assert hopt.hyper_steps == src.hyper_steps == 2


def test_a_trajectory_checkpoint_with_a_window_of_the_wrong_length_is_refused():
    model, src = trained(hg.Unrolled(), steps=7)
    ck = src.state_dict()
    assert len(ck["window"]["batches"]["structure"]) == 1  # step 7 of windows of 3
    ck["counters"]["count"] = 8
    model, hopt = trained(hg.Unrolled(), steps=4)
    before = everything(model, hopt)
    with pytest.raises(ValueError, match="window holds 1 batches.*2 were expected"):
        hopt.load_state_dict(ck)
    assert_same(before, everything(model, hopt))


# ------------------------------------------------------------------ batches (family 7)

Named = collections.namedtuple("Named", ["x", "y"])


def _as_xy(batch):
    if isinstance(batch, dict):
        batch = (batch["x"], batch["y"])
    if hasattr(batch, "x"):
        batch = (batch.x, batch.y)
    x, y = batch
    return torch.as_tensor(x), torch.as_tensor(y)


def flexible_train_loss(m, h, batch):
    x, y = _as_xy(batch)
    return BCE(m(x).reshape(-1), y) + 0.5 * (h["decay"] * weights(m) ** 2).sum()


def _local_classes():
    Local = collections.namedtuple("Local", ["x", "y"])

    @dataclasses.dataclass
    class LocalPair:
        x: torch.Tensor
        y: torch.Tensor

    return Local, LocalPair


Local, LocalPair = _local_classes()  # qualname has <locals>: not importable by name

KINDS = {
    "tuple": (lambda b: b, tuple),
    "namedtuple": (lambda b: Named(*b), Named),
    "local namedtuple": (lambda b: Local(*b), "namedtuple"),
    "dataclass": (lambda b: Pair(*b), Pair),
    "local dataclass": (lambda b: LocalPair(*b), types.SimpleNamespace),
    "numpy": (lambda b: (b[0].numpy().copy(), b[1].numpy().copy()), tuple),
    "dict of numpy and tensor": (lambda b: {"x": b[0], "y": b[1].numpy().copy()}, dict),
}


@pytest.mark.parametrize("kind", list(KINDS), ids=list(KINDS))
def test_batches_of_any_structure_survive_weights_only_and_resume_bit_for_bit(kind):
    convert, expected_type = KINDS[kind]
    steps = [convert(b) for b in batches(11)]

    def fresh():
        return build(hg.Unrolled(), inner_steps=4, train_loss=flexible_train_loss)

    model_a, hopt_a = fresh()
    run(hopt_a, steps[:6])  # mid-window: the checkpoint holds the window's two batches
    ck = roundtrip({"model": model_a.state_dict(), "hopt": hopt_a.state_dict()})
    assert len(ck["hopt"]["window"]["batches"]["structure"]) == 2
    run(hopt_a, steps[6:])

    model_b, hopt_b = fresh()
    model_b.load_state_dict(ck["model"])
    hopt_b.load_state_dict(ck["hopt"])
    first = hopt_b.loop.window.batches[0]
    if expected_type == "namedtuple":
        assert type(first).__name__ == "Local" and first._fields == ("x", "y")
    else:
        assert type(first) is expected_type
    if kind.startswith("numpy") or kind.startswith("dict"):
        values = first if isinstance(first, tuple) else [first["y"]]
        assert all(isinstance(v, np.ndarray) for v in values[-1:])
    run(hopt_b, steps[6:])
    assert hopt_a.hyper_steps == hopt_b.hyper_steps == 2
    assert_same(model_a.state_dict(), model_b.state_dict())
    assert_same(hopt_a.state_dict(), hopt_b.state_dict())


def test_a_batch_a_checkpoint_cannot_store_is_named():
    class Opaque:
        def __init__(self, b):
            self.b = b

    def loss(m, h, batch):
        return flexible_train_loss(m, h, batch.b)

    model, hopt = build(hg.Unrolled(), inner_steps=4, train_loss=loss)
    run(hopt, [Opaque(b) for b in batches(2)])
    with pytest.raises(ValueError, match="holds a Opaque, which a checkpoint cannot store"):
        hopt.state_dict()
