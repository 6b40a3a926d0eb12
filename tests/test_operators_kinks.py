"""First-order (finite-difference) products and kinks of the loss.

A central difference of gradients across a ReLU's switch point adds the gradient's jump
divided by the step: on a ReLU MLP of 256 rows the products were 30x (float32) to 3,000x
(float64) off autograd's, silently. Every first-order product is now checked against its
one-sided differences (``operators.modes.central_difference``): a step whose halves
disagree is halved (a kink that leaves the step then costs nothing), and a kink that stays
raises ``hg.NonSmoothLossError``; smooth losses keep their products to rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import hypergradient as hg
from hypergradient.operators.modes import KINK_TOLERANCE, first_order_step

DT = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def mlp(act: type[nn.Module], dtype: torch.dtype, rows: int = 256, seed: int = 0):
    """A 20-32-32-5 MLP with activation ``act`` and a log weight decay: ``(f, params, h)``."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 32), act(), nn.Linear(32, 32), act(), nn.Linear(32, 5))
    model = model.to(dtype)
    X = torch.randn(rows, 20, generator=g, dtype=DT).to(dtype)
    y = torch.randint(0, 5, (rows,), generator=g)
    names = [k for k, _ in model.named_parameters()]

    def f(p, h):
        out = functional_call(model, dict(zip(names, p)), (X,))
        penalty = sum((t**2).sum() for t in p)
        return nn.functional.cross_entropy(out, y) + 0.5 * h.exp() * penalty

    params = tuple(t.detach().clone() for t in model.parameters())
    return f, params, torch.tensor(-3.0, dtype=dtype)


CASES = [(torch.float32, 256), (torch.float32, 1024), (DT, 256)]


@pytest.mark.parametrize(("dtype", "rows"), CASES)
@pytest.mark.parametrize("act", [nn.ReLU, nn.LeakyReLU])
def test_relu_products_are_right_or_refused(act, dtype, rows):
    # Before: float32 products 36-160x off autograd's on a 784-110-110 ReLU MLP (256 and 8
    # rows), 3,300x in float64, silently. Now each is autograd's to rounding, or raises.
    f, params, h = mlp(act, dtype, rows)
    op = hg.HessianOperator(f, params, h, mode="first_order")
    ref = hg.HessianOperator(f, params, h, mode="double")
    gen = torch.Generator().manual_seed(1)
    bound = 1e-3 if dtype == torch.float32 else 1e-8
    refused = 0
    for _ in range(5):
        v = torch.randn(op.size, generator=gen, dtype=dtype)
        try:
            got = op.matvec(v)
        except hg.NonSmoothLossError as error:
            refused += 1
            assert 0.2 < error.mismatch < 2.0  # about 1: the jump dominates both sides
            assert "inner_loss" in str(error) and "hvp='double'" in str(error)
            assert isinstance(error, RuntimeError)
            continue
        assert rel(got, ref.matvec(v)) < bound
    if rows == 1024:  # ~65k switch points: every step and its halvings cross some
        assert refused == 5
    # the decay's gradient 0.5 e^h ||theta||^2 has no kink: its mixed product is kept
    v = torch.randn(op.size, generator=gen, dtype=dtype)
    assert rel(op.mixed(v)[0].to(DT), ref.mixed(v)[0].to(DT)) < 10 * bound


@pytest.mark.parametrize("dtype", [torch.float32, DT])
@pytest.mark.parametrize("act", [nn.Tanh, nn.GELU, nn.SiLU, nn.Softplus])
def test_smooth_losses_keep_their_products(act, dtype):
    f, params, h = mlp(act, dtype)
    f64, p64, h64 = mlp(act, DT)
    ref = hg.HessianOperator(f64, tuple(t.to(DT) for t in params), h64, mode="double")
    op = hg.HessianOperator(f, params, h, mode="first_order")
    gen = torch.Generator().manual_seed(2)
    bound = 1e-3 if dtype == torch.float32 else 1e-7
    for _ in range(4):
        v = torch.randn(op.size, generator=gen, dtype=DT)
        assert rel(op.matvec(v.to(dtype)).to(DT), ref.matvec(v)) < bound
        # a float32 scalar gradient differenced: 3e-3 measured (rounding, not kinks)
        assert rel(op.mixed(v.to(dtype))[0].to(DT), ref.mixed(v)[0]) < 10 * bound
    # no retry was needed: two gradients per product and per mixed product, two centres
    assert op.gradient_evaluations == 4 * 4 + 2


def kinked(offset: float):
    """``f(x) = 0.5 x^T A x + c relu(x_0 - offset h)`` at ``x`` with ``x_0`` at the switch
    shifted by ``offset`` first-order steps: ``(f, x, v, A)``; autograd's Hessian is ``A``."""
    g = torch.Generator().manual_seed(3)
    n = 6
    M = torch.randn(n, n, generator=g, dtype=DT)
    A = M @ M.T + n * torch.eye(n, dtype=DT)
    x = torch.randn(n, generator=g, dtype=DT)
    v = torch.randn(n, generator=g, dtype=DT)
    h = first_order_step(float(x.norm()), float(v.norm()), n, DT)
    switch = float(x[0]) - offset * h * float(v[0])

    def f(p, lam):
        return 0.5 * p @ (A @ p) + 3.0 * torch.relu(p[0] - switch) + lam * p.sum()

    return f, x, v, A


def test_a_kink_that_leaves_the_halved_step_costs_nothing():
    # The switch lies at 0.75 steps from the point: inside the first step, outside half of it
    f, x, v, A = kinked(0.75)
    op = hg.HessianOperator(f, x, torch.tensor(0.5, dtype=DT), mode="first_order")
    assert rel(op.matvec(v), A @ v) < 1e-8
    assert op.gradient_evaluations == 1 + 2 + 2  # centre, the refused step, the halved one


def test_a_kink_that_stays_inside_every_step_raises():
    f, x, v, _ = kinked(0.1)  # inside the step and both of its halvings
    op = hg.HessianOperator(f, x, torch.tensor(0.5, dtype=DT), mode="first_order")
    with pytest.raises(hg.NonSmoothLossError, match="3 steps"):
        op.matvec(v)


def test_implicit_refuses_first_order_products_of_a_relu_network():
    f, params, h = mlp(nn.ReLU, torch.float32)

    def g(p, hh):
        return sum((t**2).sum() for t in p)

    with pytest.raises(hg.NonSmoothLossError):
        hg.implicit(f, g, params, h, hg.CG(maxiter=5), hvp="first_order", stationarity=None)
    # autograd's products of the same network are fine
    out = hg.implicit(f, g, params, h, hg.CG(maxiter=5), hvp="double", stationarity=None)
    assert math.isfinite(float(out))


def _sgd_problem(act: type[nn.Module], dtype: torch.dtype = DT, rows: int = 64):
    f, params, h = mlp(act, dtype, rows=rows)

    def f_batch(p, hh, batch):
        return f(p, hh)

    def g(p, hh):
        return sum((t**2).sum() for t in p)

    return f_batch, g, params, h


@pytest.mark.parametrize("method", ["unrolled", "forward_mode"])
def test_trajectory_first_order_steps_check_kinks(method):
    call = getattr(hg, method)
    f, g, params, h = _sgd_problem(nn.ReLU, torch.float32, 1024)
    sgd = hg.optim.sgd(lr=0.1)
    with pytest.raises(hg.NonSmoothLossError, match="step"):
        call(f, g, params, h, 3, sgd, batches=[None] * 3, hvp="first_order")
    f, g, params, h = _sgd_problem(nn.Tanh)
    exact = call(f, g, params, h, 3, sgd, batches=[None] * 3, hvp="double")
    got = call(f, g, params, h, 3, sgd, batches=[None] * 3, hvp="first_order")
    assert abs(float(got) - float(exact)) < 1e-7 * abs(float(exact))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), low=st.floats(1e-6, 1e-2))
def test_no_false_kinks_along_low_curvature_directions(seed, low):
    # The false-alarm risk of the check: a direction of small curvature, where the
    # one-sided differences' O(h) part is largest relative to the product. Smooth tanh
    # model, float64, along the Hessian's bottom eigenvector: no error, products exact.
    g = torch.Generator().manual_seed(seed)
    n = 8
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    evals = torch.logspace(math.log10(low), 0, n, dtype=DT)
    A = (Q * evals) @ Q.T
    w = torch.randn(n, generator=g, dtype=DT)

    def f(p, lam):
        return 0.5 * p @ (A @ p) + lam * torch.tanh(w @ p) ** 2

    x = torch.randn(n, generator=g, dtype=DT)
    lam = torch.tensor(1e-3, dtype=DT)
    op = hg.HessianOperator(f, x, lam, mode="first_order")
    ref = hg.HessianOperator(f, x, lam, mode="double")
    v = Q[:, 0]
    assert rel(op.matvec(v), ref.matvec(v)) < 1e-4
    assert KINK_TOLERANCE == 0.05
