"""``functorch.make_functional`` returns parameters unrelated to the model's (those of a deep
copy: "The returned params are unrelated to the set of params from the original model").
The compat one returned the model's own parameters (or views of their storage), so code
written for functorch that updates ``params`` in place (a ``torch.optim`` optimizer over
them, an ensemble of learners made from one model, a snapshot taken before an in-place outer
step) silently moved the model and every other ``params``."""

import torch
from torch import nn

from hypergradient.compat.hypergrad import functorch


def test_params_are_copies_unrelated_to_the_model():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    fmodel, p1 = functorch.make_functional(model)
    _, p2 = functorch.make_functional(model)
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in p1)
    assert torch.equal(p1[0], w0) and torch.equal(p1[1], b0)
    x = torch.randn(5, 3, dtype=torch.float64)
    opt = torch.optim.SGD(p1, lr=1.0)
    fmodel(p1, x).sum().backward()
    opt.step()
    # p1 took exactly one SGD step on sum(x w^T + b): w - sum_rows(x), b - 5
    assert torch.allclose(p1[0], w0 - x.sum(0, keepdim=True), rtol=0, atol=1e-12)
    assert torch.allclose(p1[1], b0 - 5.0, rtol=0, atol=1e-12)
    # the model and the other call's params did not move (they did by 5.19 before)
    assert torch.equal(model.weight, w0) and torch.equal(model.bias, b0)
    assert torch.equal(p2[0], w0) and torch.equal(p2[1], b0)
    assert model.weight.grad is None


def test_detached_params_are_a_snapshot():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    w0 = model.weight.detach().clone()
    _, snap = functorch.make_functional(model, disable_autograd_tracking=True)
    assert all(not p.requires_grad for p in snap)
    assert model.weight.requires_grad  # the model's flags are left alone
    with torch.no_grad():
        model.weight.add_(1.0)  # e.g. an outer optimizer's in-place step
    assert torch.equal(snap[0], w0)  # it moved with the model before
    with torch.no_grad():
        snap[0].mul_(0.0)
    assert torch.equal(model.weight, w0 + 1.0)


def test_frozen_parameter_keeps_its_flag():
    model = nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    _, params = functorch.make_functional(model)
    assert [p.requires_grad for p in params] == [True, False]
