"""T1T2's mixed product in either order (``hypergradient.methods.mixed_order``).

``mixed="hparams"`` records ``grad_phi f`` and differentiates it along ``x``; ``"params"``
records ``grad_theta f`` and differentiates ``<grad_theta f, x>`` in ``phi``; ``"auto"``
measures which share of ``f``'s graph leads to ``phi``. Every hypergradient is compared with
autograd through the inner step (float64, 1e-12) and across orders; the cost claim (no
backward pass over the network for a penalty hyperparameter) is counted by a pass-through
autograd function inside the network.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hypergradient as hg
from hypergradient.methods import mixed_order
from once_diff import Cube
from registry import rel

DT = torch.float64


class Count(torch.autograd.Function):
    """The identity, counting its backward passes (double-differentiable)."""

    calls = 0

    @staticmethod
    def forward(x):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        Count.calls += 1
        return grad.view_as(grad)


def data(seed=0, n=24, nv=18, d=5, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(n, d, generator=g, dtype=DT), torch.randn(nv, d, generator=g, dtype=DT)
    y, yv = torch.randn(n, generator=g, dtype=DT), torch.randn(nv, generator=g, dtype=DT)
    return [t.to(dtype) for t in (X, y, Xv, yv)]


def net(p, X, scale=None):
    hidden = torch.tanh(Count.apply((X if scale is None else X * scale) @ p["W"].T + p["b"]))
    return hidden @ p["v"]


def problem(kind, seed=0, lr=0.3, d=5, width=7, dtype=DT):
    """``kind``: where the hyperparameters enter ``f``. "penalty" (per-weight decay and a
    bias on one leaf), "examples" (per-example weights of the loss), "input" (a per-feature
    input scale), "mixed" (all three, plus a temperature in ``g`` only and a shift in both)."""
    X, y, Xv, yv = data(seed, d=d, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    p0 = {
        "W": 0.5 * torch.randn(width, d, generator=g, dtype=DT),
        "b": 0.1 * torch.randn(width, generator=g, dtype=DT),
        "v": 0.5 * torch.randn(width, generator=g, dtype=DT),
    }
    h = {
        "decay": torch.full((width, d), -1.0, dtype=DT),
        "weights": torch.linspace(0.5, 1.5, len(y), dtype=DT),
        "scale": torch.linspace(0.8, 1.2, d, dtype=DT),
        "shift": torch.tensor(0.1, dtype=DT),
        "temp": torch.tensor(1.3, dtype=DT),
    }
    p0 = {k: v.to(dtype) for k, v in p0.items()}
    h = {k: v.to(dtype) for k, v in h.items()}
    keep = {
        "penalty": ("decay",),
        "examples": ("weights",),
        "input": ("scale",),
        "mixed": tuple(h),
    }[kind]
    h = {k: h[k] for k in keep}

    def f(p, h):
        out = net(p, X, h.get("scale"))
        res = (out - y - h.get("shift", 0.0)) ** 2
        fit = 0.5 * (h["weights"] * res).mean() if "weights" in h else 0.5 * res.mean()
        pen = 0.5 * (h["decay"].exp() * p["W"] ** 2).sum() if "decay" in h else 0.0
        return fit + pen + 0.05 * (p["v"] ** 2).sum()

    def g_(p, h):
        res = net(p, Xv, h.get("scale")) - yv - h.get("shift", 0.0)
        return 0.5 * (h.get("temp", 1.0) * res**2).mean()

    grads = torch.func.grad(f)(p0, h)
    after = {k: p0[k] - lr * grads[k] for k in p0}
    return hg.Problem(f, g_, after, h, lr=lr, prev_params=p0)


def through_the_step(pb):
    """``d g(theta - lr grad f(theta, h), h) / dh`` by autograd through the step."""
    h = {k: v.detach().clone().requires_grad_(True) for k, v in pb.hparams.items()}
    w = {k: v.detach().clone().requires_grad_(True) for k, v in pb.prev_params.items()}
    grads = torch.autograd.grad(pb.inner_loss(w, h), list(w.values()), create_graph=True)
    after = {k: v - pb.lr * gk for (k, v), gk in zip(w.items(), grads)}
    out = torch.autograd.grad(pb.outer_loss(after, h), list(h.values()), allow_unused=True)
    return {k: torch.zeros_like(h[k]) if o is None else o for k, o in zip(h, out)}


@pytest.mark.parametrize("kind", ["penalty", "examples", "input", "mixed"])
@pytest.mark.parametrize("mixed", ["params", "hparams", "auto"])
def test_every_order_is_the_derivative_through_the_step(kind, mixed):
    pb = problem(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, info = hg.T1T2(mixed=mixed)(pb)
    exact = through_the_step(pb)
    for k in exact:
        assert rel(out[k], exact[k]) < 1e-12, (k, rel(out[k], exact[k]))
    assert info.stats["hvp"] == "double" and info.num_hvps == 0
    ran = info.stats["mixed"]
    on_input = kind in ("input", "mixed")  # most of f's graph leads to the input scale
    assert ran == (mixed if mixed != "auto" else ("params" if on_input else "hparams"))
    assert math.isnan(info.inner_grad_norm) == (ran == "hparams")
    if ran == "params":
        gf = torch.func.grad(pb.inner_loss)(pb.prev_params, pb.hparams)
        flat = torch.cat([t.reshape(-1) for t in gf.values()])
        assert info.inner_grad_norm == pytest.approx(float(flat.norm()), rel=1e-12)


def test_the_share_on_path_tells_a_penalty_from_an_input_hyperparameter():
    shares = {}
    for kind in ("penalty", "examples", "input"):
        pb = problem(kind)
        p = {k: v.detach().requires_grad_() for k, v in pb.prev_params.items()}
        h = {k: v.detach().requires_grad_() for k, v in pb.hparams.items()}
        f = pb.inner_loss(p, h)
        shares[kind] = mixed_order.on_path_share(f.grad_fn, list(h.values()))
    assert shares["penalty"] < 0.3 and shares["examples"] < 0.5 < shares["input"] <= 1.0
    assert mixed_order.on_path_share(None, []) == 1.0


def test_a_penalty_hyperparameter_runs_no_backward_over_the_network():
    """The cost claim: with the hyperparameters first only the validation gradient goes back
    through the network; with the parameters first ``grad_theta f`` does too."""
    pb = problem("penalty")
    counts = {}
    for mixed in ("hparams", "params"):
        Count.calls = 0
        hg.T1T2(mixed=mixed)(pb)
        counts[mixed] = Count.calls
    assert counts == {"hparams": 1, "params": 2}


def test_auto_decides_once_per_problem_shape(monkeypatch):
    calls = []
    real = mixed_order.on_path_share

    def spy(root, targets):
        calls.append(1)
        return real(root, targets)

    monkeypatch.setattr("hypergradient.methods.t1t2.on_path_share", spy)
    method = hg.T1T2()
    for _ in range(3):
        method(problem("penalty"))
    assert len(calls) == 1
    _, info = method(problem("penalty", d=6))  # another shape: decided again
    assert len(calls) == 2 and info.stats["mixed"] == "hparams"
    assert method.state_dict() == {}  # a choice of speed, not state
    assert method.config() == {"hvp": "auto", "mixed": "auto"}


def test_a_once_differentiable_function_falls_back_where_its_derivative_is_needed():
    """Cube's backward cannot be differentiated. On the penalty's path both orders need it
    and fall back to first-order products (warned); on ``v`` alone only the parameters-first
    order records it, the hyperparameters-first one stays exact."""
    base = problem("penalty")
    f0, g0 = base.inner_loss, base.outer_loss

    def on_penalty(p, h):
        return f0(p, h) + 1e-2 * (h["decay"].exp() * Cube.apply(p["W"])).sum()

    def on_v(p, h):
        return f0(p, h) + 1e-2 * Cube.apply(p["v"]).sum()

    def make(f):
        p = {k: v.detach().requires_grad_() for k, v in base.prev_params.items()}
        grads = torch.autograd.grad(f(p, base.hparams), list(p.values()))
        after = {k: base.prev_params[k] - base.lr * gk for k, gk in zip(p, grads)}
        return hg.Problem(f, g0, after, base.hparams, lr=base.lr, prev_params=base.prev_params)

    pb = make(on_penalty)
    results = {}
    for mixed in ("hparams", "params"):
        with pytest.warns(hg.HypergradientWarning, match="double backward"):
            results[mixed], info = hg.T1T2(mixed=mixed)(pb)
        assert info.stats["hvp"] == "first_order" and info.stats["mixed"] == "params"
    assert rel(results["hparams"]["decay"], results["params"]["decay"]) < 1e-12
    pb = make(on_v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, info = hg.T1T2(mixed="hparams")(pb)
    assert info.stats["hvp"] == "double" and info.stats["mixed"] == "hparams"
    assert rel(out["decay"], through_the_step(pb)["decay"]) < 1e-12


def test_float32_orders_agree_to_float32_rounding():
    pb, pb32 = problem("mixed"), problem("mixed", dtype=torch.float32)
    a, _ = hg.T1T2(mixed="hparams")(pb32)
    b, _ = hg.T1T2(mixed="params")(pb32)
    exact = through_the_step(pb)
    for k in exact:
        assert a[k].dtype == torch.float32
        assert rel(a[k].double(), exact[k]) < 1e-5 and rel(a[k], b[k]) < 1e-5


def test_an_unused_hyperparameter_warns_in_either_order():
    pb = problem("penalty")
    f0 = pb.inner_loss
    h = dict(pb.hparams, idle=torch.tensor(2.0, dtype=DT))
    pb = hg.Problem(f0, pb.outer_loss, pb.params, h, lr=pb.lr, prev_params=pb.prev_params)
    for mixed in ("hparams", "params"):
        with pytest.warns(hg.HypergradientWarning, match="idle"):
            out, _ = hg.T1T2(mixed=mixed)(pb)
        assert float(out["idle"]) == 0.0
        assert rel(out["decay"], through_the_step(pb)["decay"]) < 1e-12


def test_bad_orders_are_refused():
    with pytest.raises(ValueError, match="mixed"):
        hg.T1T2(mixed="reverse")
    with pytest.raises(ValueError, match="mixed"):
        hg.T1T2(mixed=1)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    kind=st.sampled_from(["penalty", "examples", "input", "mixed"]),
    d=st.integers(1, 6),
    width=st.integers(1, 6),
    lr=st.floats(0.01, 1.0),
)
def test_random_problems_agree_across_orders(seed, kind, d, width, lr):
    pb = problem(kind, seed=seed, lr=lr, d=d, width=width)
    a, _ = hg.T1T2(mixed="hparams")(pb)
    b, _ = hg.T1T2(mixed="params")(pb)
    exact = through_the_step(pb)
    for k in exact:
        scale = max(float(exact[k].abs().max()), 1e-300)
        assert float((a[k] - exact[k]).abs().max()) <= 1e-10 * scale + 1e-14
        assert float((a[k] - b[k]).abs().max()) <= 1e-10 * scale + 1e-14


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.2))
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.body(x)).squeeze(-1)


@pytest.mark.parametrize("mixed", ["hparams", "params"])
def test_hyperoptimizer_with_batchnorm_and_dropout_takes_either_order(mixed):
    """The same run (BatchNorm in train mode, dropout) with each order: the same
    hyperparameters after every hyper-step, to float64 rounding."""

    def run(order):
        torch.manual_seed(0)
        model = BNNet().double()
        g = torch.Generator().manual_seed(1)
        X, y = torch.randn(32, 6, generator=g, dtype=DT), torch.randn(32, generator=g, dtype=DT)
        decay = hg.Positive(torch.full((8, 6), 1e-2, dtype=DT))
        hopt = hg.HyperOptimizer(
            model,
            {"decay": decay},
            train_loss=lambda m, h, b: (
                ((m(b[0]) - b[1]) ** 2).mean() + 0.5 * (h["decay"] * m.body[0].weight ** 2).sum()
            ),
            val_loss=lambda m, h, b: ((m(b[0]) - b[1]) ** 2).mean(),
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
            outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=1.0),
            method=hg.T1T2(mixed=order),
            inner_steps=3,
            val_data=(X[16:], y[16:]),
        )
        for _ in range(9):
            hopt.zero_grad()
            hopt.train_loss((X[:16], y[:16])).backward()
            hopt.step((X[:16], y[:16]))
        return hopt.hparams["decay"].detach().clone(), hopt.history[-1].info

    ref, ref_info = run("params")
    got, info = run(mixed)
    assert info.stats["mixed"] == mixed and ref_info.stats["mixed"] == "params"
    assert rel(got, ref) < 1e-12 and not torch.equal(got, torch.full_like(got, 1e-2))
