"""``functorch.make_functional``'s ``fmodel`` is an ``nn.Module`` in functorch: hypergrad code
with a dropout or BatchNorm model calls ``fmodel.eval()`` before a test pass and
``fmodel.train()`` after. The compat ``fmodel`` was a plain function: ``AttributeError``.
As functorch's, its mode starts as the model's and is its own afterwards."""

from __future__ import annotations

import torch
from torch import nn

from hypergradient.compat.hypergrad import functorch


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 2)).double()


def test_fmodel_eval_and_train_switch_dropout_without_touching_the_model():
    model = _model()
    x = torch.randn(8, 4, dtype=torch.float64)
    fmodel, params = functorch.make_functional(model, disable_autograd_tracking=True)
    assert fmodel.training and list(fmodel.parameters()) == []
    moved = tuple(p + 0.1 for p in params)
    assert fmodel.eval() is fmodel and not fmodel.training
    out = fmodel(moved, x)
    assert torch.equal(out, fmodel(moved, x))  # no dropout
    names = [k for k, _ in model.named_parameters()]
    model.eval()
    reference = torch.func.functional_call(model, dict(zip(names, moved)), (x,))
    model.train()
    torch.testing.assert_close(out, reference, rtol=1e-15, atol=0)
    assert model.training and model[1].training  # the model's own modes are untouched
    fmodel.train()
    torch.manual_seed(1)
    a = fmodel(moved, x)
    torch.manual_seed(2)
    b = fmodel(moved, x)
    assert not torch.equal(a, b)  # dropout on again


def test_fmodel_starts_in_the_models_modes_and_keeps_them():
    model = _model()
    model.eval()
    fmodel, params = functorch.make_functional(model)
    x = torch.randn(8, 4, dtype=torch.float64)
    model.train()  # changing the model afterwards does not change the functional model
    torch.testing.assert_close(fmodel(params, x), fmodel(params, x), rtol=0, atol=0)
    assert not fmodel.training and model.training
    grads = torch.func.grad(lambda p: fmodel(p, x).square().sum())(params)
    assert len(grads) == len(params)
