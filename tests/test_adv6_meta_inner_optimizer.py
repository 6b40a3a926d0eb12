"""Adversarial review of ``hg.meta`` with ``torch.optim`` twins and tensor settings as the
inner optimizer.

Each test failed on the code before the review:

- A ``from_torch`` twin of an optimizer that had stepped with one parameter skipped (its
  per-parameter step ``offsets``): second-order MAML replayed the inner run with the offsets
  (a late momentum start for that parameter), while first-order MAML, iMAML and ``adapt``
  started every parameter at step 0: MAML's meta-gradient was off by 0.2 (absolute) from
  the derivative of its own adaptation, and its adapted parameters differed from
  ``MAML.adapt``'s.
- A twin whose second param group has a weight decay passed the documented refusal (only
  the first group's was checked): the decay went to ``phi - theta``.
- A twin built on ``model.parameters()`` while a parameter is frozen (left out of
  ``parameters_of``) gave its per-group learning rates to the wrong tensors, silently.
- A detached tensor learning rate made second-order MAML warn that it "is not one of the
  leaves of `hparams`" (meta-learning has no hparams; the setting is a constant).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hypergradient as hg
from hypergradient import meta

DT = torch.float64
mse = nn.functional.mse_loss


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()


def task_of(seed: int):
    g = torch.Generator().manual_seed(seed)

    def batch(n: int):
        return torch.randn(n, 2, generator=g, dtype=DT), torch.randn(n, 1, generator=g, dtype=DT)

    return batch(5), batch(4)


def by_hand(model, theta, task, steps, lrs, momentum=0.0, first_order=False):
    """MAML with autograd through ``steps`` of SGD (per-name ``lrs``, torch's momentum)."""
    t = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
    p, bufs = t, None
    (xs, ys), (xq, yq) = task
    for _ in range(steps):
        loss = mse(functional_call(model, p, (xs,)), ys)
        g = torch.autograd.grad(loss, list(p.values()), create_graph=not first_order)
        bufs = list(g) if bufs is None else [momentum * b + gk for b, gk in zip(bufs, g)]
        p = {k: v - lrs[k] * b for (k, v), b in zip(p.items(), bufs)}
    wrt = list(p.values()) if first_order else list(t.values())
    g = torch.autograd.grad(mse(functional_call(model, p, (xq,)), yq), wrt)
    return dict(zip(t, g)), p


def err(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in b)


@pytest.mark.parametrize("first_order", [False, True])
def test_a_twin_with_step_offsets_starts_every_adaptation_at_step_zero(first_order):
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model[2].bias.grad = None  # skipped: no momentum buffer, an offset of -1
    opt.step()
    twin, _, _ = hg.optim.from_torch(opt, model.parameters())
    assert twin.offsets == [0, 0, 0, -1]
    theta, task = meta.parameters_of(model, copy=True), task_of(1)
    lrs = dict.fromkeys(theta, 0.1)
    ref, phi = by_hand(model, theta, task, 3, lrs, 0.9, first_order)
    maml = meta.MAML(model, inner_steps=3, inner_optimizer=twin, first_order=first_order)
    got, info = maml.step(theta, [task])
    assert err(got, ref) < 1e-13  # was 0.2 (second order)
    adapted = maml.adapt(theta, task[0])
    assert err(adapted, {k: v.detach() for k, v in phi.items()}) < 1e-13
    query = float(mse(functional_call(model, adapted, (task[1][0],)), task[1][1]))
    assert abs(info.tasks[0].query_loss - query) < 1e-13  # was 1.155 vs 1.096
    assert twin.offsets == [0, 0, 0, -1]  # the caller's twin is left as it was


def test_per_group_learning_rates_of_a_twin_match_autograd():
    model = net()
    opt = torch.optim.SGD(
        [{"params": model[2].parameters(), "lr": 0.5}, {"params": model[0].parameters()}],
        lr=0.01,
    )
    twin, _, _ = hg.optim.from_torch(opt, model.parameters())
    theta, task = meta.parameters_of(model, copy=True), task_of(2)
    lrs = {"0.weight": 0.01, "0.bias": 0.01, "2.weight": 0.5, "2.bias": 0.5}
    got, _ = meta.maml_step(model, theta, [task], inner_steps=2, inner_optimizer=twin)
    assert err(got, by_hand(model, theta, task, 2, lrs)[0]) < 1e-13


def test_a_weight_decay_in_a_later_param_group_is_refused():
    model = net()
    opt = torch.optim.SGD(
        [
            {"params": model[0].parameters()},
            {"params": model[2].parameters(), "weight_decay": 0.5},
        ],
        lr=0.1,
    )
    twin, _, _ = hg.optim.from_torch(opt, model.parameters())
    with pytest.raises(ValueError, match="weight_decay=0.5"):
        meta.MAML(model, inner_steps=2, inner_optimizer=twin)
    with pytest.raises(ValueError, match="weight_decay=0.5"):
        meta.IMAML(model, lam=1.0, inner_steps=2, inner_optimizer=twin)
    with pytest.raises(ValueError, match="weight_decay=0.5"):
        meta.adapt(model, meta.parameters_of(model), task_of(0)[0], steps=1, optimizer=twin)


def test_param_groups_given_for_other_tensors_than_the_meta_parameters_are_refused():
    model = net()
    model[0].bias.requires_grad_(False)  # parameters_of leaves it out; the optimizer has it
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.01}, {"params": model[2].parameters()}],
        lr=0.5,
    )
    bad, _, _ = hg.optim.from_torch(opt, model.parameters())
    theta, task = meta.parameters_of(model, copy=True), task_of(3)
    assert list(theta) == ["0.weight", "2.weight", "2.bias"]
    for call in (
        lambda o: meta.maml_step(model, theta, [task], inner_steps=2, inner_optimizer=o),
        lambda o: meta.MAML(model, inner_steps=2, inner_optimizer=o).meta_gradient(theta, task),
        lambda o: meta.imaml_step(model, theta, [task], lam=1.0, inner_steps=2, inner_optimizer=o),
        lambda o: meta.adapt(model, theta, task[0], steps=2, optimizer=o),
    ):
        with pytest.raises(ValueError, match="param groups were given for 4 parameters"):
            call(bad)
    own = dict(model.named_parameters())
    good, _, _ = hg.optim.from_torch(opt, [own[k] for k in theta])  # the fix the error names
    got, _ = meta.maml_step(model, theta, [task], inner_steps=2, inner_optimizer=good)
    lrs = {"0.weight": 0.01, "2.weight": 0.5, "2.bias": 0.5}
    assert err(got, by_hand(model, theta, task, 2, lrs)[0]) < 1e-13


@pytest.mark.parametrize("first_order", [False, True])
def test_detached_tensor_settings_are_constants_without_a_warning(first_order):
    model = net()
    theta, task = meta.parameters_of(model, copy=True), task_of(4)
    opt = hg.optim.sgd(torch.tensor(0.25, dtype=DT), momentum=torch.tensor(0.5, dtype=DT))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, _ = meta.maml_step(
            model, theta, [task], inner_steps=3, inner_optimizer=opt, first_order=first_order
        )
    ref, _ = by_hand(model, theta, task, 3, dict.fromkeys(theta, 0.25), 0.5, first_order)
    assert err(got, ref) < 1e-13
    assert isinstance(opt.settings["lr"], torch.Tensor)  # the caller's optimizer is untouched


def test_a_tensor_learning_rate_changed_in_place_between_calls_is_read_at_each_call():
    """An inner learning-rate schedule kept in a tensor setting: each call uses its value."""
    model = net()
    theta, task = meta.parameters_of(model, copy=True), task_of(5)
    lr = torch.tensor(0.3, dtype=DT)
    maml = meta.MAML(model, inner_steps=2, inner_optimizer=hg.optim.sgd(lr))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for value in (0.3, 0.1):
            lr.fill_(value)
            got, _ = maml.step(theta, [task])
            ref, _ = by_hand(model, theta, task, 2, dict.fromkeys(theta, value))
            assert err(got, ref) < 1e-13
