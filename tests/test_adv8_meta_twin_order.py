"""Adversarial review of ``hg.meta`` (round 8): a twin's param groups in another order.

Failed on the code before the review: a ``from_torch`` twin with per-group learning rates,
built from as many tensors as ``meta_params`` has leaves but not in its order (the
meta-parameters listed last layer first, or a learned initialization of one layer with
the twin built from another), was accepted: each group's learning rate went to the wrong
tensor and the meta-gradient was silently wrong (0.27 off on the tiny net below). Only a
different count was refused. Now the shapes are compared position by position.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hypergradient as hg
from hypergradient import meta

DT = torch.float64


def setting():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.01}, {"params": model[2].parameters()}],
        lr=0.5,
    )
    g = torch.Generator().manual_seed(1)
    task = (
        (torch.randn(5, 3, generator=g, dtype=DT), torch.randn(5, 1, generator=g, dtype=DT)),
        (torch.randn(4, 3, generator=g, dtype=DT), torch.randn(4, 1, generator=g, dtype=DT)),
    )
    return model, opt, task


def by_hand(model, theta, task, steps, lrs):
    """Second-order MAML by autograd through ``steps`` SGD steps of per-leaf ``lrs``."""
    start = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    mse = torch.nn.functional.mse_loss
    (xs, ys), (xq, yq) = task
    phi = dict(start)
    for _ in range(steps):
        loss = mse(functional_call(model, phi, (xs,)), ys)
        grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
        phi = {k: v - lrs[k] * g for (k, v), g in zip(phi.items(), grads)}
    out = torch.autograd.grad(mse(functional_call(model, phi, (xq,)), yq), list(start.values()))
    return dict(zip(start, out))


def calls(model, task):
    return [
        lambda t, o: meta.maml_step(model, t, [task], inner_steps=2, inner_optimizer=o),
        lambda t, o: meta.MAML(model, inner_steps=2, inner_optimizer=o).meta_gradient(t, task),
        lambda t, o: meta.imaml_step(model, t, [task], lam=1.0, inner_steps=2, inner_optimizer=o),
        lambda t, o: meta.adapt(model, t, task[0], steps=2, optimizer=o),
    ]


def test_meta_parameters_in_another_order_than_the_twins_are_refused():
    model, opt, task = setting()
    twin, _, _ = hg.optim.from_torch(opt, model.parameters())
    theta = meta.parameters_of(model, copy=True)
    reordered = {k: theta[k] for k in reversed(list(theta))}
    for call in calls(model, task):
        with pytest.raises(ValueError, match=r"other tensors than `(meta_)?params`'s"):
            call(reordered, twin)
    good, _, _ = hg.optim.from_torch(opt, [dict(model.named_parameters())[k] for k in reordered])
    got, _ = meta.maml_step(model, reordered, [task], inner_steps=2, inner_optimizer=good)
    lrs = {"0.weight": 0.01, "0.bias": 0.01, "2.weight": 0.5, "2.bias": 0.5}
    ref = by_hand(model, theta, task, 2, lrs)
    assert max(float((got[k] - ref[k]).abs().max()) for k in ref) < 1e-13


def test_a_twin_of_another_layer_than_the_meta_parameters_is_refused():
    model, opt, task = setting()
    twin, _, _ = hg.optim.from_torch(opt, model[0].parameters())  # the first layer's
    last = {k: v for k, v in meta.parameters_of(model, copy=True).items() if k.startswith("2.")}
    for call in calls(model, task):
        with pytest.raises(ValueError, match=r"`(meta_)?params\['2.weight'\]` has shape \(1, 4\)"):
            call(last, twin)
    good, _, _ = hg.optim.from_torch(opt, model[2].parameters())  # the learned layer's
    got, _ = meta.maml_step(model, last, [task], inner_steps=2, inner_optimizer=good)
    ref = by_hand(model, last, task, 2, {"2.weight": 0.5, "2.bias": 0.5})
    assert max(float((got[k] - ref[k]).abs().max()) for k in ref) < 1e-13
