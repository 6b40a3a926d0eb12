"""``Problem.lr`` as one learning rate per parameter leaf (param groups of several rates).

The inner step ``theta' = theta - Lambda grad_theta f(theta, phi)`` with ``Lambda`` diagonal
(each leaf's entries carry its rate, some of them 0) is differentiated exactly by T1T2: its
hypergradient equals autograd through the step in float64 (1e-12), for penalty, per-example
and input hyperparameters, parameter trees given as tuples and dicts. Equal rates are the
single-rate problem (same numbers, same fast path). Bad rates are refused with a message
naming ``lr``. IFT's default Neumann series takes the smallest positive rate as its step.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hypergradient as hg
from hypergradient.methods.leaf_rates import LeafRates

DT = torch.float64


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(24, 3, generator=g, dtype=DT), torch.randn(20, 3, generator=g, dtype=DT)
    y, yv = torch.randn(24, generator=g, dtype=DT), torch.randn(20, generator=g, dtype=DT)
    W1 = 0.5 * torch.randn(5, 3, generator=g, dtype=DT)
    b1 = 0.1 * torch.randn(5, generator=g, dtype=DT)
    w2 = 0.5 * torch.randn(5, generator=g, dtype=DT)
    return (X, y, Xv, yv), (W1, b1, w2)


def net(p, x):
    W1, b1, w2 = p
    return torch.tanh(x @ W1.T + b1) @ w2


def make(kind: str, batches):
    """``(f, g, hparams)``: a penalty per hidden unit, per-example weights, or an input
    scaling (the hyperparameter inside the network)."""
    X, y, Xv, yv = batches
    if kind == "penalty":
        h = (torch.full((5, 1), 0.1, dtype=DT),)

        def f(p, h):
            return ((net(p, X) - y) ** 2).mean() + 0.5 * (h[0] * p[0] ** 2).sum()

    elif kind == "per_example":
        h = (torch.linspace(0.5, 1.5, 24, dtype=DT),)

        def f(p, h):
            return (h[0] * (net(p, X) - y) ** 2).mean() + 1e-2 * sum((t**2).sum() for t in p)

    else:
        h = (torch.tensor([1.0, 0.7, 1.3], dtype=DT),)

        def f(p, h):
            return ((net(p, X * h[0]) - y) ** 2).mean()

    def g(p, h):
        return ((net(p, Xv) - yv) ** 2).mean()

    return f, g, h


def through_the_step(f, g, theta, h, rates):
    """d/dphi g(theta - Lambda grad f(theta, phi)) by autograd (float64)."""
    hs = tuple(t.clone().requires_grad_(True) for t in h)
    ps = tuple(t.clone().requires_grad_(True) for t in theta)
    grads = torch.autograd.grad(f(ps, hs), ps, create_graph=True)
    after = tuple(p - r * gr for p, r, gr in zip(ps, rates, grads))
    return torch.autograd.grad(g(after, hs), hs), tuple(a.detach() for a in after)


@pytest.mark.parametrize("kind", ["penalty", "per_example", "input"])
@pytest.mark.parametrize("rates", [(0.3, 0.05, 0.1), (0.2, 0.0, 0.4), (0.0, 0.0, 0.25)])
def test_t1t2_is_autograd_through_a_step_of_per_leaf_rates(kind, rates):
    batches, theta = data()
    f, g, h = make(kind, batches)
    exact, after = through_the_step(f, g, theta, h, rates)
    problem = hg.Problem(f, g, after, h, lr=list(rates), prev_params=theta)
    q = tuple(t.clone().requires_grad_(True) for t in after)
    b = torch.cat([t.reshape(-1) for t in torch.autograd.grad(g(q, h), q)])  # ||b||: the info's
    for mixed in ("auto", "params", "hparams"):
        got, info = hg.T1T2(mixed=mixed)(problem)
        torch.testing.assert_close(got[0], exact[0], rtol=1e-12, atol=1e-14)
        assert "LeafRates" in info.solver and info.stats["mixed"] in ("params", "hparams")
        assert info.outer_grad_norm == pytest.approx(float(b.norm()), rel=1e-12)
    general, _ = hg.T1T2()._general(problem, None)  # the formula's path: the same numbers
    torch.testing.assert_close(general[0], exact[0], rtol=1e-12, atol=1e-14)
    if kind == "penalty":  # it touches the first leaf alone: that leaf's rate decides
        if rates[0] > 0:
            alone, _ = hg.T1T2()(hg.Problem(f, g, after, h, lr=rates[0], prev_params=theta))
            torch.testing.assert_close(alone[0], exact[0], rtol=1e-12, atol=1e-14)
        return
    # the smallest or the largest rate alone is another step's derivative: far from it
    for r in (min(x for x in rates if x > 0), max(rates)):
        other, _ = hg.T1T2()(hg.Problem(f, g, after, h, lr=r, prev_params=theta))
        assert (other[0] - exact[0]).norm() > 1e-3 * exact[0].norm()


def test_dict_params_take_their_rates_in_key_order():
    batches, theta = data(1)
    f, g, h = make("penalty", batches)
    names = ("W1", "b1", "w2")
    rates = (0.3, 0.0, 0.1)
    exact, after = through_the_step(f, g, theta, h, rates)

    def fd(p, h):
        return f(tuple(p[k] for k in names), h)

    def gd(p, h):
        return g(tuple(p[k] for k in names), h)

    problem = hg.Problem(
        fd, gd, dict(zip(names, after)), h, lr=rates, prev_params=dict(zip(names, theta))
    )
    got, _ = hg.T1T2()(problem)
    torch.testing.assert_close(got[0], exact[0], rtol=1e-12, atol=1e-14)


def test_large_leaves_take_the_leaf_by_leaf_pass():
    """From 32,768 entries ``x = Lambda b`` is written leaf by leaf (float32: its norms by
    rows); against autograd through the step in float64, and in float32 to its rounding."""
    g0 = torch.Generator().manual_seed(5)
    X, y = torch.randn(64, 256, generator=g0, dtype=DT), torch.randn(64, generator=g0, dtype=DT)
    Xv = torch.randn(48, 256, generator=g0, dtype=DT)
    yv = torch.randn(48, generator=g0, dtype=DT)
    W = 0.05 * torch.randn(160, 256, generator=g0, dtype=DT)
    theta = (W, 0.1 * torch.randn(160, generator=g0, dtype=DT))
    h = (torch.full((160, 1), 1e-2, dtype=DT), torch.tensor(1e-2, dtype=DT))

    def out(p, x):
        return torch.tanh(x.to(p[0].dtype) @ p[0].T).sum(1) + p[1].sum()

    def f(p, h):
        fit = ((out(p, X) - y.to(p[0].dtype)) ** 2).mean()
        return fit + 0.5 * (h[0] * p[0] ** 2).sum() + 0.5 * h[1] * (p[1] ** 2).sum()

    def g(p, h):
        return ((out(p, Xv) - yv.to(p[0].dtype)) ** 2).mean()

    rates = (0.02, 0.5)
    exact, after = through_the_step(f, g, theta, h, rates)
    for dtype, tol in ((DT, 1e-12), (torch.float32, 1e-4)):
        args = [tuple(t.to(dtype) for t in tree) for tree in (after, h, theta)]
        problem = hg.Problem(f, g, args[0], args[1], lr=rates, prev_params=args[2])
        got, info = hg.T1T2()(problem)
        assert "LeafRates" in info.solver and info.stats["mixed"] == "hparams"
        for a, e in zip(got, exact):
            torch.testing.assert_close(a.double(), e, rtol=tol, atol=tol * float(e.abs().max()))


def test_equal_rates_are_the_single_rate_problem():
    batches, theta = data(2)
    f, g, h = make("penalty", batches)
    _, after = through_the_step(f, g, theta, h, (0.2,) * 3)
    one, info1 = hg.T1T2()(hg.Problem(f, g, after, h, lr=0.2, prev_params=theta))
    many, info3 = hg.T1T2()(hg.Problem(f, g, after, h, lr=[0.2] * 3, prev_params=theta))
    assert torch.equal(one[0], many[0])
    assert info1.stats["mixed"] == info3.stats["mixed"] == "hparams"  # the direct path


@settings(max_examples=25, deadline=None)
@given(
    rates=st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 1.0)), min_size=3, max_size=3).filter(
        lambda r: any(x > 0 for x in r)
    ),
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(["penalty", "per_example", "input"]),
)
def test_random_rates_and_points(rates, seed, kind):
    batches, theta = data(seed)
    f, g, h = make(kind, batches)
    exact, after = through_the_step(f, g, theta, h, rates)
    got, _ = hg.T1T2()(hg.Problem(f, g, after, h, lr=rates, prev_params=theta))
    torch.testing.assert_close(got[0], exact[0], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(
    ("lr", "error", "match"),
    [
        ([0.1, 0.2], ValueError, r"`lr` gives 2 learning rates but `params` has 3 leaves"),
        ([0.1, -0.2, 0.3], ValueError, r"`lr\[1\]` must be a number >= 0"),
        ([0.0, 0.0, 0.0], ValueError, r"every rate in `lr` is 0"),
        ([], ValueError, r"`lr` is an empty sequence"),
        ([0.1, float("nan"), 0.3], ValueError, r"`lr\[1\]` must be a finite number"),
        ([0.1, "a", 0.3], TypeError, r"lr\[1\]"),
    ],
)
@pytest.mark.parametrize("method", [hg.T1T2, hg.IFT])
def test_bad_rates_are_refused_naming_lr(lr, error, match, method):
    batches, theta = data()
    f, g, h = make("penalty", batches)
    with pytest.raises(error, match=match):
        method()(hg.Problem(f, g, theta, h, lr=lr, prev_params=theta))


def test_ift_default_neumann_steps_at_the_smallest_positive_rate():
    batches, theta = data(3)
    f, g, h = make("penalty", batches)
    many, _ = hg.IFT()(hg.Problem(f, g, theta, h, lr=[0.3, 0.0, 0.05]))
    one, _ = hg.IFT()(hg.Problem(f, g, theta, h, lr=0.05))
    assert torch.equal(many[0], one[0])


def test_leaf_rates_solver_lays_out_the_diagonal_and_refuses_unbound_use():
    op = hg.MatrixOperator(torch.eye(5, dtype=DT))
    b = torch.arange(1.0, 6.0, dtype=DT)
    solver = LeafRates([0.5, 0.0, 2.0])
    with pytest.raises(ValueError, match="bind"):
        solver.solve(op, b)
    solver.bind([torch.zeros(2, dtype=DT), torch.zeros(1, dtype=DT), torch.zeros(2, dtype=DT)])
    x = solver.solve(op, b).value
    assert torch.equal(x, torch.tensor([0.5, 1.0, 0.0, 8.0, 10.0], dtype=DT))
    with pytest.raises(ValueError, match="2 learning rates|3 learning rates"):
        LeafRates([0.5, 0.0, 2.0]).bind([torch.zeros(2, dtype=DT), torch.zeros(3, dtype=DT)])


@pytest.mark.parametrize(
    "rates",
    [
        lambda r: torch.tensor(r, dtype=DT),
        lambda r: __import__("numpy").array(r),
        lambda r: __import__("collections").UserList(r),
    ],
)
def test_rates_as_a_tensor_an_array_or_any_sequence(rates):
    batches, theta = data(4)
    f, g, h = make("per_example", batches)
    exact, after = through_the_step(f, g, theta, h, (0.3, 0.0, 0.1))
    problem = hg.Problem(f, g, after, h, lr=rates([0.3, 0.0, 0.1]), prev_params=theta)
    got, _ = hg.T1T2()(problem)
    torch.testing.assert_close(got[0], exact[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("lr", [(r for r in (0.1, 0.2, 0.3)), torch.ones(3, 1), {"a": 0.1}])
def test_other_forms_are_refused_saying_what_lr_may_be(lr):
    batches, theta = data()
    f, g, h = make("penalty", batches)
    with pytest.raises(TypeError, match=r"one rate per leaf of `params` \(a list, tuple or 1-D"):
        hg.T1T2()(hg.Problem(f, g, theta, h, lr=lr, prev_params=theta))
