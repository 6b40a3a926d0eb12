"""``meta_params`` whose leaf had another shape or dtype than the module's tensor of that name
reached ``functional_call`` and failed with torch's own error ("mat1 and mat2 shapes cannot
be multiplied", "must have the same dtype"), naming neither the argument nor the leaf,
where unknown names, integer dtypes and NaN leaves were refused naming them. They are now
refused before any loss is evaluated."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hypergradient as hg


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    theta = hg.meta.parameters_of(model, copy=True)
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    maml = hg.meta.MAML(model, inner_steps=1, inner_lr=0.1, criterion=nn.functional.cross_entropy)
    return theta, maml, [((x, y), (x, y))]


def test_a_leaf_of_another_shape_is_refused_naming_it():
    theta, maml, tasks = setup()
    bad = {**theta, "0.weight": torch.zeros(3, 3, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"`meta_params\['0.weight'\]` has shape \(3, 3\)"):
        maml.step(bad, tasks)


def test_a_leaf_of_another_dtype_is_refused_naming_it():
    theta, maml, tasks = setup()
    with pytest.raises(hg.ArgumentTypeError, match=r"`meta_params\['0.weight'\]` is torch.float32"):
        maml.step({k: v.float() for k, v in theta.items()}, tasks)


def test_the_module_s_own_parameters_still_step():
    theta, maml, tasks = setup()
    grads, _ = maml.meta_gradient(theta, tasks[0])
    assert set(grads) == set(theta) and all(torch.isfinite(g).all() for g in grads.values())
