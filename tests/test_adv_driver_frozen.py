"""A layer frozen by ``requires_grad_(False)`` while the inner optimizer holds all of
``model.parameters()`` (the usual fine-tuning idiom): torch never moves it (its ``.grad``
stays None), so the hyper-optimizer must treat it as frozen too.

References: the dense float64 ridge solution of the head on the frozen features (IFT), and
the identical run whose optimizer holds the head only (every method; the supported way of
freezing), which must give the same hypergradients. Before the fix the frozen layer was a
"trained" parameter: IFT solved with its Hessian block (warned of negative curvature,
wrong by 10 %), Unrolled replayed steps that moved it (replay warning), and Adam's replay
restarted from a fresh state (the frozen layer has none).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

DT = torch.float64
_g = torch.Generator().manual_seed(0)
X, Y = torch.randn(50, 4, generator=_g, dtype=DT), torch.randn(50, generator=_g, dtype=DT)
XV, YV = torch.randn(30, 4, generator=_g, dtype=DT), torch.randn(30, generator=_g, dtype=DT)
LAM = torch.tensor([0.1, 0.2, 0.3], dtype=DT)


def train_loss(m, h, batch):
    x, y = batch
    head = m[1].weight.reshape(-1)
    return 0.5 * ((m(x).reshape(-1) - y) ** 2).mean() + 0.5 * (h["lam"] * head**2).sum()


def val_loss(m, h, batch):
    x, y = batch
    return 0.5 * ((m(x).reshape(-1) - y) ** 2).mean()


def model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), torch.nn.Linear(3, 1, bias=False))
    return m.double()


def build(method, opt, lr, inner_steps, holds_all, head=None):
    m = model()
    m[0].requires_grad_(False)
    if head is not None:
        with torch.no_grad():
            m[1].weight.copy_(head.unsqueeze(0))
    params = m.parameters() if holds_all else m[1].parameters()
    inner = opt(params, lr=lr)
    hopt = hg.HyperOptimizer(
        m,
        {"lam": hg.Positive(LAM.clone())},
        inner_optimizer=inner,
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.1),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(XV, YV),
        method=method,
        inner_steps=inner_steps,
    )
    return m, hopt


def run(hopt, steps):
    for _ in range(steps):
        hopt.zero_grad()
        hopt.train_loss((X, Y)).backward()
        hopt.step((X, Y))


def test_ift_solves_on_the_trained_layer_only():
    m = model()
    F, FV = X @ m[0].weight.detach().T, XV @ m[0].weight.detach().T
    A = F.T @ F / 50 + torch.diag(LAM)
    w = torch.linalg.solve(A, F.T @ Y / 50)
    ref = -torch.linalg.solve(A, FV.T @ (FV @ w - YV) / 30) * w * LAM
    _, hopt = build(hg.IFT(hg.CG(maxiter=50, tol=1e-13)), torch.optim.SGD, 1e-15, 1, True, w)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)
        run(hopt, 1)
    assert torch.allclose(hopt.history[-1].hypergrad["lam"], ref, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize(
    "method, opt",
    [
        (hg.Unrolled, torch.optim.SGD),
        (hg.Unrolled, torch.optim.Adam),
        (hg.ForwardMode, torch.optim.SGD),
        (lambda: hg.IFT(hg.CG(maxiter=50, tol=1e-13), damping=0.1), torch.optim.Adam),
    ],
    ids=["unrolled-sgd", "unrolled-adam", "forward-sgd", "ift-adam"],
)
def test_holding_a_frozen_layer_equals_not_holding_it(method, opt):
    runs = []
    for holds_all in (True, False):
        m, hopt = build(method(), opt, 0.05, 3, holds_all)
        with warnings.catch_warnings():
            warnings.simplefilter("error", hg.HypergradientWarning)
            run(hopt, 9)
        runs.append((m, hopt))
    (m1, h1), (m2, h2) = runs
    assert h1.hyper_steps == h2.hyper_steps == 3
    for r1, r2 in zip(h1.history, h2.history):
        assert torch.allclose(r1.hypergrad["lam"], r2.hypergrad["lam"], rtol=1e-12, atol=0)
    assert torch.equal(m1[0].weight, m2[0].weight)
    assert torch.allclose(m1[1].weight, m2[1].weight, rtol=1e-12, atol=0)


def test_unfreezing_after_construction_raises_at_the_hyper_step_and_changes_nothing():
    m, hopt = build(hg.IFT(), torch.optim.SGD, 0.05, 3, True)
    run(hopt, 2)
    m[0].requires_grad_(True)
    weights = [p.detach().clone() for p in m.parameters()]
    raw = hopt.raw_hparams()[0].detach().clone()
    hopt.zero_grad()
    hopt.train_loss((X, Y)).backward()
    with pytest.raises(ValueError, match=r"newly trained: \[.0.weight.\]"):
        hopt.step((X, Y))
    assert hopt.loop.count == 2 and hopt.hyper_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(weights, m.parameters()))
    assert torch.equal(hopt.raw_hparams()[0], raw)


def _step_raises_and_changes_nothing(m, hopt, match):
    weights = [p.detach().clone() for p in m.parameters()]
    raw = hopt.raw_hparams()[0].detach().clone()
    count = hopt.loop.count
    hopt.zero_grad()
    hopt.train_loss((X, Y)).backward()
    with pytest.raises(ValueError, match=match):
        hopt.step((X, Y))
    assert hopt.loop.count == count and hopt.hyper_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(weights, m.parameters()))
    assert torch.equal(hopt.raw_hparams()[0], raw)


def test_gradual_unfreezing_by_add_param_group_raises_before_the_hyper_step():
    """ULMFiT-style unfreezing: the layer joins the optimizer later. Before: the hyper-step
    ran with it as a constant and its rollback snapshot did not cover it (a failed
    hyper-step left the layer stepped)."""
    m, hopt = build(hg.IFT(), torch.optim.SGD, 0.05, 3, False)
    run(hopt, 2)
    m[0].requires_grad_(True)
    hopt.inner_optimizer.add_param_group({"params": [m[0].weight]})
    _step_raises_and_changes_nothing(m, hopt, r"newly trained: \['0.weight'\]")


def test_a_replaced_submodule_raises_before_the_hyper_step():
    m, hopt = build(hg.Unrolled(), torch.optim.SGD, 0.05, 3, True)
    run(hopt, 2)
    old = m[1]
    m[1] = torch.nn.Linear(3, 1, bias=False).double()
    hopt.inner_optimizer.param_groups[0]["params"] = [m[0].weight, m[1].weight]
    with pytest.raises(ValueError, match=r"replaced: \['1.weight'\]"):
        hopt.step((X, Y))
    assert hopt.loop.count == 2 and old.weight is not m[1].weight
