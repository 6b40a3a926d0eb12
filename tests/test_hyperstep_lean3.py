"""The leaner hyper-step (issue 11, goal 5): T1T2's direct path without a flat ``b``, and the
driver's divergence read and single-hyperparameter domain test.

T1T2's direct path writes ``x = lr * b`` leaf by leaf from ``grad_theta g`` (a leaf ``g``
does not reach is zero; a half-precision leaf is widened before the product, as the formula
does), forms ``d_phi g - mixed`` per hyperparameter leaf (a missing term is zero, ``0 - m``
rounds as the formula's flat difference), reads ``||x||`` (``outer_grad_norm = ||x|| / lr``),
``||grad_theta f||`` from its leaves' norms, ``f``, ``g`` and one sum per hypergradient leaf
in one synchronisation, and hands a non-finite read, or an ``x`` too small for ``||x|| / lr``
to be ``||b||`` to rounding, to the general formula. Each test compares with the general
formula (what T1T2 computed before the direct path) and with autograd through the step.
These are the parameters-first order's (``mixed="params"``: it computes ``grad_theta f``);
``tests/test_t1t2_mixed_order.py`` checks the hyperparameters-first order.
"""

from __future__ import annotations

import math

import pytest
import torch

import hypergradient as hg
from hypergradient.hyperoptimizer import divergence
from hypergradient.hyperoptimizer.hparams import HyperParameters
from hypergradient.methods import t1t2
from hypergradient.methods.implicit_base import ImplicitMethod
from registry import rel

DT = torch.float64


def general(problem):
    """The general implicit formula's answer."""
    return ImplicitMethod.__call__(hg.T1T2(), problem)


def through_the_step(problem):
    """``d g(theta - lr grad f(theta, h), h) / dh`` by autograd through the step."""
    h = {k: v.detach().clone().requires_grad_(True) for k, v in problem.hparams.items()}
    w = {k: v.detach().clone().requires_grad_(True) for k, v in problem.prev_params.items()}
    grads = torch.autograd.grad(problem.inner_loss(w, h), list(w.values()), create_graph=True)
    after = {k: v - problem.lr * gk for (k, v), gk in zip(w.items(), grads)}
    out = torch.autograd.grad(problem.outer_loss(after, h), list(h.values()), allow_unused=True)
    return {k: torch.zeros_like(h[k]) if o is None else o for k, o in zip(h, out)}


#: Features making the first layer (3 x LARGE_FEATURES) large enough for the leaf-by-leaf
#: ``x`` and the float32 norms by rows (t1t2.LARGE entries), with a remainder after rows.
LARGE_FEATURES = 11_000


def data(dtype=DT, seed=3, features=4):
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(20, features, generator=g), torch.randn(15, features, generator=g)
    X, Xv = X / math.sqrt(features), Xv / math.sqrt(features)
    y, yv = torch.randn(20, generator=g), torch.randn(15, generator=g)
    W = 0.5 * torch.randn(3, features, generator=g)
    v = 0.5 * torch.randn(3, generator=g)
    return [t.to(dtype) for t in (X, Xv, y, yv, W, v)]


def make_problem(dtype=DT, outer_scale=1.0, lr=0.3, features=4):
    """Two parameter leaves (``W``, ``v``) and an idle third (``u``: in ``f`` only, so
    ``grad_theta g`` misses it); three hyperparameters: ``decay`` (in ``f``: a mixed term
    only), ``shift`` (in ``f`` and ``g``: both terms), ``temp`` (in ``g`` only: the direct
    term only)."""
    X, Xv, y, yv, W, v = data(dtype, features=features)
    u = torch.linspace(-1.0, 1.0, 5, dtype=dtype)

    def f(p, h):
        out = torch.tanh(X @ p["W"].T) @ p["v"]
        fit = 0.5 * ((out - y - h["shift"]) ** 2).mean()
        return fit + 0.5 * (h["decay"].exp() * p["W"] ** 2).sum() + 0.5 * (p["u"] ** 2).sum()

    def g(p, h):
        out = torch.tanh(Xv @ p["W"].T) @ p["v"]
        loss = 0.5 * (h["temp"] * (out - yv - h["shift"]) ** 2).mean()
        return outer_scale * loss

    before = {"W": W, "v": v, "u": u}
    hparams = {
        "decay": torch.full((3, features), -1.5, dtype=dtype),
        "shift": torch.tensor(0.2, dtype=dtype),
        "temp": torch.tensor([1.3], dtype=dtype),
    }
    grads = torch.func.grad(f)(before, hparams)
    after = {k: before[k] - lr * grads[k] for k in before}
    return hg.Problem(f, g, after, hparams, lr=lr, prev_params=before)


@pytest.mark.parametrize("features", [4, LARGE_FEATURES], ids=["small", "large"])
def test_every_leaf_case_equals_the_general_formula_and_autograd_through_the_step(features):
    problem = make_problem(features=features)
    assert (problem.params["W"].numel() >= t1t2.LARGE) == (features == LARGE_FEATURES)
    out, info = hg.T1T2(mixed="params")(problem)
    ref, ref_info = general(problem)
    exact = through_the_step(problem)
    for k in exact:
        assert rel(out[k], exact[k]) < 1e-12, k
        assert torch.equal(out[k], ref[k]), k  # the same roundings as the flat formula
        assert out[k].shape == problem.hparams[k].shape and out[k].is_contiguous()
    # the idle leaf u: its part of x = lr b is exactly zero
    n = problem.params["W"].numel() + problem.params["v"].numel()
    assert torch.equal(info.solution[n:], torch.zeros(5, dtype=DT))
    assert info.solution.numel() == n + 5
    assert torch.equal(info.solution, ref_info.solution)
    assert info.outer_grad_norm == pytest.approx(ref_info.outer_grad_norm, rel=1e-15, abs=0.0)
    assert info.inner_grad_norm == pytest.approx(ref_info.inner_grad_norm, rel=1e-15, abs=0.0)
    assert (info.outer_loss, info.inner_loss) == (ref_info.outer_loss, ref_info.inner_loss)
    assert info.stats.pop("mixed") == "params"
    assert info.stats == ref_info.stats and info.solver == ref_info.solver


def test_a_missing_direct_term_is_zero_minus_the_mixed_one():
    """``0 - m`` keeps the formula's +0 where the mixed term is +0 (``-m`` would not)."""
    X, Xv, y, yv, W, v = data()

    def f(p, h):
        fit = 0.5 * ((torch.tanh(X @ p["W"].T) @ p["v"] - y) ** 2).mean()
        return fit + h["a"] * (0.0 * p["v"]).sum() + h["b"] * (p["W"] ** 2).sum()

    def g(p, h):
        return 0.5 * ((torch.tanh(Xv @ p["W"].T) @ p["v"] - yv) ** 2).mean()

    before, lr = {"W": W, "v": v}, 0.2
    hparams = {"a": torch.tensor(0.5, dtype=DT), "b": torch.tensor(0.1, dtype=DT)}
    grads = torch.func.grad(f)(before, hparams)
    after = {k: before[k] - lr * grads[k] for k in before}
    problem = hg.Problem(f, g, after, hparams, lr=lr, prev_params=before)
    out, _ = hg.T1T2(mixed="params")(problem)
    ref, _ = general(problem)
    assert float(out["a"]) == 0.0 and float(ref["a"]) == 0.0
    assert bool(torch.signbit(out["a"])) == bool(torch.signbit(ref["a"]))
    assert torch.equal(out["b"], ref["b"])


@pytest.mark.parametrize("features", [4, LARGE_FEATURES], ids=["small", "large"])
def test_float32_outer_grad_norm_is_b_norm_to_the_rounding_of_x(features):
    problem = make_problem(torch.float32, features=features)
    out, info = hg.T1T2(mixed="params")(problem)
    ref, ref_info = general(problem)
    assert torch.equal(info.solution, ref_info.solution)  # x = lr * b in float32, as before
    # ||x|| / lr with x = fl(lr b): within 2^-24 (relative) of ||b||, plus the division
    assert info.outer_grad_norm == pytest.approx(ref_info.outer_grad_norm, rel=2**-23, abs=0.0)
    # float64 norms below LARGE entries; float32 rows above (a few float32 roundings)
    tol = 1e-15 if features == 4 else 1e-6
    assert info.inner_grad_norm == pytest.approx(ref_info.inner_grad_norm, rel=tol, abs=0.0)
    for k in out:
        assert out[k].dtype == torch.float32 and torch.equal(out[k], ref[k]), k


@pytest.mark.parametrize("features", [4, 3 * LARGE_FEATURES], ids=["small", "large"])
def test_half_precision_gradients_are_widened_before_the_product(features):
    """bfloat16 parameters: ``x = lr * float32(b)`` (the formula's accumulator dtype), not
    ``float32(lr * b)`` rounded in bfloat16."""
    X, Xv, y, yv, W, v = data(torch.float32, features=features)
    w0 = torch.linspace(-1.0, 1.0, features).to(torch.bfloat16)
    Xb, Xvb = X.to(torch.bfloat16), Xv.to(torch.bfloat16)

    def f(w, h):
        return 0.5 * ((Xb @ w - y.to(torch.bfloat16)) ** 2).mean() + 0.5 * (h * w * w).sum()

    def g(w, h):
        return 0.5 * ((Xvb @ w - yv.to(torch.bfloat16)) ** 2).mean()

    lr = 0.3
    h = torch.full((features,), 0.7, dtype=torch.bfloat16)
    after = (w0 - lr * torch.func.grad(f)(w0, h)).to(torch.bfloat16)
    problem = hg.Problem(f, g, after, h, lr=lr, prev_params=w0)
    out, info = hg.T1T2(mixed="params")(problem)
    ref, ref_info = general(problem)
    assert info.solution.dtype == torch.float32
    assert torch.equal(info.solution, ref_info.solution)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)


def test_an_x_too_small_for_its_norm_is_read_by_the_general_formula():
    """``g`` scaled to subnormal gradients: ``||lr b|| / lr`` would lose digits there, so
    the general formula answers (its ``||b||`` exactly, same hypergradient)."""
    problem = make_problem(outer_scale=1e-158)
    out, info = hg.T1T2(mixed="params")(problem)
    ref, ref_info = general(problem)
    assert ref_info.outer_grad_norm > 0.0
    assert info.outer_grad_norm == ref_info.outer_grad_norm
    for k in out:
        assert torch.equal(out[k], ref[k]), k


def test_an_outer_loss_without_the_parameters_is_read_by_the_general_formula():
    X, _, y, _, W, v = data()

    def f(p, h):
        return 0.5 * ((X @ p - y) ** 2).mean() + 0.5 * h * (p**2).sum()

    def g(p, h):
        return (h - 2.0) ** 2

    w0, lr, h = W[0], 0.1, torch.tensor(0.4, dtype=DT)
    after = w0 - lr * torch.func.grad(f)(w0, h)
    problem = hg.Problem(f, g, after, h, lr=lr, prev_params=w0)
    out, info = hg.T1T2(mixed="params")(problem)
    ref, ref_info = general(problem)
    assert torch.equal(out, ref) and float(out) == pytest.approx(2 * (0.4 - 2.0), rel=1e-15)
    assert info.status == ref_info.status and info.outer_grad_norm == 0.0


def test_a_non_finite_direct_term_alone_is_named_by_the_general_formula():
    """``g`` finite with an overflowing gradient in one hyperparameter only: ``f``, ``g``,
    ``x`` and ``grad_theta f`` are finite, only the sum probe of the difference sees it;
    the general formula then names it."""
    problem = make_problem()
    g0 = problem.outer_loss

    def g(p, h):
        return g0(p, h) + 1e300 * torch.sin(1e10 * h["temp"]).sum()

    bad = hg.Problem(
        problem.inner_loss, g, problem.params, problem.hparams, lr=0.3,
        prev_params=problem.prev_params,
    )  # fmt: skip
    with pytest.raises(hg.NonFiniteHypergradientError) as direct:
        hg.T1T2()(bad)
    with pytest.raises(hg.NonFiniteHypergradientError) as ref:
        general(bad)
    assert str(direct.value) == str(ref.value) and "temp" in str(ref.value)


# ---------------------------------------------------------------------------------- driver


def test_the_divergence_read_keeps_every_value_and_its_order_across_dtypes():
    norms = tuple(torch.tensor(x, dtype=DT) for x in (1.0, 2.0, 4.0, 8.0))
    losses = (
        torch.tensor(1.0),
        torch.tensor([3.0], dtype=torch.bfloat16),  # another dtype, and a 1-element shape
        torch.tensor(9.0),
        torch.tensor(27.0, dtype=DT),
    )
    finite, message = divergence.diagnose(norms, losses)
    assert finite
    assert "parameter norms [1, 2, 4, 8], training losses [1, 3, 9, 27]" in message
    nan_last = (*losses[:3], torch.tensor(math.nan))
    finite, message = divergence.diagnose(tuple(n / 8 + 1 for n in norms), nan_last)
    assert not finite and "training loss is not finite" in message and "nan]" in message
    healthy = tuple(torch.tensor(x, dtype=DT) for x in (1.0, 1.5, 2.0, 3.9))
    assert divergence.diagnose(healthy, ()) is None  # a ratio below 2 at the last step
    grown = tuple(torch.tensor(x, dtype=DT) for x in (1.0, 2.0, 4.0, 8.0 - 2**-40))
    assert divergence.diagnose(grown, ()) is None  # read exactly: 8 - 2^-40 < 2 * 4


@pytest.mark.parametrize("raw,inside", [(0.0, True), (-1e5, False), (1e5, False)])
def test_a_single_hyperparameter_domain_test(raw, inside):
    hp = HyperParameters({"d": hg.Positive(torch.ones(3))}, device=torch.device("cpu"))
    with torch.no_grad():
        hp.raw["d"][1] = raw
    assert (hp.domain_error(hp.raw) is None) == inside
    if not inside:
        with pytest.raises(hg.constraints.HyperparameterDomainError, match=r"hparams\['d'\]"):
            hp.check_domain()


def wide_problem(scale=1.0, outer_scale=1.0):
    """float32, a first layer of 41 x 820 = 33620 entries (at least t1t2.LARGE: 131 rows
    of 256 and a remainder of 84): the norms read by float32 rows."""
    g = torch.Generator().manual_seed(11)
    X, Xv = torch.randn(50, 820, generator=g) / 30, torch.randn(40, 820, generator=g) / 30
    y, yv = torch.randn(50, generator=g), torch.randn(40, generator=g)
    W, v = 0.2 * torch.randn(41, 820, generator=g), 0.2 * torch.randn(41, generator=g)

    def f(p, h):
        fit = 0.5 * ((torch.tanh(X @ p["W"].T) @ p["v"] - y) ** 2).mean()
        return scale * (fit + 0.5 * (h.exp() * p["W"] ** 2).sum())

    def g_(p, h):
        return outer_scale * 0.5 * ((torch.tanh(Xv @ p["W"].T) @ p["v"] - yv) ** 2).mean()

    lr, h = 0.3, torch.full((41, 1), -2.0)
    before = {"W": W, "v": v}
    grads = torch.func.grad(f)(before, h)
    after = {k: before[k] - lr * grads[k] for k in before}
    return hg.Problem(f, g_, after, h, lr=lr, prev_params=before)


def test_float32_norms_by_rows_are_the_float64_norms_to_float32_rounding():
    problem = wide_problem()
    out, info = hg.T1T2(mixed="params")(problem)
    ref, ref_info = general(problem)
    assert torch.equal(out, ref) and torch.equal(info.solution, ref_info.solution)
    assert info.inner_grad_norm == pytest.approx(ref_info.inner_grad_norm, rel=1e-6, abs=0.0)
    assert info.outer_grad_norm == pytest.approx(ref_info.outer_grad_norm, rel=1e-6, abs=0.0)
    # and the norms are those of the flat float64 vectors, not of one leaf or one row
    gf = torch.func.grad(problem.inner_loss)(problem.prev_params, problem.hparams)
    flat = torch.cat([t.double().reshape(-1) for t in gf.values()])
    assert info.inner_grad_norm == pytest.approx(float(flat.norm()), rel=1e-6, abs=0.0)


@pytest.mark.parametrize("where", ["inner", "outer"])
def test_float32_norms_too_small_for_rows_are_read_by_the_general_formula(where):
    """Gradients near 1e-24: their float32 squares underflow, so a norm by rows would be 0
    or digits off; the general formula reads them in float64."""
    problem = wide_problem(**({"scale": 1e-22} if where == "inner" else {"outer_scale": 1e-22}))
    out, info = hg.T1T2(mixed="params")(problem)
    ref, ref_info = general(problem)
    assert ref_info.inner_grad_norm > 0.0 and ref_info.outer_grad_norm > 0.0
    assert info.inner_grad_norm == ref_info.inner_grad_norm
    assert info.outer_grad_norm == ref_info.outer_grad_norm
    assert torch.equal(out, ref)
