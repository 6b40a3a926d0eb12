"""ModelView's functional calls swap the tensors into the submodules looked up at an earlier
call (:mod:`hypergradient.hyperoptimizer.reparam`); a submodule replaced after that (same
parameter objects, new module) is seen at the next call, the module's own tensors are back
after a call that returns or raises, and the result is torch's ``functional_call``'s."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hypergradient.hyperoptimizer.model import ModelView
from hypergradient.hyperoptimizer.reparam import Slots, swapped_call

DT = torch.float64


def make() -> tuple[nn.Sequential, ModelView]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4, dtype=DT), nn.BatchNorm1d(4, dtype=DT), nn.Linear(4, 1))
    net[2].to(DT)
    net[2].requires_grad_(False)  # frozen: passed detached
    return net, ModelView(net, torch.optim.SGD(net[:2].parameters(), lr=0.1))


def loss(model: nn.Module, hparams: object, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).square().sum()


def torch_call(view: ModelView, params: dict, x: torch.Tensor) -> torch.Tensor:
    values = {f"model.{k}": v for k, v in params.items()}
    return torch.func.functional_call(view._call, values, (loss, None, x))


def own(net: nn.Module) -> list[torch.Tensor]:
    return [*net.parameters(), *net.buffers()]


def test_calls_match_torch_and_a_replaced_submodule_is_seen():
    net, view = make()
    x = torch.randn(5, 3, dtype=DT)
    params = {k: torch.randn_like(p) for k, p in zip(view.names, view.params)}
    before = own(net)
    out = view.call(loss, params, None, x)
    assert torch.equal(out, torch_call(view, params, x))
    assert all(a is b for a, b in zip(own(net), before))  # the module's own tensors are back
    assert view._slots.found  # the submodules were looked up
    old = net[0]
    new = nn.Linear(3, 4, dtype=DT)  # a new module holding the same parameter objects
    new.weight, new.bias = old.weight, old.bias
    net[0] = new
    view.check_trained(view_optimizer(view))  # the trained set is unchanged
    out = view.call(loss, params, None, x)
    assert torch.equal(out, torch_call(view, params, x))
    assert view._slots.get("model.0.weight")[0] is new  # not the replaced module
    with torch.no_grad():  # a stale slot would swap into `old`: `new` would use its own
        new.weight.add_(1.0)
    assert torch.equal(view.call(loss, params, None, x), torch_call(view, params, x))


def view_optimizer(view: ModelView) -> torch.optim.Optimizer:
    return torch.optim.SGD(view.params, lr=0.1)


def test_the_own_tensors_are_back_after_a_raising_call():
    net, view = make()
    before = own(net)
    params = {k: torch.randn_like(p) for k, p in zip(view.names, view.params)}

    def bad(model: nn.Module, hparams: object, batch: torch.Tensor) -> torch.Tensor:
        assert model[0].weight is params["0.weight"]  # swapped in during the call
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        view.call(bad, params, None, torch.randn(2, 3, dtype=DT))
    assert all(a is b for a, b in zip(own(net), before))


def test_a_name_that_is_no_tensor_of_its_module_goes_to_torch():
    torch.manual_seed(0)
    lin = nn.Linear(2, 2)
    x = torch.randn(3, 2)
    w = torch.randn(2, 2)
    slots = Slots(lin)
    # "scale" is neither a parameter nor a buffer: torch sets (and removes) an attribute
    values = {"weight": w, "scale": torch.tensor(2.0)}
    out = swapped_call(lin, slots, values, (x,))
    assert torch.equal(out, torch.func.functional_call(lin, values, (x,)))
    assert not hasattr(lin, "scale") and lin.weight is not w
    with pytest.raises(AttributeError):  # a path that does not resolve: torch's error
        swapped_call(lin, slots, {"missing.weight": w}, (x,))
