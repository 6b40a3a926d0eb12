"""Trajectory replays skip a parameter whose gradient is None, as ``torch.optim`` does.

After ``zero_grad()`` a parameter the step's loss does not use has ``.grad = None`` and
``torch.optim`` leaves it alone: no update, no decay, no momentum, and (Adam) no step
counted. The replay stepped it with a zero gradient: an unused pooler with
``Adam(weight_decay=...)`` put the replay 13% away from the model and every hyper-step was
skipped; a branch used at some steps only made the next window's ``from_torch`` raise
(different Adam step counts), ending training. References: central finite differences of
the real ``torch.optim`` loop in float64, and ``torch.optim`` itself step for step.
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
W = 3  # inner steps per window
USE = [False, True, True, False, True, False, False, True, True]  # the branch, per step


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 2)
        self.branch = nn.Linear(5, 2)  # used at some steps only (or never)

    def forward(self, x, use):
        out = self.body(x)
        return out + self.branch(x) if use else out


def data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(72, 5, generator=g, dtype=DT), torch.randn(72, 2, generator=g, dtype=DT)
    val = (torch.randn(16, 5, generator=g, dtype=DT), torch.randn(16, 2, generator=g, dtype=DT))
    return x, y, val


def train_loss(m, h, b):
    return F.mse_loss(m(b[0], bool(b[2])), b[1]) + h["pen"] * (m.body.weight**2).sum()


def val_loss(m, h, b):
    return F.mse_loss(m(b[0], True), b[1])


OPTIMIZERS = {
    "adam_wd": lambda m: torch.optim.Adam(m.parameters(), lr=0.05, weight_decay=0.1),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=0.05),
    "sgd": lambda m: torch.optim.SGD(
        m.parameters(), lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.1
    ),
}


def batches(use):
    x, y, _ = data()
    rows = [slice(8 * i, 8 * i + 8) for i in range(len(use))]
    return [(x[r], y[r], torch.tensor(u)) for r, u in zip(rows, use)]


def reference(model0, make, use, window):
    """d val / d pen with pen perturbed in the steps of ``window`` only (real torch loop)."""
    val = data()[2]
    out = []
    for sign in (1, -1):
        m = copy.deepcopy(model0)
        opt = make(m)
        for t, b in enumerate(batches(use)[: (window + 1) * W]):
            pen = 1e-2 + (sign * 1e-6 if t >= window * W else 0.0)
            opt.zero_grad()
            train_loss(m, {"pen": torch.tensor(pen, dtype=DT)}, b).backward()
            opt.step()
        with torch.no_grad():
            out.append(float(val_loss(m, None, val)))
    return (out[0] - out[1]) / 2e-6


def tuned(model0, make, use, method):
    m = copy.deepcopy(model0)
    hopt = hg.HyperOptimizer(
        m,
        {"pen": torch.tensor(1e-2, dtype=DT)},
        inner_optimizer=make(m),
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=[data()[2]],
        method=method,
        inner_steps=W,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)  # no replay warning, no skip
        for b in batches(use):
            hopt.zero_grad()
            hopt.train_loss(b).backward()
            hopt.step(b)
    return hopt


@pytest.mark.parametrize("method", [hg.Unrolled, hg.ForwardMode])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_a_branch_used_at_some_steps_is_replayed_as_torch_steps_it(opt, method):
    torch.manual_seed(0)
    model0 = Net().double()
    hopt = tuned(model0, OPTIMIZERS[opt], USE, method())
    assert hopt.hyper_steps == 3 and hopt.skipped == 0
    for k, record in enumerate(hopt.history):
        assert record.info.replay_error < 1e-14
        ref = reference(model0, OPTIMIZERS[opt], USE, k)
        assert float(record.hypergrad["pen"]) == pytest.approx(ref, rel=1e-6, abs=1e-10)


@pytest.mark.parametrize("opt", ["adam_wd", "sgd"])
def test_a_parameter_never_used_stays_where_torch_leaves_it(opt):
    """An unused pooler: with weight decay the replay decayed it (Adam: 13% off, skipped)."""
    torch.manual_seed(0)
    model0 = Net().double()
    never = [False] * 6
    hopt = tuned(model0, OPTIMIZERS[opt], never, hg.Unrolled())
    assert hopt.hyper_steps == 2
    for k, record in enumerate(hopt.history):
        assert record.info.replay_error < 1e-14
        ref = reference(model0, OPTIMIZERS[opt], never, k)
        assert float(record.hypergrad["pen"]) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_the_functional_update_matches_torch_optim_with_gradients_missing(kind):
    """``update`` with None gradients and per-parameter counts, against ``torch.optim``
    stepping the same parameters with ``.grad = None`` at the same steps."""
    g = torch.Generator().manual_seed(1)
    ps = [torch.randn(4, generator=g, dtype=DT, requires_grad=True) for _ in range(3)]
    grads = [[torch.randn(4, generator=g, dtype=DT) for _ in ps] for _ in range(5)]
    missing = [{1}, {0, 1}, set(), {2}, {1}]  # param 1's first gradient is at step 2
    if kind == "sgd":
        opt = torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.05)
        twin = hg.optim.sgd(0.1, momentum=0.9, dampening=0.3, weight_decay=0.05)
    else:
        opt = torch.optim.Adam(ps, lr=0.1, betas=(0.8, 0.9), weight_decay=0.05)
        twin = hg.optim.adam(0.1, betas=(0.8, 0.9), weight_decay=0.05)
    p = [x.detach().clone() for x in ps]
    state = twin.init(p)
    counts = [0, 0, 0]
    for gs, skip in zip(grads, missing):
        for i, x in enumerate(ps):
            x.grad = None if i in skip else gs[i].clone()
        opt.step()
        step_grads = [None if i in skip else gs[i] for i in range(3)]
        p, state = twin.update(p, step_grads, state, list(counts))
        counts = [c + (i not in skip) for i, c in enumerate(counts)]
    for a, b in zip(p, ps):
        torch.testing.assert_close(a, b.detach(), rtol=1e-14, atol=1e-15)


def test_from_torch_keeps_each_parameters_adam_count():
    """A fresh parameter joins a trained Adam: its first update is bias-corrected from
    step 1 (as torch's), not from the others' count."""
    torch.manual_seed(0)
    a, b = (torch.randn(3, dtype=DT, requires_grad=True) for _ in range(2))
    opt = torch.optim.Adam([a, b], lr=0.1)
    for _ in range(4):
        a.grad, b.grad = torch.ones(3, dtype=DT), None
        opt.step()
    twin, state, step0 = hg.optim.from_torch(opt, [a, b])
    assert step0 == 4 and twin.offsets == [0, -4]
    start = [a.detach().clone(), b.detach().clone()]
    a.grad, b.grad = torch.full((3,), 0.5, dtype=DT), torch.full((3,), -2.0, dtype=DT)
    opt.step()
    counts = [step0 + o for o in twin.offsets]
    new, _ = twin.update(start, [a.grad, b.grad], state, counts)
    for x, y in zip(new, (a, b)):
        torch.testing.assert_close(x, y.detach(), rtol=1e-14, atol=1e-15)


def test_a_checkpoint_mid_window_keeps_the_windows_step_counts(tmp_path):
    """The window starts at step 3 (branch counts: body 3, branch 2); the checkpoint after
    step 5 (body 5, branch 3): the resumed replay must use the start's per-parameter Adam
    counts, not the live optimizer's. Hypergradients bit-equal to an uninterrupted run."""
    torch.manual_seed(0)
    model0 = Net().double()
    make = OPTIMIZERS["adam_wd"]
    straight = tuned(model0, make, USE, hg.Unrolled())

    def build():
        m = copy.deepcopy(model0)
        return m, hg.HyperOptimizer(
            m,
            {"pen": torch.tensor(1e-2, dtype=DT)},
            inner_optimizer=make(m),
            outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
            train_loss=train_loss,
            val_loss=val_loss,
            val_data=[data()[2]],
            method=hg.Unrolled(),
            inner_steps=W,
        )

    def steps(hopt, bs):
        for b in bs:
            hopt.zero_grad()
            hopt.train_loss(b).backward()
            hopt.step(b)

    model_a, hopt_a = build()
    steps(hopt_a, batches(USE)[:5])
    torch.save({"model": model_a.state_dict(), "hopt": hopt_a.state_dict()}, tmp_path / "ck")
    ck = torch.load(tmp_path / "ck", weights_only=True)
    model_b, hopt_b = build()
    model_b.load_state_dict(ck["model"])
    hopt_b.load_state_dict(ck["hopt"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)
        steps(hopt_b, batches(USE)[5:])
    got = [float(r.hypergrad["pen"]) for r in hopt_b.history]
    want = [float(r.hypergrad["pen"]) for r in straight.history]
    assert got == want and len(got) == 3
