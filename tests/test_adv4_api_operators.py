"""A released operator refuses products instead of returning zeros.

``HessianOperator.release()`` / ``FixedPointOperator.release()`` (public: "Free the retained
graph") emptied the graph, and every later ``matvec``, ``matmat``, ``dense`` or ``mixed``
returned zeros, as if the Hessian were 0: a CG solve on it then ends with ``x = 0`` and no
error. The products now raise; ``mode="first_order"``, which keeps no graph, still works.
"""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg

DT = torch.float64
W = torch.tensor([0.5, -1.0, 2.0], dtype=DT)
H = torch.tensor([0.3, 0.1, 0.2], dtype=DT)
# f = sum(h w^4) + w0 w1: Hessian diag(12 h w^2) + the (0, 1) coupling
HESS = torch.diag(12 * H * W**2) + torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=DT)


def _f(w, h):
    return (h * w**4).sum() + w[0] * w[1]


def _step(w, h):  # a gradient step: I - J^T = 0.1 * Hessian
    return w - 0.1 * torch.autograd.grad(_f(w, h), w, create_graph=True)[0]


def _ops():
    return {
        "hessian": (hg.HessianOperator(_f, W, H, mode="double"), HESS),
        "fixed_point": (hg.FixedPointOperator(_step, W, H), 0.1 * HESS),
    }


@pytest.mark.parametrize("kind", ["hessian", "fixed_point"])
@pytest.mark.parametrize("product", ["matvec", "matmat", "dense", "mixed"])
def test_products_after_release_raise(kind, product):
    op, ref = _ops()[kind]
    assert torch.allclose(op.dense(), ref, rtol=1e-14, atol=1e-15)  # exact before
    op.release()
    v = torch.ones(3, dtype=DT)
    call = {
        "matvec": lambda: op.matvec(v),
        "matmat": lambda: op.matmat(v[None]),
        "dense": op.dense,
        "mixed": lambda: op.mixed(v),
    }[product]
    with pytest.raises(RuntimeError, match="was released"):
        call()


def test_a_solver_on_a_released_operator_raises_instead_of_returning_zero():
    op, _ = _ops()["hessian"]
    op.release()
    with pytest.raises(RuntimeError, match="was released"):
        hg.CG().solve(op, torch.ones(3, dtype=DT))


def test_first_order_operators_keep_working_after_release():
    op = hg.HessianOperator(_f, W, H, mode="first_order")
    op.release()
    assert torch.allclose(op.dense(), HESS, rtol=1e-6, atol=1e-6)


class _Cube(torch.autograd.Function):
    """``x^3`` with a first-order-only backward: "auto" falls back (releasing the graph)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


def test_auto_mode_fallback_releases_internally_and_products_stay_right():
    with pytest.warns(hg.HypergradientWarning, match="double backward is not available"):
        op = hg.HessianOperator(lambda w, h: (h * _Cube.apply(w)).sum(), W, H)
    assert op.mode == "first_order"
    dense = op.dense()
    assert torch.allclose(dense, torch.diag(6 * H * W), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", ["float32", torch.int64, torch.complex64, None])
def test_a_linear_operator_subclass_needs_a_floating_dtype(dtype):
    """A string dtype was accepted and failed later inside a solver (torch.finfo('float32'))."""
    with pytest.raises(TypeError, match="`dtype` must be a floating-point torch.dtype"):
        hg.LinearOperator(3, dtype, "cpu")
