"""A module backward hook gave wrong hypergradients without a word.

``register_full_backward_hook`` (or ``..._pre_hook``) on a module runs in every backward
pass through it: the step's, but also the validation gradient's and the second derivatives
a hypergradient is made of. A hook halving ``grad_input`` halved T1T2's, Unrolled's and
ForwardMode's hypergradients (T1T2: 2.55e-4 for a finite difference of the run of 5.11e-4).
It now warns, once per hyper-optimizer, naming the modules; forward hooks say nothing.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hypergradient as hg

DT = torch.float64
G = torch.Generator().manual_seed(0)
X, Y = torch.randn(40, 4, generator=G, dtype=DT), torch.randn(40, 1, generator=G, dtype=DT)


def run(hook, method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)
    if hook == "backward":
        model[2].register_full_backward_hook(lambda m, gi, go: tuple(g * 0.5 for g in gi))
    elif hook == "backward_pre":
        model[2].register_full_backward_pre_hook(lambda m, go: tuple(g * 0.5 for g in go))
    elif hook == "forward":
        model[2].register_forward_hook(lambda m, i, o: None)
    hopt = hg.HyperOptimizer(
        model, {"wd": torch.tensor(0.01, dtype=DT)},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.0),
        train_loss=lambda m, h, b: nn.functional.mse_loss(m(b[0]), b[1])
        + h["wd"] * m[0].weight.pow(2).sum(),
        val_loss=lambda m, h, b: nn.functional.mse_loss(m(b[0]), b[1]),
        val_data=(X[20:], Y[20:]), method=method(), inner_steps=2,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            hopt.zero_grad()
            hopt.train_loss((X[:20], Y[:20])).backward()
            hopt.step((X[:20], Y[:20]))
    return [str(w.message) for w in caught if "backward hooks" in str(w.message)]


@pytest.mark.parametrize("hook", ["backward", "backward_pre"])
@pytest.mark.parametrize("method", [hg.T1T2, hg.Unrolled, hg.IFT])
def test_a_module_backward_hook_warns_once_naming_the_module(hook, method):
    ours = run(hook, method)
    assert len(ours) == 1 and "['2']" in ours[0], ours


def test_forward_hooks_and_no_hooks_say_nothing():
    assert run("forward", hg.T1T2) == [] and run(None, hg.Unrolled) == []
