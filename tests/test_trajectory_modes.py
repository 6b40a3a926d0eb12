"""Product modes of the trajectory methods' reverse steps (``hvp=``): first-order central
differences against double backward, the fallback of ``"auto"`` on kernels without a
double backward (scaled dot-product attention, ``@once_differentiable`` functions), and
the same dropout masks in every evaluation of a step."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hypergradient as hg

DT = torch.float64


def rel(a, b):
    fa = torch.cat([a[k].reshape(-1) for k in sorted(a)])
    fb = torch.cat([b[k].reshape(-1) for k in sorted(b)])
    return float((fa - fb).norm() / fb.norm())


def mlp_problem(dtype=DT, dropout=0.0, seed=0):
    """A 6-10-3 tanh MLP, one weight decay per tensor and the learning rate as hparams."""
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(40, 6, generator=g, dtype=DT), torch.randn(30, 6, generator=g, dtype=DT)
    y, yv = torch.randint(0, 3, (40,), generator=g), torch.randint(0, 3, (30,), generator=g)
    params0 = {
        "W1": 0.5 * torch.randn(6, 10, generator=g, dtype=DT),
        "b1": torch.zeros(10, dtype=DT),
        "W2": 0.5 * torch.randn(10, 3, generator=g, dtype=DT),
    }
    hparams = {"decay": torch.tensor([1e-2, 1e-3, 2e-2]), "lr": torch.tensor(0.3)}
    X, Xv = X.to(dtype), Xv.to(dtype)
    params0 = {k: v.to(dtype) for k, v in params0.items()}
    hparams = {k: v.to(dtype) for k, v in hparams.items()}

    def logits(p, X, train):
        z = torch.tanh(X @ p["W1"] + p["b1"])
        z = nn.functional.dropout(z, dropout, training=train and dropout > 0)
        return z @ p["W2"]

    def inner(p, h):
        decay = sum(h["decay"][i] * (v**2).sum() for i, v in enumerate(p.values()))
        return nn.functional.cross_entropy(logits(p, X, True), y) + 0.5 * decay

    def outer(p, h):
        return nn.functional.cross_entropy(logits(p, Xv, False), yv)

    return inner, outer, params0, hparams


def loop(inner, outer, params0, h, steps, opt, seed):
    """The same inner loop with plain autograd (draws from ``seed``): for finite differences."""
    torch.manual_seed(seed)
    keys = list(params0)
    p, state = [params0[k] for k in keys], None
    state = opt.init(p)
    for t in range(steps):
        leaves = [x.detach().requires_grad_(True) for x in p]
        g = torch.autograd.grad(inner(dict(zip(keys, leaves)), h), leaves)
        p, state = opt.update(p, list(g), state, t)
    return outer(dict(zip(keys, p)), h)


def central_differences(fn, h, eps=1e-6):
    out = {}
    for k, v in h.items():
        grad = torch.zeros_like(v).reshape(-1)
        for i in range(v.numel()):
            e = torch.zeros_like(v).reshape(-1)
            e[i] = eps
            plus = fn({**h, k: v + e.reshape(v.shape)})
            minus = fn({**h, k: v - e.reshape(v.shape)})
            grad[i] = (plus - minus) / (2 * eps)
        out[k] = grad.reshape(v.shape)
    return out


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_first_order_equals_double_backward_in_float64(optimizer):
    inner, outer, params0, h = mlp_problem()
    opt = (
        hg.optim.sgd(lr=h["lr"], momentum=0.9)
        if optimizer == "momentum"
        else hg.optim.adam(lr=0.05, betas=(0.9, 0.99))
    )
    double, di = hg.unrolled(inner, outer, params0, h, 12, opt, hvp="double", return_info=True)
    first, fi = hg.unrolled(inner, outer, params0, h, 12, opt, hvp="first_order", return_info=True)
    assert di.stats["hvp"] == "double" and fi.stats["hvp"] == "first_order"
    assert di.stats["hvp_fallback"] is None
    assert rel(first, double) < 1e-6
    assert float(double["decay"].abs().min()) > 0  # a test that can fail: all entries move


def test_first_order_in_float32_is_accurate_to_about_eps_two_thirds():
    inner, outer, params0, h = mlp_problem()
    ref = hg.unrolled(inner, outer, params0, h, 12, hg.optim.sgd(lr=h["lr"], momentum=0.9))
    inner32, outer32, p32, h32 = mlp_problem(torch.float32)
    opt = hg.optim.sgd(lr=h32["lr"], momentum=0.9)
    first = hg.unrolled(inner32, outer32, p32, h32, 12, opt, hvp="first_order")
    double = hg.unrolled(inner32, outer32, p32, h32, 12, opt, hvp="double")
    ref32 = {k: v.float() for k, v in ref.items()}
    assert rel(double, ref32) < 1e-5  # float32 rounding of the run itself (6e-8 measured)
    assert rel(first, ref32) < 5e-4  # plus the differences: eps^(2/3) ~ 4e-5 (5e-5 measured)


@pytest.mark.parametrize("mode", ["double", "first_order"])
def test_dropout_masks_are_the_steps_own_in_every_evaluation(mode):
    """With dropout the hypergradient is that of the loop that drew the same masks: central
    differences of that loop (each run from the same seed) agree in both modes."""
    inner, outer, params0, h = mlp_problem(dropout=0.3)
    torch.manual_seed(11)
    got = hg.unrolled(inner, outer, params0, h, 8, hg.optim.sgd(lr=h["lr"], momentum=0.5), hvp=mode)

    def fn(hh):
        return loop(inner, outer, params0, hh, 8, hg.optim.sgd(lr=hh["lr"], momentum=0.5), 11)

    assert rel(got, central_differences(fn, h)) < 1e-7
    other = loop(inner, outer, params0, h, 8, hg.optim.sgd(lr=h["lr"], momentum=0.5), 12)
    assert abs(float(other - fn(h))) > 1e-4  # other masks: another run (the test can fail)


def transformer_problem(dropout=0.0):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        d_model=8, nhead=2, dim_feedforward=16, dropout=dropout, batch_first=True
    ).to(DT)
    head = nn.Linear(8, 3).to(DT)
    g = torch.Generator().manual_seed(1)
    X, Xv = torch.randn(6, 5, 8, generator=g, dtype=DT), torch.randn(6, 5, 8, generator=g, dtype=DT)
    y, yv = torch.randint(0, 3, (6,), generator=g), torch.randint(0, 3, (6,), generator=g)
    params0 = {f"enc.{k}": v.detach().clone() for k, v in layer.named_parameters()}
    params0.update({f"head.{k}": v.detach().clone() for k, v in head.named_parameters()})

    def logits(p, X):
        enc = {k[4:]: v for k, v in p.items() if k.startswith("enc.")}
        z = functional_call(layer, enc, (X,))
        return functional_call(
            head, {k[5:]: v for k, v in p.items() if k.startswith("head.")}, (z.mean(1),)
        )

    def inner(p, h):
        decay = sum(h["decay"][i] * (v**2).sum() for i, v in enumerate(p.values()))
        return nn.functional.cross_entropy(logits(p, X), y) + 0.5 * decay

    def outer(p, h):
        return nn.functional.cross_entropy(logits(p, Xv), yv)

    return inner, outer, params0, {"decay": torch.full((len(params0),), 1e-2, dtype=DT)}


def test_transformer_encoder_layer_auto_falls_back_once_and_agrees_with_first_order():
    """Fused attention has no double backward: "double" raises torch's error, "auto" falls
    back to the math kernel (one warning naming the mode and the reason), and agrees with
    the first-order mode."""
    inner, outer, params0, h = transformer_problem()
    opt = hg.optim.sgd(lr=0.1, momentum=0.9)
    with pytest.raises(RuntimeError, match="derivative for .* is not implemented"):
        hg.unrolled(inner, outer, params0, h, 4, opt, hvp="double")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto, info = hg.unrolled(inner, outer, params0, h, 4, opt, return_info=True)
    ours = [w for w in caught if issubclass(w.category, hg.HypergradientWarning)]
    assert len(ours) == 1 and "double_math" in str(ours[0].message)
    assert "scaled_dot_product" in str(ours[0].message)
    assert info.stats["hvp"] == "double_math"
    assert "not implemented" in info.stats["hvp_fallback"]
    first = hg.unrolled(inner, outer, params0, h, 4, opt, hvp="first_order")
    assert rel(first, auto) < 1e-6
    drmad, dinfo = hg.drmad(inner, outer, params0, h, 4, opt, return_info=True, hvp="first_order")
    assert dinfo.stats["hvp"] == "first_order" and torch.isfinite(drmad["decay"]).all()


def test_transformer_with_dropout_first_order_equals_math_kernels():
    inner, outer, params0, h = transformer_problem(dropout=0.2)
    opt = hg.optim.sgd(lr=0.1)
    torch.manual_seed(5)
    math = hg.unrolled(inner, outer, params0, h, 4, opt, hvp="double_math")
    torch.manual_seed(5)
    first = hg.unrolled(inner, outer, params0, h, 4, opt, hvp="first_order")
    torch.manual_seed(6)
    other = hg.unrolled(inner, outer, params0, h, 4, opt, hvp="double_math")
    assert rel(first, math) < 1e-6
    assert rel(other, math) > 1e-3  # other masks, another hypergradient


class _Cube(torch.autograd.Function):
    """``x^3`` whose backward cannot be differentiated (``@once_differentiable``)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


def cube_problem():
    """``(make, outer, w0, h)``: a least-squares inner loss with a cube term,
    ``make(cube)`` building it from ``cube`` (``w**3`` or the once-differentiable one)."""
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(20, 4, generator=g, dtype=DT), torch.randn(20, generator=g, dtype=DT)
    w0 = 0.3 * torch.randn(4, generator=g, dtype=DT)

    def make(cube):
        def inner(w, h):
            return ((X @ w - y) ** 2).mean() + 0.1 * cube(w).sum() ** 2 / 4 + (h * w**2).sum()

        return inner

    def outer(w, h):
        return ((X @ w) ** 2).mean()

    return make, outer, w0, torch.full((4,), 0.05, dtype=DT)


def test_once_differentiable_functions_fall_back_to_first_order():
    make, outer, w0, h = cube_problem()
    opt = hg.optim.sgd(lr=0.1)
    exact = hg.unrolled(make(lambda w: w**3), outer, w0, h, 6, opt, hvp="double")
    with pytest.raises(RuntimeError, match="once_differentiable"):
        hg.unrolled(make(_Cube.apply), outer, w0, h, 6, opt, hvp="double")
    with pytest.warns(hg.HypergradientWarning, match="first_order"):
        got, info = hg.unrolled(make(_Cube.apply), outer, w0, h, 6, opt, return_info=True)
    assert info.stats["hvp"] == "first_order"
    assert float((got - exact).norm() / exact.norm()) < 1e-7


def test_bad_hvp_is_refused_naming_the_choices():
    inner, outer, params0, h = mlp_problem()
    for bad in ("second", None, 2):
        with pytest.raises(ValueError, match="`hvp` must be one of 'auto', 'double'"):
            hg.unrolled(inner, outer, params0, h, 2, hg.optim.sgd(lr=0.1), hvp=bad)
        with pytest.raises(ValueError, match="`hvp`"):
            hg.DrMAD(hvp=bad)
