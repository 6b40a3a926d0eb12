"""T1T2 when the step's gradient is not ``train_loss``'s gradient at the step's start.

T1T2 differentiates the step on ``train_loss``'s own gradient. A loop that backpropagated
``2 * loss``, summed micro-batches without averaging, added a term ``train_loss`` does not
hold, or replaced ``.grad`` by new tensors (``p.grad = 2 * p.grad``, a clipped gradient
cloned) stepped on another gradient, and T1T2 applied the hypergradient of a step not
taken, silently (half the exact value for a doubled loss; 0.53 relative error for a
penalty on the hyperparameter added outside ``train_loss``; 1974x for a cloned clipped
gradient). Every T1T2 hyper-step now compares the step's ``.grad`` with the replayed
gradient: a factor applied inside autograd is accounted for exactly (T1T2's rates times the
factor), anything else warns or skips. The reference is a float64 central difference of the
validation loss after one real step of the same loop from the same weights.
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
HALVES = (slice(0, 8), slice(8, 16))


def train_loss(m, h, b):
    out = m(b[0])  # each weight used once: no in-place accumulation inside one backward
    return F.mse_loss(out, b[1]) + h["pen"] * (out**2).mean()


def val_loss(m, h, b):
    return F.mse_loss(m(b[0]), b[1])


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).double()


# the loops: fill .grad before the step (``loss(batch)``: hopt.train_loss or the loop's own)
def doubled(m, h, loss):
    (2 * loss((X, Y))).backward()


def summed_halves(m, h, loss):
    for part in HALVES:
        loss((X[part], Y[part])).backward()


def averaged_by_replacing(m, h, loss):
    summed_halves(m, h, loss)
    for p in m.parameters():
        p.grad = p.grad / 2


def penalty_outside(m, h, loss):
    (loss((X, Y)) + h["pen"] * (m[2].weight ** 2).sum()).backward()


def replaced_doubled(m, h, loss):
    loss((X, Y)).backward()
    for p in m.parameters():
        p.grad = 2 * p.grad


def clipped_clone(m, h, loss):
    loss((X, Y)).backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
    for p in m.parameters():
        p.grad = p.grad.clone()


def make_inner(m, adam):
    if adam:
        return torch.optim.Adam(m.parameters(), lr=0.05)
    return torch.optim.SGD(m.parameters(), lr=0.1)


def after_step(loop, pen, start, adam):
    """The validation loss after one real step of ``loop`` from ``start`` (the weights and
    the inner optimizer's state before the step)."""
    m = net()
    m.load_state_dict(start[0])
    inner = make_inner(m, adam)
    inner.load_state_dict(copy.deepcopy(start[1]))  # (the step writes into its tensors)
    h = {"pen": torch.tensor(pen, dtype=DT)}
    loop(m, h, lambda b: train_loss(m, h, b))
    inner.step()
    with torch.no_grad():
        return float(val_loss(m, None, (XV, YV)))


def exact(loop, start, adam=False, eps=1e-6):
    up, down = after_step(loop, PEN + eps, start, adam), after_step(loop, PEN - eps, start, adam)
    return (up - down) / (2 * eps)


def t1t2(loop, own=False, adam=False, on_divergence="warn"):
    """T1T2 on a step of ``loop`` (Adam's second: its first step is ``lr sign(g)``, whose
    derivative is ~0): the hyper-optimizer, the weights and inner optimizer state before
    that step, and the HypergradientWarnings."""
    m = net()
    inner = make_inner(m, adam)
    hopt = hg.HyperOptimizer(
        m,
        {"pen": torch.tensor(PEN, dtype=DT)},
        inner_optimizer=inner,
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(XV, YV),
        method=hg.T1T2(),
        inner_steps=2 if adam else 1,
        on_divergence=on_divergence,
    )
    if adam:
        hopt.zero_grad()
        hopt.train_loss((X, Y)).backward()
        hopt.step((X, Y))
    start = (copy.deepcopy(m.state_dict()), copy.deepcopy(inner.state_dict()))
    loss = (lambda b: train_loss(m, hopt.hparams, b)) if own else hopt.train_loss
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hopt.zero_grad()
        loop(m, hopt.hparams, loss)
        hopt.step((X, Y))
    return hopt, start, [w for w in caught if issubclass(w.category, hg.HypergradientWarning)]


def got(hopt):
    return float(hopt.history[-1].hypergrad["pen"])


@pytest.mark.parametrize("own", [False, True], ids=["hopt.train_loss", "own loss"])
@pytest.mark.parametrize("adam", [False, True], ids=["SGD", "Adam"])
def test_a_scaled_loss_is_accounted_for_exactly(own, adam):
    """``(2 * loss).backward()``: the step used ``2 g``; T1T2 took ``g`` (half the exact
    value with SGD, silently). The factor, applied inside autograd, now multiplies the
    rates: the hypergradient of the step taken, without a warning."""
    hopt, start, caught = t1t2(doubled, own=own, adam=adam)
    assert not caught, [str(w.message) for w in caught]
    assert got(hopt) == pytest.approx(exact(doubled, start, adam), rel=1e-6)
    assert hopt.history[-1].info.stats["step_grad_scale"] == pytest.approx(2.0, rel=1e-12)


def test_summed_micro_batches_are_accounted_for_and_averaged_ones_are_exact():
    """Two half-batches accumulated without averaging step on twice the full batch's mean
    gradient (T1T2 gave half); averaged afterwards by replacing ``.grad`` it is the full
    batch's gradient: exact and silent, with no factor."""
    hopt, start, caught = t1t2(summed_halves)
    assert not caught, [str(w.message) for w in caught]
    assert got(hopt) == pytest.approx(exact(summed_halves, start), rel=1e-6)
    assert hopt.history[-1].info.stats["step_grad_scale"] == pytest.approx(2.0, rel=1e-9)
    hopt, start, caught = t1t2(averaged_by_replacing)
    assert not caught, [str(w.message) for w in caught]
    assert got(hopt) == pytest.approx(exact(averaged_by_replacing, start), rel=1e-6)
    assert "step_grad_scale" not in hopt.history[-1].info.stats


@pytest.mark.parametrize("own", [False, True], ids=["hopt.train_loss", "own loss"])
def test_a_term_outside_train_loss_warns_and_skips(own):
    """A penalty on the hyperparameter added to the loss outside ``train_loss``: T1T2
    misses its derivative (0.29 relative error here, silently before); now it warns, and
    ``on_divergence="skip"`` skips the hyper-step (nothing applied, the step stands)."""
    hopt, start, caught = t1t2(penalty_outside, own=own)
    assert len(caught) == 1 and "not train_loss's gradient" in str(caught[0].message)
    assert abs(got(hopt) / exact(penalty_outside, start) - 1) > 0.2  # warranted
    hopt, _, caught = t1t2(penalty_outside, own=own, on_divergence="skip")
    assert len(caught) == 1 and "hyper-step skipped" in str(caught[0].message)
    assert hopt.skipped == 1 and hopt.hyper_steps == 0 and hopt.loop.count == 1
    assert float(hopt.hparams["pen"]) == PEN


@pytest.mark.parametrize("loop", [replaced_doubled, clipped_clone])
def test_gradients_replaced_after_backward_warn(loop):
    """``p.grad = 2 * p.grad`` and a clipped gradient cloned into new tensors: no version
    counter moves on the new tensors, and the factor applied after ``backward()`` may be
    clipping's (which depends on the hyperparameters): a warning naming the factor, and the
    hypergradient it would apply is not the step's."""
    hopt, start, caught = t1t2(loop)
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "not train_loss's gradient" in message and "changed after backward()" in message
    assert abs(got(hopt) / exact(loop, start) - 1) > 0.3


def dropout_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)
    )


def ce_loss(m, h, b):
    return F.cross_entropy(m(b[0]), b[1]) + h["wd"] * (m[0].weight ** 2).sum()


@pytest.mark.parametrize(
    "opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
        lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-4),
    ],
    ids=["momentum+wd", "Adam+wd"],
)
def test_healthy_float32_loops_are_silent(opt):
    """Float32 MLP with BatchNorm and dropout (replayed with the step's draws): the loop's
    own loss, ``hopt.train_loss``, averaged micro-batches (without dropout and BatchNorm,
    whose micro-batch draws and statistics one replayed pass cannot reproduce), and bfloat16
    autocast over micro-batches (2.6e-3 from the full batch's replay, within four bfloat16
    roundings) take every hyper-step, with no warning and no factor."""
    torch.manual_seed(3)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    pick = torch.Generator().manual_seed(0)  # (the global stream: dropout alone)
    for loop in ("hopt", "own", "accum", "bf16-accum"):
        m = dropout_net()
        if "accum" in loop:  # micro-batches: no dropout, no BatchNorm (T1T2 replays one pass)
            m[1], m[3].p = nn.Identity(), 0.0
        hopt = hg.HyperOptimizer(
            m,
            {"wd": torch.tensor(1e-3)},
            inner_optimizer=opt(m.parameters()),
            outer_optimizer=lambda p: torch.optim.SGD(p, lr=1e-3),
            train_loss=ce_loss,
            val_loss=ce_loss,
            val_data=(x, y),
            method=hg.T1T2(),
            inner_steps=2,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(4):
                idx = torch.randint(0, 32, (16,), generator=pick)
                b = (x[idx], y[idx])
                hopt.zero_grad()
                if loop == "hopt":
                    hopt.train_loss(b).backward()
                elif loop == "own":
                    ce_loss(m, hopt.hparams, b).backward()
                else:
                    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=loop == "bf16-accum")
                    with amp:
                        for part in (slice(0, 8), slice(8, 16)):
                            (0.5 * hopt.train_loss((b[0][part], b[1][part]))).backward()
                hopt.step(b)
        bad = [str(w.message) for w in caught if issubclass(w.category, hg.HypergradientWarning)]
        assert not bad, (loop, bad)
        assert hopt.hyper_steps == 2, loop
        assert all("step_grad_scale" not in r.info.stats for r in hopt.history), loop


def test_no_hook_is_left_behind():
    """The hooks that watch ``.grad`` are registered for a step that ends with a hyper-step
    (kept while the next one does too) and removed with a hyper-optimizer dropped."""
    import gc

    m = net()
    hopt = hg.HyperOptimizer(
        m,
        {"pen": torch.tensor(PEN, dtype=DT)},
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(XV, YV),
        method=hg.T1T2(),
        inner_steps=1,
    )
    assert all(len(p._post_accumulate_grad_hooks) == 1 for p in m.parameters())
    del hopt
    gc.collect()
    assert all(not p._post_accumulate_grad_hooks for p in m.parameters())
