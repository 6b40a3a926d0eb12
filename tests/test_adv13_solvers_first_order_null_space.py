"""First-order products along the Hessian's null space are no kink.

``hvp="first_order"`` checks each central difference ``(g_+ - g_-) / 2h`` against its
one-sided halves: ``||g_+ + g_- - 2 g_0|| <= 0.05 ||g_+ - g_-||``. Along a direction ``v``
with ``H v ~ 0`` (an over-parameterized model, a parameter the inner loss ignores, a Neumann
or trajectory adjoint whose other part has decayed) the right side is ~0 and the left side
is the gradient's rounding, so a smooth quadratic raised ``NonSmoothLossError``. The
differences are now measured against the operator's scale ``||H|| ||v||`` (the largest
``||H u|| / ||u||`` of its products, or one probe product), which keeps true kinks refused.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg
from hypergradient.operators.modes import first_order_step

DT = torch.float64


def _head_problem():
    """Ridge on ``w`` plus a ``head`` the inner loss ignores (a null direction of ``H``)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(10, 3, generator=g, dtype=DT)
    Y = torch.randn(10, generator=g, dtype=DT)
    lam = torch.tensor(0.3, dtype=DT)
    A = X.T @ X / 10 + lam * torch.eye(3, dtype=DT)
    w = torch.linalg.solve(A, X.T @ Y / 10)

    def inner(t, p):
        return ((X @ t["w"] - Y) ** 2).mean() / 2 + p / 2 * (t["w"] ** 2).sum()

    def outer(t, p):
        return ((X @ t["w"] * t["head"] - Y) ** 2).mean()

    params = {"w": w, "head": torch.tensor([0.7], dtype=DT)}
    # dg/dlam = -g_w^T A^{-1} w (the head has no cross term: its null direction adds 0)
    g_w = 2 * 0.7 * X.T @ (X @ w * 0.7 - Y) / 10
    ref = -(g_w @ torch.linalg.solve(A, w))
    return inner, outer, params, lam, ref


@pytest.mark.parametrize("solver", [hg.Neumann(50, 0.5), hg.Neumann(50, "auto")])
def test_neumann_with_a_parameter_the_inner_loss_ignores(solver):
    inner, outer, params, lam, ref = _head_problem()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = hg.implicit(inner, outer, params, lam, solver, hvp="first_order")
        double = hg.implicit(inner, outer, params, lam, solver, hvp="double")
    assert [str(c.message) for c in caught] == []
    # 50 Neumann terms of the contraction: both modes reach the closed form to 1e-9
    assert abs(float(first) - float(ref)) < 1e-8 * abs(float(ref))
    assert abs(float(first) - float(double)) < 1e-8 * abs(float(ref))


def _interpolation():
    """An over-parameterized least-squares fit (5 rows, 12 unknowns) at a minimum."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(5, 12, generator=g, dtype=DT)
    y = torch.randn(5, generator=g, dtype=DT)
    w = torch.linalg.pinv(X) @ y

    def f(p, hp):
        return ((X @ p - y) ** 2).mean() / 2 + 0 * hp

    basis = torch.linalg.svd(X, full_matrices=True).Vh  # rows 5.. span the null space
    return f, w, X.T @ X / 5, basis


def test_products_along_the_null_space_of_an_over_parameterized_model():
    f, w, H, basis = _interpolation()
    norm = float(torch.linalg.matrix_norm(H, 2))
    lam = torch.tensor(0.1, dtype=DT)
    for v in (basis[7], basis[11], basis[1], basis[8] + 1e-12 * basis[0]):
        op = hg.HessianOperator(f, w, lam, mode="first_order")
        hv = op.matvec(v)
        assert float((hv - H @ v).norm()) < 1e-9 * norm * float(v.norm())
    # a second product along the null space uses the scale the first one measured: no probe
    op = hg.HessianOperator(f, w, lam, mode="first_order")
    op.matvec(basis[0])
    before = op.gradient_evaluations
    op.matvec(basis[9])
    assert op.gradient_evaluations - before <= 2 * 3  # its tries, no probe
    assert abs(op.scale - float((H @ basis[0]).norm())) < 1e-6 * norm


def test_a_smooth_product_costs_what_it_did():
    # a healthy direction passes its first check: one centre and two gradients
    f, w, H, basis = _interpolation()
    op = hg.HessianOperator(f, w, torch.tensor(0.1, dtype=DT), mode="first_order")
    v = basis[0] + basis[2] + basis[9]
    assert float((op.matvec(v) - H @ v).norm()) < 1e-9 * float(H.norm())
    assert op.gradient_evaluations == 3


def _kink_in_the_null_space(offset: float):
    """``f = 0.5 sum_{i>0} a_i x_i^2 + 3 relu(x_0 - s)``: ``x_0`` is a null direction of the
    smooth part, and the ReLU's switch ``s`` lies ``offset`` first-order steps away."""
    n = 5
    a = torch.arange(1.0, n + 1, dtype=DT)
    a[0] = 0.0
    x = torch.linspace(0.5, 1.5, n, dtype=DT)
    v = torch.zeros(n, dtype=DT)
    v[0] = 1.0
    h = first_order_step(float(x.norm()), 1.0, n, DT)
    switch = float(x[0]) - offset * h

    def f(p, lam):
        return 0.5 * (a * p * p).sum() + 3.0 * torch.relu(p[0] - switch) + 0 * lam

    return f, x, v, a


def test_a_kink_along_the_null_space_is_still_refused():
    f, x, v, a = _kink_in_the_null_space(0.1)  # inside the step and both halvings
    op = hg.HessianOperator(f, x, torch.tensor(0.5, dtype=DT), mode="first_order")
    u = torch.ones_like(x)
    u[0] = 0.0  # (away from the switch)
    assert float((op.matvec(u) - a * u).norm()) < 1e-8 * float(a.norm())  # a scale ~ 5 known
    with pytest.raises(hg.NonSmoothLossError, match="3 steps"):
        op.matvec(v)
    # without a known scale, the probe learns it before refusing
    fresh = hg.HessianOperator(f, x, torch.tensor(0.5, dtype=DT), mode="first_order")
    with pytest.raises(hg.NonSmoothLossError):
        fresh.matvec(v)


def test_a_kink_that_leaves_the_step_along_the_null_space_is_stepped_around():
    f, x, v, a = _kink_in_the_null_space(0.75)  # inside the step, outside its half
    op = hg.HessianOperator(f, x, torch.tensor(0.5, dtype=DT), mode="first_order")
    assert float(op.matvec(v).norm()) < 1e-8  # H e_0 = 0: the jump is not in the product
    u = torch.ones_like(x)
    assert float((op.matvec(u) - a * u).norm()) < 1e-8 * float(a.norm())
