"""T1T2 under a gradient the loop changed between ``backward()`` and ``step()``.

T1T2 differentiates the step on ``train_loss``'s own gradient; ``clip_grad_norm_`` steps
with ``c g`` (derivative ``c (I - g g^T / ||g||^2) dg/dphi``), so the applied hypergradient
was many times the clipped step's (660x in the tutorial's case), silently: it was only
documented. The driver now compares a ``.grad`` changed in place with the replayed gradient
and warns (``on_divergence="warn"``) or skips (``"skip"``). The reference is a float64
central difference of the validation loss after one real clipped (or unclipped) SGD step.
Healthy loops that touch ``.grad`` in place without changing it (a clipping bound that does
not bind, ``zero_grad(set_to_none=False)``, averaged accumulation) get no warning.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergradient as hg

DT = torch.float64
G = torch.Generator().manual_seed(1)
X, Y = torch.randn(16, 4, generator=G, dtype=DT), 3 * torch.randn(16, 1, generator=G, dtype=DT)
XV, YV = torch.randn(16, 4, generator=G, dtype=DT), torch.randn(16, 1, generator=G, dtype=DT)
PEN = 0.05


def train_loss(m, h, b):
    return F.mse_loss(m(b[0]), b[1]) + h["pen"] * (m[0].weight ** 2).sum()


def val_loss(m, h, b):
    return F.mse_loss(m(b[0]), b[1])


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).double()


def build(on_divergence="warn", momentum=0.0, **kw):
    model = net()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, **kw)
    hopt = hg.HyperOptimizer(
        model,
        {"pen": torch.tensor(PEN, dtype=DT)},
        inner_optimizer=inner,
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=1e-3),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(XV, YV),
        method=hg.T1T2(),
        inner_steps=1,
        on_divergence=on_divergence,
    )
    return model, inner, hopt


def after_step(pen, weights, max_norm):
    """The validation loss after one real SGD step (clipped at ``max_norm``, None: not)."""
    model = net()
    model.load_state_dict(weights)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    train_loss(model, {"pen": torch.tensor(pen, dtype=DT)}, (X, Y)).backward()
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    inner.step()
    with torch.no_grad():
        return float(val_loss(model, None, (XV, YV)))


def derivative(weights, max_norm, h=1e-6):
    return (after_step(PEN + h, weights, max_norm) - after_step(PEN - h, weights, max_norm)) / (
        2 * h
    )


def one_step(hopt, model, touch):
    """One step whose ``.grad`` the loop touches with ``touch(model)``; the warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hopt.zero_grad()
        hopt.train_loss((X, Y)).backward()
        touch(model)
        hopt.step((X, Y))
    return [w for w in caught if issubclass(w.category, hg.HypergradientWarning)]


def grad_norm(model):
    loss = train_loss(model, {"pen": torch.tensor(PEN, dtype=DT)}, (X, Y))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return float(torch.cat([g.flatten() for g in grads]).norm())


def test_norm_clipping_warns_and_the_warning_is_warranted():
    model, _, hopt = build()
    weights = copy.deepcopy(model.state_dict())
    max_norm = 0.05 * grad_norm(model)  # clips by 20x
    caught = one_step(
        hopt, model, lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm)
    )
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "not train_loss's gradient" in message and "0.05 times" in message
    assert "on_divergence='warn'" in message
    assert hopt.hyper_steps == 1  # applied, as on_divergence="warn" says
    got = float(hopt.history[-1].hypergrad["pen"])
    clipped = derivative(weights, max_norm)  # the exact hypergradient of the step taken
    assert abs(got / clipped) > 5, (got, clipped)  # T1T2's is not it: the warning is warranted


def test_norm_clipping_skips_with_on_divergence_skip():
    model, _, hopt = build("skip", momentum=0.9)
    max_norm = 0.05 * grad_norm(model)
    caught = one_step(
        hopt, model, lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm)
    )
    assert len(caught) == 1 and "hyper-step skipped" in str(caught[0].message)
    assert hopt.skipped == 1 and hopt.hyper_steps == 0
    assert float(hopt.hparams["pen"]) == PEN  # nothing applied
    assert hopt.loop.count == 1  # the inner step stands


def test_value_clipping_and_a_scaled_loss_warn():
    model, _, hopt = build()
    bound = 0.1 * grad_norm(model) / 30
    caught = one_step(hopt, model, lambda m: torch.nn.utils.clip_grad_value_(m.parameters(), bound))
    assert len(caught) == 1 and "not train_loss's gradient" in str(caught[0].message)

    def doubled(m):
        for p in m.parameters():
            p.grad.mul_(2.0)

    caught = one_step(hopt, model, doubled)
    assert len(caught) == 1 and "2 times" in str(caught[0].message)


def test_a_bound_that_does_not_bind_is_exact_and_silent():
    model, _, hopt = build()
    weights = copy.deepcopy(model.state_dict())
    max_norm = 10 * grad_norm(model)  # clip_grad_norm_ still multiplies in place (by 1)
    caught = one_step(
        hopt, model, lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm)
    )
    assert not caught, [str(w.message) for w in caught]
    got = float(hopt.history[-1].hypergrad["pen"])
    assert got == pytest.approx(derivative(weights, max_norm), rel=1e-6)


def test_in_place_gradients_of_train_loss_are_silent():
    """``zero_grad(set_to_none=False)`` and averaged accumulation over micro-batches change
    ``.grad`` in place but leave it ``train_loss``'s gradient: no warning."""
    model, _, hopt = build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            hopt.zero_grad(set_to_none=False)
            hopt.train_loss((X, Y)).backward()
            hopt.step((X, Y))
        hopt.zero_grad()
        for part in (slice(0, 8), slice(8, 16)):
            (0.5 * hopt.train_loss((X[part], Y[part]))).backward()
        hopt.step((X, Y))
    assert not [w for w in caught if issubclass(w.category, hg.HypergradientWarning)]
    assert hopt.hyper_steps == 3


def test_foreach_nesterov_writing_into_grad_is_not_a_changed_gradient():
    """torch's foreach SGD with Nesterov (the default on CUDA) adds ``momentum * buf`` to
    ``.grad`` in place during the step: the loop did not change the gradient (no warning),
    while a clipped one is still reported."""
    model, _, hopt = build(momentum=0.9, nesterov=True, foreach=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            hopt.zero_grad()
            hopt.train_loss((X, Y)).backward()
            hopt.step((X, Y))
    assert not [w for w in caught if issubclass(w.category, hg.HypergradientWarning)]
    max_norm = 0.05 * grad_norm(model)
    caught = one_step(
        hopt, model, lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm)
    )
    assert len(caught) == 1 and "not train_loss's gradient" in str(caught[0].message)


def test_each_hyper_step_compares_once_and_only_hyper_steps(monkeypatch):
    """Every T1T2 hyper-step compares the step's ``.grad`` with one replay of
    ``train_loss`` (a clean-looking step may still have had a term added to its loss, which
    no counter or hook shows: :mod:`~hypergradient.hyperoptimizer.step_grads`); steps
    without a hyper-step replay nothing. A clean loop whose penalty uses a weight twice and
    whose step writes into ``.grad`` (foreach Nesterov) stays silent."""
    from hypergradient.hyperoptimizer import step_grads

    calls = []
    compare = step_grads.compare
    monkeypatch.setattr(step_grads, "compare", lambda *a: calls.append(1) or compare(*a))
    model, _, hopt = build(momentum=0.9, nesterov=True, foreach=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            hopt.zero_grad()
            hopt.train_loss((X, Y)).backward()
            hopt.step((X, Y))
        hopt.inner_steps = 3
        for _ in range(3):
            hopt.zero_grad()
            hopt.train_loss((X, Y)).backward()
            hopt.step((X, Y))
    assert hopt.hyper_steps == 4 and len(calls) == 4
    assert not [w for w in caught if issubclass(w.category, hg.HypergradientWarning)]


def test_only_the_step_that_ends_with_a_hyper_step_is_watched():
    """Steps that take no hyper-step register no gradient hook (the check costs nothing on
    them), and a clipped step that ends a window of several is still warned."""
    model, inner, hopt = build()
    hopt.inner_steps = 3
    hooked = []
    for i in range(3):
        inner.zero_grad()
        loss = hopt.train_loss((X, Y))
        hooked.append(any(p._post_accumulate_grad_hooks for p in model.parameters()))
        loss.backward()
        if i == 2:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            hopt.step((X, Y))
        if i < 2:
            assert not [w for w in seen if "clip" in str(w.message).lower()]
    assert hooked == [False, False, True]
    assert any(p._post_accumulate_grad_hooks in (None, {}) for p in model.parameters())
    assert [w for w in seen if issubclass(w.category, hg.HypergradientWarning)]
