"""Linking an optimizer setting with a method that cannot tune it: the refusal is accurate.

It said the implicit methods differentiate "where the optimizer's settings have no
effect", false for a coupled ``weight_decay``, which the hyper-optimizer adds to their
inner objective (as a fixed L2 term), and for T1T2's learning rate (it differentiates the
step taken with it). The error now says the settings are constants and how to tune a
decay with these methods; nothing changes before it.
"""

import pytest
import torch

import hypergradient as hg


@pytest.mark.parametrize("method", [hg.IFT(), hg.HOAG(), hg.T1T2()])
def test_refused_link_names_the_penalty_route_and_changes_nothing(method):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.01)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    with pytest.raises(ValueError) as err:
        hg.HyperOptimizer(
            model,
            {"wd": hg.Positive(0.5)},
            inner_optimizer=inner,
            outer_optimizer=lambda r: torch.optim.SGD(r, lr=0.1),
            train_loss=lambda m, h, b: ((m(b[0]) - b[1]) ** 2).mean(),
            val_loss=lambda m, h, b: ((m(b[0]) - b[1]) ** 2).mean(),
            val_data=(x, y),
            method=method,
            optimizer_hparams={"weight_decay": "wd"},
        )
    text = str(err.value)
    assert "no effect" not in text
    assert "constants" in text and "penalty in train_loss" in text and "hg.Unrolled()" in text
    assert inner.param_groups[0]["weight_decay"] == 0.01
