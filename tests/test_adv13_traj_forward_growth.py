"""Forward mode measures the instability Unrolled measures by its adjoint.

Forward mode carried no check: Adam started at the inner optimum (tiny gradients, so the
update's derivative ~ 1/|g|) returned a hypergradient of 2.07e12 with ``status ==
"fixed_budget"`` and no warning, where Unrolled reports its adjoint's 1.1e14-fold growth;
in ``HyperOptimizer`` the hypergradient of a chaotic window (Nesterov SGD, lr 0.2, 30 steps
of a tanh MLP: 4e14) was applied even with ``on_divergence="skip"``. Forward mode now
carries one more tangent, a probe without a hyperparameter's source, whose growth is
``stats["tangent_growth"]`` under the adjoint's threshold. References: the loop written
by hand and differentiated by autograd, central differences; healthy runs get no warning.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergradient as hg
from hypergradient.methods.growth import ADJOINT_GROWTH

DT = torch.float64
GEN = torch.Generator().manual_seed(0)
A, B = torch.randn(10, 4, generator=GEN, dtype=DT), torch.randn(10, generator=GEN, dtype=DT)
AV, BV = torch.randn(10, 4, generator=GEN, dtype=DT), torch.randn(10, generator=GEN, dtype=DT)
PHI = 0.4
OPTIMUM = torch.linalg.solve(A.T @ A / 10 + PHI * torch.eye(4, dtype=DT), A.T @ B / 10)


def inner(t, p):
    return 0.5 * ((A @ t - B) ** 2).mean() + 0.5 * p * (t**2).sum()


def outer(t, p):
    return 0.5 * ((AV @ t - BV) ** 2).mean()


def by_hand(p, start, steps=3, lr=0.1):
    """Adam (betas 0.9, 0.999, eps 1e-8) written out; differentiable in ``p``."""
    t, m, v = start.clone(), torch.zeros(4, dtype=DT), torch.zeros(4, dtype=DT)
    for s in range(steps):
        if not t.requires_grad:
            t = t.requires_grad_(True)
        g = torch.autograd.grad(inner(t, p), t, create_graph=True)[0]
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        mhat, vhat = m / (1 - 0.9 ** (s + 1)), v / (1 - 0.999 ** (s + 1))
        t = t - lr * mhat / (vhat.sqrt() + 1e-8)
    return outer(t, p)


def reference(start):
    p = torch.tensor(PHI, dtype=DT, requires_grad=True)
    return float(torch.autograd.grad(by_hand(p, start), p)[0])


def call(method, start):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g, info = method(
            inner, outer, start, torch.tensor(PHI, dtype=DT), 3, hg.optim.adam(0.1),
            return_info=True,
        )  # fmt: skip
    return float(g), info, [w for w in caught if "of no use" in str(w.message)]


@pytest.mark.parametrize("method", [hg.forward_mode, hg.unrolled], ids=["forward", "unrolled"])
def test_adam_started_at_the_optimum_is_flagged_by_both_modes(method):
    exact = reference(OPTIMUM)
    assert abs(exact) > 1e12  # the exact derivative of this run: 2.07e12
    got, info, unstable = call(method, OPTIMUM)
    assert got == pytest.approx(exact, rel=1e-9)
    assert info.status == hg.Status.DIVERGED and info.stats["unstable"]
    key = "tangent_growth" if method is hg.forward_mode else "adjoint_growth"
    assert info.stats[key] >= ADJOINT_GROWTH
    assert len(unstable) == 1


@pytest.mark.parametrize("method", [hg.forward_mode, hg.unrolled], ids=["forward", "unrolled"])
def test_adam_from_a_random_start_is_not_flagged(method):
    start = torch.randn(4, generator=torch.Generator().manual_seed(3), dtype=DT)
    exact = reference(start)
    eps = 1e-6
    fd = (by_hand(PHI + eps, start) - by_hand(PHI - eps, start)).item() / (2 * eps)
    assert exact == pytest.approx(fd, rel=1e-6)
    got, info, unstable = call(method, start)
    assert got == pytest.approx(exact, rel=1e-9)
    assert info.status == hg.Status.FIXED_BUDGET and not unstable
    if method is hg.forward_mode:
        assert 0 < info.stats["tangent_growth"] < 100


def test_the_probe_leaves_the_global_random_state_alone():
    before = torch.get_rng_state()
    call(hg.forward_mode, OPTIMUM + 1.0)
    assert torch.equal(torch.get_rng_state(), before)


# ---- HyperOptimizer: the chaotic window is skipped with on_divergence="skip" ----------------
G = torch.Generator().manual_seed(0)
X, Y = torch.randn(64, 4, generator=G, dtype=DT), torch.randn(64, 1, generator=G, dtype=DT)
VAL = (torch.randn(16, 4, generator=G, dtype=DT), torch.randn(16, 1, generator=G, dtype=DT))
torch.manual_seed(0)
NET = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
K = 30


def train_loss(m, h, b):
    return F.mse_loss(m(b[0]), b[1]) + h["pen"] * (m[0].weight ** 2).sum()


def val_loss(m, h, b):
    return F.mse_loss(m(b[0]), b[1])


def hyperoptimize(method, lr, on_divergence):
    model = copy.deepcopy(NET)
    h = {"lr": torch.tensor(lr, dtype=DT), "pen": torch.tensor(0.01, dtype=DT)}
    inner_opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    hopt = hg.HyperOptimizer(
        model, h, inner_optimizer=inner_opt,
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=1e-18),
        train_loss=train_loss, val_loss=val_loss, val_data=VAL, method=method,
        inner_steps=K, optimizer_hparams={"lr": "lr"}, on_divergence=on_divergence,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(K):
            b = (X[(4 * i) % 64 :][:4], Y[(4 * i) % 64 :][:4])
            hopt.zero_grad()
            hopt.train_loss(b).backward()
            hopt.step(b)
    return hopt, [str(w.message) for w in caught if "of no use" in str(w.message)]


@pytest.mark.parametrize("method", [hg.ForwardMode, hg.Unrolled])
def test_a_chaotic_window_is_skipped(method):
    hopt, unstable = hyperoptimize(method(), 0.2, "skip")
    assert hopt.skipped == 1 and hopt.hyper_steps == 0
    assert float(hopt.hparams["lr"]) == 0.2  # nothing applied
    assert len(unstable) == 1


def test_a_chaotic_window_is_reported_with_the_same_hypergradient():
    fm, unstable = hyperoptimize(hg.ForwardMode(), 0.2, "warn")
    un, _ = hyperoptimize(hg.Unrolled(), 0.2, "warn")
    got, want = fm.history[-1], un.history[-1]
    assert float(got.hypergrad["lr"]) == pytest.approx(float(want.hypergrad["lr"]), rel=1e-8)
    assert abs(float(got.hypergrad["lr"])) > 1e12
    assert got.info.status == hg.Status.DIVERGED and len(unstable) == 1
    assert got.info.stats["tangent_growth"] >= ADJOINT_GROWTH


def test_a_healthy_window_is_applied_without_a_warning():
    fm, unstable = hyperoptimize(hg.ForwardMode(), 0.02, "skip")
    un, _ = hyperoptimize(hg.Unrolled(), 0.02, "skip")
    assert fm.hyper_steps == 1 and fm.skipped == 0 and not unstable
    got, want = fm.history[-1], un.history[-1]
    assert got.info.status == hg.Status.FIXED_BUDGET
    assert got.info.stats["tangent_growth"] < 100
    for name in ("lr", "pen"):
        assert float(got.hypergrad[name]) == pytest.approx(float(want.hypergrad[name]), rel=1e-9)


def test_watch_false_skips_the_probe_and_says_so():
    h = torch.tensor(PHI, dtype=DT)
    g, info = hg.forward_mode(
        inner, outer, OPTIMUM, h, 3, hg.optim.adam(0.1), watch=False, return_info=True
    )
    assert float(g) == pytest.approx(reference(OPTIMUM), rel=1e-9)  # the same number
    assert info.stats["tangent_growth"] is None and info.status == hg.Status.FIXED_BUDGET
    assert info.stats["products"] == 3  # one direction, no probe
    with pytest.raises(TypeError, match="watch"):
        hg.ForwardMode(watch="yes")


def test_a_net_with_dropout_and_batch_norm_is_not_flagged():
    """Minibatches, dropout (the probe leaves the replayed masks alone) and batch norm."""
    gen = torch.Generator().manual_seed(5)
    xs, ys = torch.randn(96, 4, generator=gen, dtype=DT), torch.randn(96, 1, generator=gen)

    def run(method):
        torch.manual_seed(1)
        model = nn.Sequential(
            nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1)
        ).double()
        h = {"lr": torch.tensor(0.05, dtype=DT), "pen": torch.tensor(1e-3, dtype=DT)}
        hopt = hg.HyperOptimizer(
            model, h, inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.0), train_loss=train_loss,
            val_loss=val_loss, val_data=VAL, method=method, inner_steps=12,
            optimizer_hparams={"lr": "lr"}, on_divergence="skip",
        )  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(24):
                b = (xs[(8 * i) % 96 :][:8], ys[(8 * i) % 96 :][:8].double())
                hopt.zero_grad()
                hopt.train_loss(b).backward()
                hopt.step(b)
        return hopt, [w for w in caught if "of no use" in str(w.message)]

    fm, unstable = run(hg.ForwardMode())
    un, _ = run(hg.Unrolled())
    assert fm.hyper_steps == 2 and fm.skipped == 0 and not unstable
    for got, want in zip(fm.history, un.history):
        assert got.info.status == hg.Status.FIXED_BUDGET
        assert got.info.stats["tangent_growth"] < 100
        for name in ("lr", "pen"):
            assert float(got.hypergrad[name]) == pytest.approx(
                float(want.hypergrad[name]), rel=1e-7
            )
