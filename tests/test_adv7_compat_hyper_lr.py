"""HippoTrainer applies ``h.data -= self.hyper_lr * grad`` with the tensor it was given, so
a schedule that changes that tensor in place (``hyper_lr.mul_(0.5)``) takes effect. The
compat layer kept a copy made at construction: after ``hyper_lr.mul_(0)`` it still moved
the hyperparameters. The tensor is now read at each hyper-step (and validated then: a NaN
written into it raises before anything changes)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hypergradient.compat.hippotrainer import T1T2

DT = torch.float64
g = torch.Generator().manual_seed(0)
X = torch.randn(20, 3, generator=g, dtype=DT)
Y = torch.randn(20, 1, generator=g, dtype=DT)


def _setup(hyper_lr):
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()
    theta = torch.tensor([0.1, 0.2], dtype=DT)

    def criterion(out, y):
        return ((out - y) ** 2).mean() + theta.sum() * model.weight.square().sum()

    ho = T1T2(
        {"theta": theta},
        hyper_lr,
        1,
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        [(X, Y)],
        [(X, Y)],
        criterion,
    )
    return model, theta, criterion, ho


@pytest.mark.parametrize("shape", [(), (2,)])
def test_a_hyper_lr_tensor_changed_in_place_is_the_one_applied(shape):
    rate = torch.full(shape, 0.5, dtype=DT)
    model, theta, criterion, ho = _setup(rate)
    for factor in (0.5, 0.0, 4.0):
        rate.mul_(factor)
        grad = ho.hyper_grad_on_batches((X, Y), (X, Y))[0]
        before = theta.clone()
        ho.hyper_step()
        assert torch.allclose(theta, before - rate * grad, rtol=1e-12, atol=0)
    assert torch.equal(torch.as_tensor(ho.hyper_lr), rate)


def test_a_nan_written_into_it_raises_before_the_update():
    rate = torch.tensor(0.5, dtype=DT)
    model, theta, criterion, ho = _setup(rate)
    rate.fill_(math.nan)
    before = theta.clone()
    with pytest.raises(ValueError, match="hyper_lr"):
        ho.hyper_step()
    assert torch.equal(theta, before)
