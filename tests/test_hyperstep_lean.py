"""The lean hyper-step: T1T2's direct path and the driver's one-sync checks and O(1) snapshots.

T1T2's direct path (:func:`hypergradient.methods.t1t2.look_ahead`) must give what the general
implicit formula gives (the same hypergradient, to rounding, and the same diagnostics), and
hand every case it does not serve (a non-finite quantity, an unused hyperparameter, a
once-differentiable function) to the general formula, which names, warns and falls back as
before. The driver's cheaper bookkeeping must keep its guarantees: the stacked domain test
agrees with the per-constraint messages, the state-dict snapshot is a deep copy, the O(1)
history snapshot undoes a hyper-step exactly (bounded or not), the one-sync record summaries
are the per-value statistics.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import hypergradient as hg
from hypergradient.constraints import Constraint
from hypergradient.hyperoptimizer.history import make_record
from hypergradient.hyperoptimizer.hparams import HyperParameters
from hypergradient.hyperoptimizer.transaction import clone_state
from hypergradient.methods.implicit_base import ImplicitMethod
from once_diff import Cube as _Cube
from registry import rel, ridge_case

DT = torch.float64


def general(method, problem):
    """The general implicit formula's answer (what T1T2 computed before the direct path)."""
    return ImplicitMethod.__call__(method, problem)


def mlp_problem(dtype=DT, prev=True):
    g = torch.Generator().manual_seed(5)
    X, Xv = torch.randn(40, 5, generator=g), torch.randn(30, 5, generator=g)
    y, yv = torch.randn(40, generator=g), torch.randn(30, generator=g)
    X, Xv, y, yv = (t.to(dtype) for t in (X, Xv, y, yv))
    W1 = (0.5 * torch.randn(7, 5, generator=g)).to(dtype)
    w2 = (0.5 * torch.randn(7, generator=g)).to(dtype)

    def f(p, h):
        out = torch.tanh(X @ p["W1"].T) @ p["w2"]
        penalty = 0.5 * (h["decay"].exp() * p["W1"] ** 2).sum() + h["bias"] * p["w2"].sum()
        return 0.5 * ((out - y) ** 2).mean() + penalty

    def g_(p, h):
        return 0.5 * ((torch.tanh(Xv @ p["W1"].T) @ p["w2"] - yv) ** 2).mean()

    before = {"W1": W1, "w2": w2}
    hparams = {
        "decay": torch.full((7, 5), -2.0, dtype=dtype),
        "bias": torch.tensor(0.1, dtype=dtype),
    }
    lr = 0.2
    grads = torch.func.grad(f)(before, hparams)
    after = {k: before[k] - lr * grads[k] for k in before}
    if not prev:
        return hg.Problem(f, g_, before, hparams, lr=lr)
    return hg.Problem(f, g_, after, hparams, lr=lr, prev_params=before)


def look_ahead_reference(problem):
    """``d g(theta - lr grad f(theta, h), h) / dh`` by autograd through the step."""
    h = {k: v.detach().clone().requires_grad_(True) for k, v in problem.hparams.items()}
    at = problem.params if problem.prev_params is None else problem.prev_params
    w = {k: v.detach().clone().requires_grad_(True) for k, v in at.items()}
    grads = torch.autograd.grad(problem.inner_loss(w, h), list(w.values()), create_graph=True)
    after = {k: v - problem.lr * gk for (k, v), gk in zip(w.items(), grads)}
    if problem.prev_params is None:  # the outer gradient at theta, the operator at theta
        out = torch.autograd.grad(problem.outer_loss(w, h), list(w.values()))
        gv = dict(zip(w, out))
        dot = sum((gk * gv[k]).sum() for k, gk in zip(w, grads))
        mixed = torch.autograd.grad(dot, list(h.values()), allow_unused=True)
        return {k: -problem.lr * (m if m is not None else 0 * h[k]) for k, m in zip(h, mixed)}
    return dict(zip(h, torch.autograd.grad(problem.outer_loss(after, h), list(h.values()))))


INFO_FIELDS = (
    "method",
    "outer_loss",
    "num_hvps",
    "status",
    "stats",
    "residual_norm",
    "relative_residual",
    "converged",
    "iterations",
    "solver",
    "inner_loss",
    "inner_grad_norm",
    "outer_grad_norm",
    "extra_hvps",
)


@pytest.mark.parametrize("mixed", ["params", "hparams", "auto"])
@pytest.mark.parametrize("prev", [True, False], ids=["look-ahead", "same-point"])
def test_direct_path_equals_the_general_formula_and_the_exact_derivative(prev, mixed):
    problem = mlp_problem(prev=prev)
    method = hg.T1T2(mixed=mixed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, info = method(problem)
        ref_out, ref_info = general(hg.T1T2(), problem)
    exact = look_ahead_reference(problem)
    for k in exact:
        assert rel(out[k], exact[k]) < 1e-12, k
        assert rel(out[k], ref_out[k]) < 1e-14, k
        assert out[k].dtype == problem.hparams[k].dtype and not out[k].requires_grad
    order = "params" if mixed == "params" else "hparams"  # "auto": penalties only here
    assert info.stats.pop("mixed") == order
    if order == "hparams":  # nothing computes grad_theta f
        assert math.isnan(info.inner_grad_norm) and ref_info.inner_grad_norm > 0
        info.inner_grad_norm = ref_info.inner_grad_norm
    for name in INFO_FIELDS:
        a, b = getattr(info, name), getattr(ref_info, name)
        if isinstance(a, float) and isinstance(b, float):
            assert a == pytest.approx(b, rel=1e-13, abs=0.0), name
        else:
            assert a == b, name
    assert rel(info.solution, ref_info.solution) < 1e-14
    assert info.seconds > 0 and method.state_dict() == {}


def test_direct_path_on_float32_and_on_the_registry_case():
    problem = mlp_problem(torch.float32)
    out, _ = hg.T1T2()(problem)
    ref, _ = general(hg.T1T2(), problem)
    for k in out:
        assert out[k].dtype == torch.float32 and rel(out[k], ref[k]) < 1e-5
    case = ridge_case("t1t2")
    out, info = hg.T1T2()(case.problem())
    assert rel(out, case.reference) < 1e-12 and info.stats["hvp"] == "double"


def test_non_finite_quantities_are_named_as_by_the_general_formula():
    problem = mlp_problem()

    def nan_inner(p, h):
        return problem.inner_loss(p, h) * torch.tensor(math.nan, dtype=DT)

    def nan_outer(p, h):
        return problem.outer_loss(p, h) + p["w2"].sum() * torch.tensor(math.inf, dtype=DT)

    for bad in (
        hg.Problem(
            nan_inner,
            problem.outer_loss,
            problem.params,
            problem.hparams,
            lr=0.2,
            prev_params=problem.prev_params,
        ),
        hg.Problem(
            problem.inner_loss,
            nan_outer,
            problem.params,
            problem.hparams,
            lr=0.2,
            prev_params=problem.prev_params,
        ),
    ):
        with pytest.raises(hg.NonFiniteHypergradientError) as direct:
            hg.T1T2()(bad)
        with pytest.raises(hg.NonFiniteHypergradientError) as ref:
            general(hg.T1T2(), bad)
        assert str(direct.value) == str(ref.value)


def test_an_unused_hyperparameter_warns_and_gets_zero_as_before():
    problem = mlp_problem()
    hparams = {**problem.hparams, "idle": torch.ones(3, dtype=DT)}
    problem = hg.Problem(
        problem.inner_loss,
        problem.outer_loss,
        problem.params,
        hparams,
        lr=0.2,
        prev_params=problem.prev_params,
    )
    with pytest.warns(hg.HypergradientWarning, match="idle"):
        out, _ = hg.T1T2()(problem)
    assert torch.equal(out["idle"], torch.zeros(3, dtype=DT))


def test_a_once_differentiable_function_falls_back_as_in_the_general_formula():
    w0 = torch.tensor([0.5, -1.0, 2.0], dtype=DT)
    c = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
    Xv = torch.tensor([[1.0, 0.5, -0.3], [0.2, -1.0, 0.4]], dtype=DT)

    def f(w, h):
        return (h * _Cube.apply(w)).sum()

    def g(w, h):
        return 0.5 * ((Xv @ w) ** 2).sum()

    lr = 0.1
    after = w0 - lr * c * w0**2
    problem = hg.Problem(f, g, after, c, lr=lr, prev_params=w0)
    method = hg.T1T2()
    with pytest.warns(hg.HypergradientWarning, match="first_order"):
        out, info = method(problem)
    assert info.stats["hvp"] == "first_order"
    # d/dc g(w0 - lr c w0^2) = -lr w0^2 * (Xv^T Xv after)
    assert rel(out, -lr * w0**2 * (Xv.T @ (Xv @ after))) < 1e-8
    assert method.product_mode() == "first_order"  # later calls take the general path
    with pytest.raises(RuntimeError, match="once_differentiable"):
        hg.T1T2(hvp="double")(problem)


# ---------------------------------------------------------------------------------- driver


@pytest.mark.parametrize(
    "make,values",
    [
        (lambda: hg.Positive(torch.ones(3)), [0.0, -1.0, math.inf, math.nan, 1e-30, 5.0]),
        (lambda: hg.Positive(torch.ones(3), "softplus"), [0.0, math.inf, 2.0]),
        (
            lambda: hg.Interval(torch.full((3,), 0.5), 0.0, 1.0),
            [0.0, 1.0, 0.5, math.nan, -math.inf],
        ),
        (lambda: hg.Unconstrained(torch.zeros(3)), [0.0, math.inf, -math.inf, math.nan, -7.0]),
    ],
    ids=["positive", "softplus", "interval", "unconstrained"],
)
def test_the_stacked_domain_test_agrees_with_domain_error(make, values):
    c = make()
    for a in values:
        for b in values:
            v = torch.tensor([a, b, 0.5])
            assert bool(c.in_domain(v)) == (c.domain_error(v) is None), (a, b)
    assert bool(c.in_domain(torch.zeros(0))) == (c.domain_error(torch.zeros(0)) is None)


def test_a_constraint_with_its_own_domain_error_is_asked_directly():
    class Small(hg.Positive):
        def domain_error(self, value):
            return "is too large" if bool((value > 2).any()) else super().domain_error(value)

    class Custom(Constraint):
        def __init__(self):
            self.raw = torch.zeros(2, requires_grad=True)

        def transform(self, raw):
            return raw

        def domain_error(self, value):
            return "is negative" if bool((value < 0).any()) else None

    assert Small(torch.ones(2)).in_domain(torch.ones(2)) is None
    assert Custom().in_domain(torch.ones(2)) is None
    hp = HyperParameters({"s": Small(torch.ones(1)), "c": Custom()}, device=torch.device("cpu"))
    assert hp.domain_error(hp.raw) is None
    with torch.no_grad():
        hp.raw["s"].fill_(math.log(3.0))
    assert hp.domain_error(hp.raw) == ("hparams['s']", "is too large")
    with torch.no_grad():
        hp.raw["s"].fill_(0.0)
        hp.raw["c"].fill_(-1.0)
    assert hp.domain_error(hp.raw) == ("hparams['c']", "is negative")


def test_state_dict_snapshots_are_deep_copies():
    p = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.Adam([p], lr=0.1, betas=(0.8, 0.9))
    p.grad = torch.randn(4)
    opt.step()
    state = opt.state_dict()
    ours, deep = clone_state(state), copy.deepcopy(state)

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        if isinstance(a, dict):
            return type(b) is dict and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
        return a == b

    assert same(ours, deep)
    for k, v in state["state"][0].items():
        if isinstance(v, torch.Tensor):
            assert v.data_ptr() != ours["state"][0][k].data_ptr()
    ours["param_groups"][0]["params"].append(99)
    assert state["param_groups"][0]["params"] == [0]


def _hopt(history_size, logger):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    X, y = torch.randn(16, 3), torch.randn(16, 1)
    decay = hg.Positive(torch.full((1, 3), 0.1))
    return hg.HyperOptimizer(
        model,
        {"decay": decay},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.01),
        train_loss=lambda m, h, b: (
            ((m(b[0]) - b[1]) ** 2).mean() + (h["decay"] * m.weight**2).sum()
        ),
        val_loss=lambda m, h, b: ((m(b[0]) - b[1]) ** 2).mean(),
        val_data=(X, y),
        method=hg.T1T2(),
        inner_steps=1,
        history_size=history_size,
        logger=logger,
    ), (X, y)


def _backward(hopt, batch):
    hopt.zero_grad()
    hopt.train_loss(batch).backward()


@pytest.mark.parametrize("size", [None, 0, 1, 3])
def test_a_failed_hyper_step_leaves_the_history_as_it_was(size):
    calls = []

    def logger(record):
        calls.append(record.hyper_step)
        if len(calls) == 5:
            raise KeyboardInterrupt  # after the append: the record must be taken back

    hopt, batch = _hopt(size, logger)
    for _ in range(4):
        _backward(hopt, batch)  # T1T2 refuses a hyper-step after a step without gradients
        hopt.step(batch)
    before = list(hopt.history)
    hparams = {k: v.clone() for k, v in hopt.hparams.items()}
    _backward(hopt, batch)
    with pytest.raises(KeyboardInterrupt):
        hopt.step(batch)
    assert hopt.history.total == 4 and len(hopt.history) == len(before)
    assert all(a is b for a, b in zip(hopt.history, before))
    assert all(torch.equal(hopt.hparams[k], v) for k, v in hparams.items())
    _backward(hopt, batch)
    hopt.step(batch)  # the logger is past its failure: the step is taken again
    assert hopt.history.total == 5 and [r.hyper_step for r in hopt.history][-1:] == (
        [5] if size != 0 else []
    )
    if size:
        assert len(hopt.history) == min(size, 5)


def test_record_summaries_are_the_per_value_statistics():
    values = {
        "a": torch.tensor([1.0, -2.0, 4.0]),
        "b": torch.zeros(0),
        "c": torch.tensor(3.0, dtype=DT),
    }
    grads = {
        "a": torch.tensor([3.0, 4.0, 0.0]),
        "b": torch.zeros(0),
        "c": torch.tensor(-2.0, dtype=DT),
    }
    info = hg.Info(method="x", outer_loss=0.5)
    record = make_record(
        step=1, hyper_step=1, seconds=0.1, method="x", info=info, values=values, hypergrad=grads
    )
    s = record.summaries
    assert s["a"] == {
        "norm": math.sqrt(21.0),
        "mean": 1.0,
        "min": -2.0,
        "max": 4.0,
        "hypergrad_norm": 5.0,
    }
    assert s["b"]["norm"] == 0.0 and s["b"]["hypergrad_norm"] == 0.0
    assert all(math.isnan(s["b"][k]) for k in ("mean", "min", "max"))
    assert s["c"] == {"norm": 3.0, "mean": 3.0, "min": 3.0, "max": 3.0, "hypergrad_norm": 2.0}
    assert record.hypergrad_norm == pytest.approx(math.sqrt(29.0), rel=1e-15)
