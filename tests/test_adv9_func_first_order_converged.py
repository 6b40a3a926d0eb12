"""First-order forward mode on a converged smooth run is not refused as a kink.

Adversarial round 9: ``hg.forward_mode(..., hvp="first_order")`` (also what ``hvp="auto"``
falls back to for kernels without double backward) raised ``NonSmoothLossError`` ("the
loss has a kink") on ridge regression, a quadratic, once SGD had converged (40 steps at
lr 0.5). Its tangents ``H Z_t + H_tp`` tend to zero as the run converges (the implicit
function theorem), so the first derivative along the direction vanishes while the smooth
second-order term ``h^2 v_theta v_phi`` (the loss is bilinear in ``theta`` and the decay)
remains: their ratio failed the kink test at every step size. The kink test now also
accepts a difference whose curvature vector ``g_+ + g_- - 2 g_0`` became a quarter of itself
at each of two halvings (``h^2``, as no kink does: a probe of 480 products on ReLU and
LeakyReLU MLPs, float32 and float64, saw no such pair); ReLU networks are still refused
(``tests/test_operators_kinks.py``).
"""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg
from hypergradient.operators.modes import central_difference

DT = torch.float64

gen = torch.Generator().manual_seed(0)
X = torch.randn(10, 3, generator=gen, dtype=DT)
Y = torch.randn(10, generator=gen, dtype=DT)


def inner(w, lam):
    return ((X @ w - Y) ** 2).mean() / 2 + lam / 2 * (w**2).sum()


def outer(w, lam):
    return ((0.7 * X @ w - Y) ** 2).mean()


def _loop_gradient(lam: float, steps: int, lr: float) -> float:
    """d outer(w_T) / d lam by autograd through the plain loop."""
    h = torch.tensor(lam, dtype=DT, requires_grad=True)
    w = torch.zeros(3, dtype=DT, requires_grad=True)
    for _ in range(steps):
        (grad,) = torch.autograd.grad(inner(w, h), w, create_graph=True)
        w = w - lr * grad
    (out,) = torch.autograd.grad(outer(w, h), h)
    return float(out)


@pytest.mark.parametrize("steps", [40, 100])
def test_first_order_forward_mode_through_a_converged_run(steps):
    lam = torch.tensor(0.3, dtype=DT)
    got, info = hg.forward_mode(
        inner,
        outer,
        torch.zeros(3, dtype=DT),
        lam,
        steps,
        hg.optim.sgd(0.5),
        hvp="first_order",
        return_info=True,
    )
    assert info.stats["hvp"] == "first_order"
    want = _loop_gradient(0.3, steps, 0.5)
    assert float(got) == pytest.approx(want, rel=1e-8)
    # the converged run's hypergradient is the implicit one: (X^T X / n + lam I)^{-1} closed form
    A = X.T @ X / 10 + 0.3 * torch.eye(3, dtype=DT)
    w = torch.linalg.solve(A, X.T @ Y / 10)
    dw = -torch.linalg.solve(A, w)
    exact = float((2 * 0.7 * X.T @ (0.7 * X @ w - Y) / 10) @ dw)
    assert float(got) == pytest.approx(exact, rel=1e-6)


def test_a_vanishing_first_derivative_with_curvature_is_smooth():
    # g(x) = grad of x^3 / 3 = x^2 at x = 0 along v = 1: g(+h) + g(-h) - 2 g(0) = 2 h^2 and
    # g(+h) - g(-h) = 0 (a ratio of infinity at every step), the product (0) is exact
    def evaluate(step):
        x = torch.tensor([step], dtype=DT)
        return [x**2], [(-x) ** 2]

    out = central_difference(evaluate, [torch.zeros(1, dtype=DT)], 1e-3, "x^3/3")
    assert float(out[0]) == 0.0


def test_a_jump_is_still_refused():
    # g(x) = sign(x) + x at 0 (|x| + x^2 / 2): the curvature term is the jump at every step
    def evaluate(step):
        x = torch.tensor([step], dtype=DT)
        return [torch.sign(x) + x + 0.5], [torch.sign(-x) - x + 0.5]

    with pytest.raises(hg.NonSmoothLossError):
        central_difference(evaluate, [torch.zeros(1, dtype=DT)], 1e-3, "a kink")
