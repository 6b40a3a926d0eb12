"""T1T2 in ``HyperOptimizer`` differentiates the step ``torch.optim.Adam``/``AdamW`` took.

T1T2 took the learning rate alone as the step's derivative in the gradient (its documented
"usual approximation"): 0.11 times the one-step hypergradient on a small MLP (0.00174 for
0.01585). Adam's step is elementwise, so its derivative in ``g`` is a diagonal: the
hyper-optimizer now passes it as per-entry rates (``Problem.lr`` items that are tensors of
their leaves' shapes), from the moments and step count before the step. Checked against a
float64 central difference of the validation loss after one real torch step from the same
weights and optimizer state, over Adam/AdamW, AMSGrad, weight decay, param groups, first
and later steps; and ``Problem.lr`` of per-entry tensors against autograd through the step.
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
G = torch.Generator().manual_seed(2)
X, Y = torch.randn(16, 4, generator=G, dtype=DT), torch.randn(16, 1, generator=G, dtype=DT)
XV, YV = torch.randn(16, 4, generator=G, dtype=DT), torch.randn(16, 1, generator=G, dtype=DT)
BATCHES = [(X[i : i + 8], Y[i : i + 8]) for i in (0, 8)]
PEN = torch.tensor([0.05, 0.02], dtype=DT)


def train_loss(m, h, b):
    pen = h["pen"]
    first, second = (m[0].weight ** 2).sum(), (m[2].weight ** 2).sum()
    return F.mse_loss(m(b[0]), b[1]) + pen[0] * first + pen[1] * second


def val_loss(m, h, b):
    return F.mse_loss(m(b[0]), b[1])


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).double()


def make(model, kind, kw, groups):
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    if not groups:
        return cls(model.parameters(), lr=0.01, **kw)
    first = [model[0].weight, model[0].bias]
    second = [model[2].weight, model[2].bias]
    return cls([{"params": first}, {"params": second, "lr": 0.003}], lr=0.01, **kw)


def run(kind, kw, steps, groups=False, method=None):
    model = net()
    inner = make(model, kind, kw, groups)
    hopt = hg.HyperOptimizer(
        model,
        {"pen": PEN.clone()},
        inner_optimizer=inner,
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(XV, YV),
        method=method or hg.T1T2(),
        inner_steps=1,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(steps):
            batch = BATCHES[t % 2]
            weights = copy.deepcopy(model.state_dict())
            state = copy.deepcopy(inner.state_dict())
            hopt.zero_grad()
            hopt.train_loss(batch).backward()
            hopt.step(batch)
    hyper = hopt.history[-1].hypergrad["pen"].detach().clone()
    caught = [w for w in caught if issubclass(w.category, hg.HypergradientWarning)]
    return hyper, (weights, state, batch), caught


def after_one_step(pen, kind, kw, groups, weights, state, batch):
    model = net()
    model.load_state_dict(weights)
    inner = make(model, kind, kw, groups)
    inner.load_state_dict(copy.deepcopy(state))
    inner.zero_grad()
    train_loss(model, {"pen": pen}, batch).backward()
    inner.step()
    with torch.no_grad():
        return float(val_loss(model, None, (XV, YV)))


def finite_difference(kind, kw, groups, at, h=1e-6):
    out = []
    for i in range(PEN.numel()):
        e = torch.zeros_like(PEN)
        e[i] = h
        up = after_one_step(PEN + e, kind, kw, groups, *at)
        down = after_one_step(PEN - e, kind, kw, groups, *at)
        out.append((up - down) / (2 * h))
    return torch.tensor(out, dtype=DT)


FLAGS = [
    ("adam", {}),
    ("adam", {"amsgrad": True}),
    ("adam", {"weight_decay": 0.1}),
    ("adam", {"betas": (0.5, 0.9), "eps": 1e-3, "weight_decay": 0.05, "amsgrad": True}),
    ("adamw", {}),
    ("adamw", {"weight_decay": 0.1, "amsgrad": True}),
]


@pytest.mark.parametrize("groups", [False, True], ids=["one_group", "two_groups"])
@pytest.mark.parametrize("steps", [1, 4], ids=["first_step", "warm_moments"])
@pytest.mark.parametrize("kind,kw", FLAGS, ids=lambda v: str(v))
def test_t1t2_is_the_derivative_of_the_real_adam_step(kind, kw, steps, groups):
    hyper, at, caught = run(kind, kw, steps, groups)
    exact = finite_difference(kind, kw, groups, at)
    scale = float(exact.abs().max())
    torch.testing.assert_close(hyper, exact, rtol=1e-5, atol=1e-6 * scale + 1e-10)
    assert not caught, [str(w.message) for w in caught]


def test_the_probe_number_equals_unrolled_over_one_step():
    t1t2 = run("adam", {}, 4)[0]
    unrolled = run("adam", {}, 4, method=hg.Unrolled())[0]
    torch.testing.assert_close(t1t2, unrolled, rtol=1e-9, atol=1e-12)


def _problem(rates):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 3, generator=g, dtype=DT)
    theta = [torch.randn(3, generator=g, dtype=DT), torch.randn((), generator=g, dtype=DT)]
    h = torch.tensor([0.3, 0.7], dtype=DT)

    def f(p, hh):
        return ((a @ p[0] + p[1]) ** 2).mean() + hh[0] * (p[0] ** 2).sum() + hh[1] * p[1] ** 2

    def gval(p, hh):
        return ((a @ p[0] - 1.0) ** 2).mean() + (p[1] - 0.5) ** 2

    return f, gval, theta, h


def test_per_entry_rates_are_autograd_through_the_diagonal_step():
    """``Problem.lr`` with a tensor item (any sign) and a number: the step
    ``theta - R grad f`` differentiated by autograd in float64."""
    rates = [torch.tensor([0.1, -0.02, 0.0], dtype=DT), 0.05]
    f, gval, theta, h = _problem(rates)
    hh = h.clone().requires_grad_(True)
    p = [t.clone().requires_grad_(True) for t in theta]
    grads = torch.autograd.grad(f(p, hh), p, create_graph=True)
    after = [p[0] - rates[0] * grads[0], p[1] - rates[1] * grads[1]]
    exact = torch.autograd.grad(gval(after, hh), hh)[0]
    after = [t.detach() for t in after]
    for mixed in ("params", "hparams"):
        problem = hg.Problem(f, gval, after, h, lr=rates, prev_params=theta)
        got, info = hg.T1T2(mixed=mixed)(problem)
        torch.testing.assert_close(got, exact, rtol=1e-12, atol=1e-14)
        assert "per-entry" in info.solver


@pytest.mark.parametrize(
    ("rates", "error", "match"),
    [
        ([torch.ones(2, dtype=DT), 0.1], ValueError, r"`lr\[0\]` has shape \(2,\)"),
        ([torch.tensor([1.0, float("nan"), 0.0]), 0.1], ValueError, "non-finite"),
        ([torch.ones(3, dtype=torch.long), 0.1], TypeError, "floating point"),
    ],
)
def test_bad_per_entry_rates_are_refused(rates, error, match):
    f, gval, theta, h = _problem(rates)
    with pytest.raises(error, match=match):
        hg.T1T2()(hg.Problem(f, gval, theta, h, lr=rates, prev_params=theta))


def test_ift_refuses_per_entry_rates():
    rates = [torch.ones(3, dtype=DT), 0.1]
    f, gval, theta, h = _problem(rates)
    with pytest.raises(ValueError, match="per-entry rates"):
        hg.IFT()(hg.Problem(f, gval, theta, h, lr=rates))
