"""Product modes of the Hessian operator: double backward, math kernels, first order, auto.

Issue 10, item 1: models with fused kernels (``nn.TransformerEncoderLayer`` calls
``F.scaled_dot_product_attention``, whose CPU flash kernel has no double backward) failed
in every implicit method. References: double-backward products of the same float64
model (which central differences must match to ``O(eps^(2/3))``), dense Hessians of
closed-form functions, and the products of the other modes.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hypergradient as hg
from hypergradient._vocab import HypergradientWarning
from hypergradient.operators.modes import first_order_step, is_double_backward_error
from once_diff import Cube as _Cube

DT = torch.float64


def rel(a, b):
    a, b = a.detach().to(DT), b.detach().to(DT)
    return float((a - b).norm() / b.norm())


def directions(n, k=4, dtype=DT):
    g = torch.Generator().manual_seed(123)
    return [torch.randn(n, generator=g, dtype=DT).to(dtype) for _ in range(k)]


# ----------------------------------------------------------------------------- models


def mlp_problem(dtype, dropout=0.0):
    """A tanh MLP with weight decay: ``f(params, lam)``; data made in float64, then cast."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Dropout(dropout), nn.Linear(12, 3))
    model = model.to(dtype)
    X = torch.randn(24, 5, generator=g, dtype=DT).to(dtype)
    y = torch.randint(0, 3, (24,), generator=g)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    lam = torch.tensor([0.01, 0.02], dtype=dtype)

    def f(p, h):
        out = functional_call(model, p, (X,))
        decay = h[0] * (p["0.weight"] ** 2).sum() + h[1] * (p["3.weight"] ** 2).sum()
        return nn.functional.cross_entropy(out, y) + decay

    return f, params, lam


def transformer_problem(dtype, dropout=0.0):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    layer = nn.TransformerEncoderLayer(
        d_model=8, nhead=2, dim_feedforward=16, dropout=dropout, batch_first=True
    ).to(dtype)
    X = torch.randn(3, 5, 8, generator=g, dtype=DT).to(dtype)
    params = {k: v.detach().clone() for k, v in layer.named_parameters()}
    lam = torch.tensor(0.01, dtype=dtype)

    def f(p, h):
        out = functional_call(layer, p, (X,))
        return out.pow(2).mean() + h * sum((t**2).sum() for t in p.values())

    return f, params, lam


def sdpa_has_no_double_backward() -> bool:
    f, params, lam = transformer_problem(DT)
    op = hg.HessianOperator(f, params, lam, mode="double")
    try:
        op.matvec(torch.ones(op.size, dtype=DT))
    except RuntimeError as error:
        return is_double_backward_error(error)
    return False


NEEDS_FALLBACK = pytest.mark.skipif(
    not sdpa_has_no_double_backward(),
    reason="this torch has a double backward for the CPU attention kernel",
)


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize(("dtype", "bound"), [(DT, 1e-8), (torch.float32, 1e-3)])
def test_first_order_products_match_double_backward_on_an_mlp(dtype, bound):
    # Measured (8 directions): max relative error of H v 1.1e-10 in float64 and 6.7e-5 in
    # float32, of the mixed product 7e-10 and 4e-4; the reference is the float64
    # double-backward product of the same (cast) model.
    f, params, lam = mlp_problem(dtype)
    f64, params64, lam64 = mlp_problem(DT)
    ref = hg.HessianOperator(f64, {k: v.to(DT) for k, v in params.items()}, lam64, mode="double")
    op = hg.HessianOperator(f, params, lam, mode="first_order")
    assert op.mode == "first_order" and op.requested_mode == "first_order"
    assert op.dtype == dtype
    for v in directions(op.size):
        assert rel(op.matvec(v.to(dtype)), ref.matvec(v)) < bound
        mixed = op.mixed(v.to(dtype))[0]
        assert mixed.dtype == dtype
        assert rel(mixed, ref.mixed(v)[0]) < bound
    # two gradients per product, mixed included, and the gradient at the point once for the
    # products and once for the mixed ones (the kink check's centre)
    assert op.gradient_evaluations == 4 * 4 + 2
    assert op.num_matvecs == 4
    # the point's loss and gradient are those of the double-backward operator
    assert rel(op.grad, ref.grad) < 10 * torch.finfo(dtype).eps ** 0.5
    assert float(op.loss) == pytest.approx(float(ref.loss), rel=1e-6)


def test_first_order_accuracy_follows_the_step_rule():
    # The rule h = eps^(1/3) (1 + rms(theta)) / ||v|| is near the optimum: ten times
    # smaller or larger steps are less accurate in float64.
    f, params, lam = mlp_problem(DT)
    ref = hg.HessianOperator(f, params, lam, mode="double")
    v = directions(ref.size, 1)[0]
    expected = ref.matvec(v)
    theta = torch.cat([t.reshape(-1) for t in params.values()])

    def central(scale):
        h = scale * first_order_step(float(theta.norm()), float(v.norm()), v.numel(), DT)
        grads = []
        for sign in (1.0, -1.0):
            p = dict(params)
            offset = 0
            for k, t in params.items():
                p[k] = (
                    t + sign * h * v[offset : offset + t.numel()].reshape(t.shape)
                ).requires_grad_()
                offset += t.numel()
            loss = f(p, lam)
            grads.append(
                torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(p.values()))])
            )
        return rel((grads[0] - grads[1]) / (2 * h), expected)

    at_rule = central(1.0)
    op = hg.HessianOperator(f, params, lam, mode="first_order")
    assert rel(op.matvec(v), expected) == pytest.approx(at_rule, rel=1e-3)
    assert at_rule < central(0.1) and at_rule < central(10.0)


def test_zero_direction_costs_no_gradient():
    f, params, lam = mlp_problem(DT)
    op = hg.HessianOperator(f, params, lam, mode="first_order")
    out = op.matvec(torch.zeros(op.size, dtype=DT))
    assert torch.equal(out, torch.zeros(op.size, dtype=DT)) and op.gradient_evaluations == 0
    mixed = op.mixed(torch.zeros(op.size, dtype=DT))
    assert torch.equal(mixed[0], torch.zeros(2, dtype=DT))


def test_first_order_matmat_and_dense_match_double_backward():
    f, params, lam = mlp_problem(DT)
    ref = hg.HessianOperator(f, params, lam, mode="double").dense()
    op = hg.HessianOperator(f, params, lam, mode="first_order")
    dense = op.dense()
    assert op.num_matvecs == op.size
    assert float((dense - ref).norm() / ref.norm()) < 1e-8


# ----------------------------------------------------------------------------- dropout


def test_first_order_products_replay_the_dropout_masks_of_the_graph():
    f, params, lam = mlp_problem(DT, dropout=0.3)
    torch.manual_seed(7)
    ref = hg.HessianOperator(f, params, lam, mode="double")
    after_double = torch.get_rng_state()
    torch.manual_seed(7)
    op = hg.HessianOperator(f, params, lam, mode="first_order")
    # construction draws once from the global stream, as the double-backward build does
    assert torch.equal(torch.get_rng_state(), after_double)
    assert float(op.loss) == float(ref.loss)
    for v in directions(op.size, 3):
        assert rel(op.matvec(v), ref.matvec(v)) < 1e-8
        assert rel(op.mixed(v)[0], ref.mixed(v)[0]) < 1e-8
    # products do not advance the global stream
    assert torch.equal(torch.get_rng_state(), after_double)


def test_without_replay_the_masks_differ_and_the_difference_is_garbage():
    # The control: the same central difference with fresh dropout masks per gradient.
    f, params, lam = mlp_problem(DT, dropout=0.3)
    torch.manual_seed(7)
    ref = hg.HessianOperator(f, params, lam, mode="double")
    v = directions(ref.size, 1)[0]
    h = 1e-5
    grads = []
    for sign in (1.0, -1.0):
        p, offset = {}, 0
        for k, t in params.items():
            p[k] = (t + sign * h * v[offset : offset + t.numel()].reshape(t.shape)).requires_grad_()
            offset += t.numel()
        loss = f(p, lam)
        grads.append(
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(p.values()))])
        )
    assert rel((grads[0] - grads[1]) / (2 * h), ref.matvec(v)) > 1.0


# ----------------------------------------------------------------------------- auto


@NEEDS_FALLBACK
def test_transformer_products_in_auto_mode_fall_back_to_the_math_kernels():
    f, params, lam = transformer_problem(DT)
    op = hg.HessianOperator(f, params, lam)  # mode="auto"
    assert op.requested_mode == "auto" and op.mode == "double"  # nothing failed yet
    with pytest.warns(HypergradientWarning, match="double_math") as record:
        first = op.matvec(directions(op.size, 1)[0])
    assert len([w for w in record if issubclass(w.category, HypergradientWarning)]) == 1
    assert op.mode == "double_math"
    assert "scaled_dot_product" in op.fallback_reason and "not implemented" in op.fallback_reason
    fo = hg.HessianOperator(f, params, lam, mode="first_order")
    math = hg.HessianOperator(f, params, lam, mode="double_math")
    assert fo.fallback_reason is None and math.fallback_reason is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no further warning from this operator
        for v in directions(op.size, 3):
            hv = op.matvec(v)
            assert rel(hv, math.matvec(v)) < 1e-12
            assert rel(hv, fo.matvec(v)) < 1e-7  # measured 2e-10
            assert rel(op.mixed(v)[0].reshape(1), fo.mixed(v)[0].reshape(1)) < 1e-7
        assert (
            rel(
                op.matmat(torch.stack(directions(op.size, 5))),
                math.matmat(torch.stack(directions(op.size, 5))),
            )
            < 1e-12
        )
    assert rel(first, math.matvec(directions(op.size, 1)[0])) < 1e-12


@NEEDS_FALLBACK
def test_transformer_double_mode_raises_torchs_error():
    f, params, lam = transformer_problem(DT)
    op = hg.HessianOperator(f, params, lam, mode="double")
    with pytest.raises(RuntimeError, match="not implemented"):
        op.matvec(torch.ones(op.size, dtype=DT))


@NEEDS_FALLBACK
def test_transformer_float32_first_order_agrees_with_the_math_kernels():
    # Measured (8 directions): max relative error 2.5e-4 in float32 (3.1e-10 in float64)
    # against float64 math-kernel products.
    f, params, lam = transformer_problem(torch.float32)
    f64, _, lam64 = transformer_problem(DT)
    ref = hg.HessianOperator(
        f64, {k: v.to(DT) for k, v in params.items()}, lam64, mode="double_math"
    )
    op = hg.HessianOperator(f, params, lam, mode="first_order")
    for v in directions(op.size, 3):
        assert rel(op.matvec(v.float()), ref.matvec(v)) < 1e-3


@NEEDS_FALLBACK
def test_transformer_with_dropout_in_auto_mode_keeps_the_masks():
    # (with dropout torch may pick the math kernel by itself; whatever the mode, a rebuild
    # replays the masks and first-order products use them too)
    f, params, lam = transformer_problem(DT, dropout=0.2)
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HypergradientWarning)
        op = hg.HessianOperator(f, params, lam)
        v = directions(op.size, 1)[0]
        hv = op.matvec(v)
    torch.manual_seed(3)
    fo = hg.HessianOperator(f, params, lam, mode="first_order")
    assert float(op.loss) == float(fo.loss)
    assert rel(hv, fo.matvec(v)) < 1e-7


def test_auto_falls_back_to_first_order_when_the_math_kernels_do_not_help():
    def f(w, c):
        return (c * _Cube.apply(w)).sum()

    w = torch.tensor([0.5, -1.0, 2.0], dtype=DT)
    c = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
    v = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    # Torch itself raises nothing here: the product with respect to w never reaches the
    # Error node of the once-differentiable backward and silently returns 0.
    w_, c_ = w.clone().requires_grad_(), c.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(w_, c_), w_, create_graph=True)
    silent = torch.autograd.grad(g, w_, grad_outputs=v, allow_unused=True)[0]
    assert silent is None or not bool(silent.any())
    with pytest.warns(HypergradientWarning, match="first_order"):
        op = hg.HessianOperator(f, w, c)
    assert op.mode == "first_order" and "once_differentiable" in op.fallback_reason
    hv = op.matvec(v)
    assert rel(hv, 2 * c * w * v) < 1e-9  # H = diag(2 c w)
    assert rel(op.mixed(v)[0], w**2 * v) < 1e-9  # d/dc <c w^2, v>
    for mode in ("double", "double_math"):
        with pytest.raises(RuntimeError, match="once_differentiable"):
            hg.HessianOperator(f, w, c, mode=mode)


def test_auto_mode_is_double_backward_when_it_works():
    f, params, lam = mlp_problem(DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op = hg.HessianOperator(f, params, lam)
        ref = hg.HessianOperator(f, params, lam, mode="double")
        for v in directions(op.size, 2):
            assert torch.equal(op.matvec(v), ref.matvec(v))
    assert op.mode == "double" and op.fallback_reason is None


@NEEDS_FALLBACK
def test_implicit_on_a_transformer_works_in_the_default_mode():
    f, params, lam = transformer_problem(DT)

    def outer(p, h):
        return sum((t**3).sum() for t in p.values())

    with pytest.warns(HypergradientWarning, match="double_math") as record:
        hyper = hg.implicit(f, outer, params, lam, solver=hg.CG(maxiter=5, tol=0.0), damping=2.0)
    assert not any("curvature" in str(w.message) for w in record)
    # reference: the same CG on the damped first-order operator (the same Krylov space up
    # to the first-order error), then the first-order mixed product
    op = hg.HessianOperator(f, params, lam, mode="first_order")
    b = torch.cat([3 * t.reshape(-1) ** 2 for t in params.values()])
    x = hg.CG(maxiter=5, tol=0.0).solve(hg.DampedOperator(op, 2.0), b).value
    assert rel(hyper.reshape(1), -op.mixed(x)[0].reshape(1)) < 1e-6


# ----------------------------------------------------------------------------- fixed point


@NEEDS_FALLBACK
def test_fixed_point_operator_with_a_gradient_step_through_attention():
    f, params, lam = transformer_problem(DT)

    def step(p, h):
        with torch.enable_grad():
            leaves = list(p.values())
            grads = torch.autograd.grad(f(p, h), leaves, create_graph=True)
        return {k: t - 0.1 * g for (k, t), g in zip(p.items(), grads)}

    op = hg.FixedPointOperator(step, params, lam)
    math = hg.FixedPointOperator(step, params, lam, mode="double_math")
    hess = hg.HessianOperator(f, params, lam, mode="double_math")
    v = directions(op.size, 1)[0]
    with pytest.warns(HypergradientWarning, match="double_math"):
        out = op.matvec(v)
    assert op.mode == "double_math"
    assert rel(out, math.matvec(v)) < 1e-12
    assert rel(out, 0.1 * hess.matvec(v)) < 1e-12  # I - (I - 0.1 H)^T


def test_mode_is_validated():
    f, params, lam = mlp_problem(DT)
    with pytest.raises(ValueError, match="`mode`"):
        hg.HessianOperator(f, params, lam, mode="fast")
    with pytest.raises(ValueError, match="J\\^T v"):
        hg.FixedPointOperator(lambda p, h: p, params, lam, mode="first_order")
    with pytest.raises(ValueError, match="`mode`"):
        hg.FixedPointOperator(lambda p, h: p, params, lam, mode=None)


def test_first_order_with_hparams_by_reference():
    f, params, lam = mlp_problem(DT)
    lam = lam.clone().requires_grad_(True)

    def by_ref(p, _h):
        return f(p, lam)

    ref = hg.HessianOperator(by_ref, params, lam, hparams_by_reference=True, mode="double")
    op = hg.HessianOperator(by_ref, params, lam, hparams_by_reference=True, mode="first_order")
    v = directions(op.size, 1)[0]
    assert rel(op.matvec(v), ref.matvec(v)) < 1e-8
    assert rel(op.mixed(v)[0], ref.mixed(v)[0]) < 1e-8
    assert lam.grad is None
