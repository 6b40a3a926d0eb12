"""Linked optimizer settings held as 0-d tensors (``SGD(lr=torch.tensor(0.05))``, as
compiled and capturable optimizers keep them) are tuned like numbers: written in place (the
optimizer keeps its tensor) and the run equals the run with a float setting.

Reference: the same run with ``lr`` as a Python float (bit for bit in float64)."""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg

D = torch.float64
g = torch.Generator().manual_seed(0)
X, Xv = torch.randn(40, 4, generator=g, dtype=D), torch.randn(20, 4, generator=g, dtype=D)
y, yv = X @ torch.arange(1.0, 5.0, dtype=D), Xv @ torch.arange(1.0, 5.0, dtype=D)


def mse(m, h, b):
    return ((m(b[0]).squeeze(1) - b[1]) ** 2).mean()


def run(lr, method, optimizer=torch.optim.SGD, steps=9, **kw):
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 1).double()
    inner = optimizer(m.parameters(), lr=lr, **kw)
    hopt = hg.HyperOptimizer(
        m,
        {"lr": hg.Positive(torch.tensor(0.05, dtype=D))},
        inner_optimizer=inner,
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.02),
        train_loss=mse,
        val_loss=mse,
        val_data=(Xv, yv),
        method=method,
        inner_steps=3,
        optimizer_hparams={"lr": "lr"},
    )
    for _ in range(steps):
        hopt.zero_grad()
        hopt.train_loss((X, y)).backward()
        hopt.step((X, y))
    return m, hopt, inner


@pytest.mark.parametrize(
    "method", [hg.Unrolled, hg.ForwardMode, hg.DrMAD], ids=["unrolled", "forward", "drmad"]
)
def test_a_tensor_lr_is_tuned_in_place_as_a_float_one(method):
    m_f, hopt_f, _ = run(0.05, method())
    tensor = torch.tensor(0.05, dtype=D)
    m_t, hopt_t, inner = run(tensor, method())
    assert inner.param_groups[0]["lr"] is tensor  # the optimizer keeps its tensor
    assert tensor.item() == float(hopt_t.hparams["lr"]) != 0.05  # tuned, written in place
    assert hopt_t.hyper_steps == hopt_f.hyper_steps == 3
    assert torch.equal(hopt_t.hparams["lr"], hopt_f.hparams["lr"])
    for a, b in zip(m_t.parameters(), m_f.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)


def test_a_setting_that_is_not_numeric_in_every_group_is_named():
    m = torch.nn.Linear(4, 1).double()
    groups = [{"params": [m.weight]}, {"params": [m.bias], "lr": torch.full((1,), 0.1, dtype=D)}]
    with pytest.raises(ValueError, match="'lr' is not a numeric setting .* every param group"):
        hg.HyperOptimizer(
            m,
            {"lr": torch.tensor(0.05, dtype=D)},
            inner_optimizer=torch.optim.SGD(groups, lr=0.1),
            outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.02),
            method=hg.Unrolled(),
            train_loss=mse,
            val_loss=mse,
            val_data=(Xv, yv),
            optimizer_hparams={"lr": "lr"},
        )
