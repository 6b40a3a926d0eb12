"""``Unrolled(compile=True)``: the forward sweep through torch.compile, the same answer."""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

pytest.importorskip("torch._dynamo")
DT = torch.float64


def _problem(dropout: float = 0.0):
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(40, 5, generator=g, dtype=DT), torch.randn(40, 1, generator=g, dtype=DT)
    params0 = {
        "w1": 0.3 * torch.randn(5, 8, generator=g, dtype=DT),
        "w2": 0.3 * torch.randn(8, 1, generator=g, dtype=DT),
    }

    def inner(p, h):
        z = torch.tanh(X @ p["w1"])
        if dropout:
            z = torch.nn.functional.dropout(z, dropout, training=True)
        return ((z @ p["w2"] - y) ** 2).mean() + 0.5 * (h["decay"].exp() * p["w1"] ** 2).sum()

    def outer(p, h):
        return ((torch.tanh(X[:10] @ p["w1"]) @ p["w2"] - y[:10]) ** 2).mean()

    return inner, outer, params0, {"decay": torch.full((5, 1), -2.0, dtype=DT)}


def test_compiled_forward_sweep_gives_the_eager_hypergradient():
    inner, outer, p0, h = _problem()
    sgd = hg.optim.sgd(lr=0.2, momentum=0.5)
    eager, info_e = hg.unrolled(inner, outer, p0, h, 12, sgd, return_info=True)
    for _ in range(2):  # the second call reuses the compilation (same inner function)
        with warnings.catch_warnings():
            warnings.simplefilter("error", hg.HypergradientWarning)
            comp, info_c = hg.unrolled(inner, outer, p0, h, 12, sgd, compile=True, return_info=True)
        err = (comp["decay"] - eager["decay"]).norm() / eager["decay"].norm()
        assert err < 1e-10
    assert hg.Unrolled(compile=True).config()["compile"] is True
    # the forward sweep's losses are the eager ones
    assert info_c.inner_losses == pytest.approx(info_e.inner_losses, rel=1e-12)


def test_a_loss_with_dropout_stays_eager_with_a_warning():
    inner, outer, p0, h = _problem(dropout=0.2)
    sgd = hg.optim.sgd(lr=0.2)
    torch.manual_seed(3)
    eager = hg.unrolled(inner, outer, p0, h, 6, sgd)
    torch.manual_seed(3)
    with pytest.warns(hg.HypergradientWarning, match="compile=True is ignored"):
        comp = hg.unrolled(inner, outer, p0, h, 6, sgd, compile=True)
    assert torch.equal(comp["decay"], eager["decay"])


def test_compile_must_be_a_bool():
    with pytest.raises(TypeError, match="compile"):
        hg.Unrolled(compile="yes")
