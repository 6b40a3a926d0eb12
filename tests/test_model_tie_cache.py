"""ModelView's functional calls untie weights (torch's ``tie_weights=True``) only when the
module holds a tensor under several names; that finding is cached with the module tree's
identity, so a tie made after the view was built (an aliased submodule, a parameter set
on another module) is seen at the next call, as torch's own walk would see it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hypergradient.hyperoptimizer.model import ModelView

DT = torch.float64


class Net(nn.Module):
    """Two layers; ``self.extra`` (if set) is applied after them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(3, 3, dtype=DT)
        self.b = nn.Linear(3, 1, dtype=DT)
        self.extra: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x).tanh()
        if self.extra is not None:
            h = self.extra(h).tanh()
        return self.b(h)


def loss(model: nn.Module, hparams: object, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).square().sum()


def expected(view: ModelView, params: dict, x: torch.Tensor) -> torch.Tensor:
    """The call as torch's walk makes it (``tie_weights=True``)."""
    values = {f"model.{k}": v for k, v in params.items()}
    return torch.func.functional_call(view._call, values, (loss, None, x), tie_weights=True)


def test_an_untied_model_skips_the_walk_and_a_later_alias_is_seen():
    net = Net()
    view = ModelView(net, torch.optim.SGD(net.parameters(), lr=0.1))
    x = torch.randn(4, 3, dtype=DT)
    params = {k: torch.randn_like(p) for k, p in zip(view.names, view.params)}
    assert torch.equal(view.call(loss, params, None, x), expected(view, params, x))
    assert view._tie_weights() is False
    net.extra = net.a  # the same layer under a second name: its weights are tied now
    assert view._tie_weights() is True
    out = view.call(loss, params, None, x)
    assert torch.equal(out, expected(view, params, x))
    untied = torch.func.functional_call(
        view._call, {f"model.{k}": v for k, v in params.items()}, (loss, None, x)
    )
    assert torch.equal(out, untied)  # torch's default unties as well
    net.extra = None  # the alias removed: no tie again
    assert view._tie_weights() is False
    assert torch.equal(view.call(loss, params, None, x), expected(view, params, x))


def test_a_parameter_set_on_another_module_is_seen():
    net = Net()
    net.extra = nn.Linear(3, 3, dtype=DT)
    net.extra.requires_grad_(False)  # frozen: the trained set does not change below
    trained = [p for n, p in net.named_parameters() if not n.startswith("extra")]
    view = ModelView(net, torch.optim.SGD(trained, lr=0.1))
    assert view._tie_weights() is False
    x = torch.randn(4, 3, dtype=DT)
    params = {k: torch.randn_like(p) for k, p in zip(view.names, view.params)}
    view.call(loss, params, None, x)
    net.extra.bias = net.a.bias  # a trained tensor, now also `extra`'s (frozen) bias
    assert view._tie_weights() is True
    with pytest.raises(ValueError, match="tied"):  # torch's refusal, as without the cache
        view.call(loss, params, None, x)


def test_a_model_tied_from_the_start_unties_at_every_call():
    net = Net()
    net.extra = nn.Linear(3, 3, dtype=DT)
    net.extra.weight = net.a.weight  # tied before the view is built
    view = ModelView(net, torch.optim.SGD(net.parameters(), lr=0.1))
    assert view._tie_weights() is True
    x = torch.randn(4, 3, dtype=DT)
    params = {k: torch.randn_like(p) for k, p in zip(view.names, view.params)}
    assert torch.equal(view.call(loss, params, None, x), expected(view, params, x))
    assert view._tie_weights() is True
