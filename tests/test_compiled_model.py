"""A ``torch.compile``'d model in ``HyperOptimizer``.

AOTAutograd's backward refuses ``create_graph`` ("compiled with non-empty donated
buffers ..."), so IFT and Unrolled crashed on a compiled model (T1T2, whose mixed product
takes the penalty's hyperparameters first, ran). The refusal is now a double-backward
error: ``hvp="auto"`` falls back to first-order products (the implicit operator also when
the refusal comes while building its graph, where it hit an ``AssertionError``), and the
hypergradients are those of the same model uncompiled.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import hypergradient as hg


def run(model: torch.nn.Module, method: hg.Method) -> list[float]:
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(64, 6, generator=g), torch.randn(64, generator=g)
    Xv, yv = torch.randn(32, 6, generator=g), torch.randn(32, generator=g)

    def train_loss(m, h, b):
        penalty = sum((p**2).sum() for p in m.parameters())
        return ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean() + h["wd"].exp() * penalty

    def val_loss(m, h, b):
        return ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean()

    hopt = hg.HyperOptimizer(
        model,
        {"wd": hg.Unconstrained(torch.tensor(-3.0))},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.01),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(Xv, yv),
        method=method,
        inner_steps=2,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(4):
            hopt.zero_grad()
            hopt.train_loss((X, y)).backward()
            hopt.step((X, y))
    return [float(r.hypergrad["wd"]) for r in hopt.history]


@pytest.mark.parametrize("method", [hg.IFT, hg.Unrolled])
def test_compiled_model_hypergradients_equal_the_eager_ones(method):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    eager = run(copy.deepcopy(net), method())
    torch._dynamo.reset()
    compiled = run(torch.compile(copy.deepcopy(net), backend="aot_eager"), method())
    assert len(compiled) == len(eager) == 2
    for a, b in zip(compiled, eager):
        assert a == pytest.approx(b, rel=1e-3)  # first-order products in float32: ~1e-4
