"""The lean paths of the implicit call (issue 11, goal 3) keep every guarantee.

The per-call work was cut (one host synchronization for the terms, ``||b||`` computed once
and used as its finiteness check, the solution's finiteness from a bound, a cheaper
``@once_differentiable`` walk, views without ``torch.split``, operators built from the
validated leaves). These tests pin what must not change: exact answers against dense
solves, the errors and their order, and the helpers' contracts against their references.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import hypergradient as hg
from hypergradient import _tree, _vocab
from hypergradient._vocab import NonFiniteHypergradientError
from hypergradient.operators.modes import delayed_error_in
from hypergradient.solvers.base import safe_norm
from once_diff import Cube as _Cube

DT = torch.float64


def _logreg(seed: int = 0, n: int = 60, d: int = 5):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = (torch.rand(n, generator=g, dtype=DT) < 0.5).to(DT)
    Xv = torch.randn(n, d, generator=g, dtype=DT)
    yv = (torch.rand(n, generator=g, dtype=DT) < 0.5).to(DT)

    def f(p, h):
        z = X @ p[0] + p[1]
        bce = torch.nn.functional.binary_cross_entropy_with_logits(z, y)
        return bce + 0.5 * torch.sum(torch.exp(h[0]) * p[0] ** 2)

    def gv(p, h):
        return torch.nn.functional.binary_cross_entropy_with_logits(Xv @ p[0] + p[1], yv)

    lam = torch.full((d,), math.log(0.1), dtype=DT)
    w = torch.zeros(d + 1, dtype=DT)
    for _ in range(30):  # Newton to the minimum
        H = torch.autograd.functional.hessian(lambda t: f((t[:d], t[d:]), (lam,)), w)
        gr = torch.func.grad(lambda t: f((t[:d], t[d:]), (lam,)))(w)
        w = w - torch.linalg.solve(H, gr)
    return f, gv, (w[:d].clone(), w[d:].clone()), (lam,)


def _dense_hypergradient(f, g, params, hparams):
    """``d_phi g - (d_phi grad f)^T H^{-1} grad g`` by dense float64 Jacobians."""
    d = params[0].numel()
    theta = torch.cat([p.reshape(-1) for p in params])

    def ff(t, h):
        return f((t[:d], t[d:]), (h,))

    H = torch.autograd.functional.hessian(lambda t: ff(t, hparams[0]), theta)
    gt = torch.func.grad(lambda t: g((t[:d], t[d:]), hparams))(theta)
    M = torch.autograd.functional.jacobian(
        lambda h: torch.func.grad(lambda t: ff(t, h))(theta), hparams[0]
    )  # (n_theta, n_phi)
    return -(M.T @ torch.linalg.solve(H, gt))


def test_implicit_cg_matches_the_dense_formula_and_info_is_complete():
    f, g, params, hparams = _logreg()
    ref = _dense_hypergradient(f, g, params, hparams)
    out, info = hg.implicit(f, g, params, hparams, hg.CG(maxiter=50, tol=1e-12), return_info=True)
    assert torch.allclose(out[0], ref, rtol=1e-9, atol=1e-12)
    again = hg.implicit(f, g, params, hparams, hg.CG(maxiter=50, tol=1e-12))
    assert torch.equal(again[0], out[0])  # return_info does not change the answer
    assert info.num_hvps == info.iterations and info.status == "converged"
    assert info.relative_residual <= 1e-12 and info.residual_norm is not None
    assert math.isfinite(info.inner_loss) and math.isfinite(info.outer_loss)
    assert info.inner_grad_norm < 1e-8 and info.outer_grad_norm > 0
    assert info.stats["hvp"] == "double" and info.solution.shape == (params[0].numel() + 1,)
    # the outer value is g at params
    assert info.outer_loss == pytest.approx(float(g(params, hparams)), rel=1e-15)
    assert info.inner_loss == pytest.approx(float(f(params, hparams)), rel=1e-15)


def test_the_result_is_independent_of_inputs_and_info():
    f, g, params, hparams = _logreg()
    out, info = hg.implicit(f, g, params, hparams, hg.CG(maxiter=5, tol=0.0), return_info=True)
    before = info.solution.clone()
    out[0].add_(1.0)
    assert torch.equal(info.solution, before)
    assert out[0]._base is None  # not a view of a shared buffer
    assert all(p.grad is None for p in params) and hparams[0].grad is None


def _nan_value_loss(kind):
    """A loss whose value is NaN while its gradient is finite (``0 * nan`` is not used)."""

    def loss(p, h):
        base = torch.nn.functional.binary_cross_entropy_with_logits(
            p[0].sum() + p[1].sum(), torch.tensor(0.5, dtype=DT)
        ) + 0.5 * torch.sum(torch.exp(h[0]) * p[0] ** 2)
        return base + (base.detach() * math.nan if kind == "value" else 0.0)

    return loss


def test_nonfinite_values_are_named_in_production_order():
    f, g, params, hparams = _logreg()
    with pytest.raises(NonFiniteHypergradientError, match="value of outer_loss"):
        hg.implicit(f, _nan_value_loss("value"), params, hparams, hg.CG(maxiter=3))
    with pytest.raises(NonFiniteHypergradientError, match="value of inner_loss"):
        hg.implicit(_nan_value_loss("value"), g, params, hparams, hg.CG(maxiter=3))

    def nan_grad(p, h):  # the inner gradient is NaN: named before the outer value
        return f(p, h) + (p[1] * torch.tensor(math.nan, dtype=DT)).sum()

    with pytest.raises(NonFiniteHypergradientError, match="gradient of inner_loss") as err:
        hg.implicit(nan_grad, _nan_value_loss("value"), params, hparams, hg.CG(maxiter=3))
    assert "[1]" in err.value.quantity  # the leaf that is not finite
    x0 = torch.zeros(params[0].numel() + 1, dtype=DT)
    x0[2] = math.inf
    with pytest.raises(NonFiniteHypergradientError, match="x0"):
        hg.implicit(f, g, params, hparams, hg.CG(maxiter=3), x0=x0)


def test_bad_inputs_raise_before_anything_runs():
    f, g, params, hparams = _logreg()
    calls = []

    def counted(p, h):
        calls.append(1)
        return f(p, h)

    bad = (hparams[0].clone().fill_(math.nan),)
    with pytest.raises(ValueError, match="hparams"):
        hg.implicit(counted, g, params, bad, hg.CG(maxiter=3))
    with pytest.raises(NonFiniteHypergradientError, match="parameter"):
        hg.implicit(counted, g, (params[0] * math.inf, params[1]), hparams, hg.CG(maxiter=3))
    with pytest.raises(ValueError, match="also a leaf"):
        hg.implicit(counted, g, params, (params[0],), hg.CG(maxiter=3))
    with pytest.raises(TypeError):
        hg.implicit(counted, g, params, hparams, "cg")
    assert not calls


# ------------------------------------------------------------------------------- CG


def _spd(n, cond, dtype=DT, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    A = Q @ torch.diag(torch.logspace(0, math.log10(cond), n, dtype=DT)) @ Q.T
    return ((A + A.T) / 2).to(dtype), torch.randn(n, generator=g, dtype=DT).to(dtype)


def test_validate_returns_the_norm_of_b_and_names_a_nonfinite_b():
    A, b = _spd(8, 10.0)
    op = hg.MatrixOperator(A, symmetric=True)
    assert hg.CG().validate(op, b, None) == safe_norm(b)
    for bad in (math.nan, math.inf):
        b2 = b.clone()
        b2[3] = bad
        with pytest.raises(NonFiniteHypergradientError, match="right-hand side"):
            hg.CG().solve(op, b2)
    x0 = torch.zeros_like(b)
    x0[0] = math.nan
    with pytest.raises(NonFiniteHypergradientError, match="x0"):
        hg.CG().solve(op, b, x0)


@pytest.mark.parametrize("scale", [1e200, 1e-170])
def test_cg_where_the_float64_norm_of_b_over_or_underflows(scale):
    # ||b||^2 overflows (1e200) or underflows (1e-170) in float64: the norm is rescaled
    A = torch.diag(torch.linspace(1.0, 4.0, 6, dtype=DT))
    b = torch.linspace(-1.0, 2.0, 6, dtype=DT) * scale
    sol = hg.CG(maxiter=20, tol=1e-12).solve(hg.MatrixOperator(A, symmetric=True), b)
    assert sol.status == "converged"
    assert torch.allclose(sol.value / scale, torch.linalg.solve(A, b / scale), rtol=1e-12)


def test_cg_solution_that_overflows_its_dtype_is_refused():
    A = torch.eye(5, dtype=DT) * 1e-300
    b = torch.ones(5, dtype=DT) * 1e300
    with pytest.raises(NonFiniteHypergradientError, match="solution x"):
        hg.CG(maxiter=5).solve(hg.MatrixOperator(A, symmetric=True), b)
    A32 = torch.eye(5) * 1e-30
    with pytest.raises(NonFiniteHypergradientError, match="solution x"):
        hg.CG(maxiter=5).solve(hg.MatrixOperator(A32, symmetric=True), torch.ones(5) * 1e30)


@pytest.mark.parametrize("dtype", [torch.float32, DT])
def test_cg_answers_and_keeps_its_best_iterate(dtype):
    A, b = _spd(12, 1e3, dtype)
    op = hg.MatrixOperator(A, symmetric=True)
    exact = torch.linalg.solve(A.double(), b.double())
    sol = hg.CG(maxiter=200, tol=1e-5).solve(op, b)
    assert sol.status == "converged"
    assert (sol.value.double() - exact).norm() / exact.norm() < (1e-3 if dtype == DT else 5e-2)
    # a warm start worse than x = 0 is dropped, and its product counted
    worse = hg.CG(maxiter=3, tol=0.0).solve(op, b, -100 * exact.to(dtype))
    assert worse.stats.get("warm_start_dropped") and worse.num_hvps == 4
    # never worse than x = 0: the returned residual is at most ||b||
    for k in (1, 2, 3, 5):
        s = hg.CG(maxiter=k, tol=0.0).solve(op, b)
        assert s.residual_norm <= float(b.double().norm()) * (1 + 1e-6)
        true = float((b.double() - A.double() @ s.value.double()).norm())
        assert true == pytest.approx(s.residual_norm, rel=1e-3 if dtype == DT else 0.1)


def test_cg_stops_on_negative_curvature_with_the_best_iterate():
    A = torch.diag(torch.tensor([1.0, 2.0, -1.0, 3.0], dtype=DT))
    b = torch.ones(4, dtype=DT)
    sol = hg.CG(maxiter=10).solve(hg.MatrixOperator(A, symmetric=True), b)
    assert sol.status == "negative_curvature"
    assert float((b - A @ sol.value).norm()) <= float(b.norm())


@pytest.mark.parametrize("scale", [1e200, 1e-170])
def test_neumann_is_linear_in_b_where_its_norms_over_or_underflow(scale):
    # the series runs on b / ||b||; its residual norms, read in float64 each term, fall
    # back to the rescaled norm only on over- or underflow: the partial sums are s x(b)
    A = torch.diag(torch.linspace(1.0, 4.0, 6, dtype=DT))
    b = torch.linspace(-1.0, 2.0, 6, dtype=DT)
    op = hg.MatrixOperator(A, symmetric=True)
    one = hg.Neumann(30, alpha=0.2).solve(op, b)
    big = hg.Neumann(30, alpha=0.2).solve(op, b * scale)
    torch.testing.assert_close(big.value / scale, one.value, rtol=1e-13, atol=0.0)
    # in closed form: alpha sum_{j <= 30} (I - alpha A)^j b (the term j = 0 is b itself)
    M = torch.eye(6, dtype=DT) - 0.2 * A
    exact = 0.2 * sum(torch.linalg.matrix_power(M, j) @ b for j in range(31))  # 30 products
    torch.testing.assert_close(one.value, exact, rtol=1e-12, atol=1e-14)


def test_neumann_keeps_the_partial_sum_with_the_smallest_residual_when_it_diverges():
    # alpha = 0.5 > 2 / lambda_max = 0.4 on the top direction: the residual first shrinks
    # (the other directions), then grows; the returned sum is the one with the smallest
    # residual, and that residual is the reported one
    A = torch.diag(torch.tensor([1.0, 1.2, 5.0], dtype=DT))
    b = torch.tensor([1.0, 1.0, 1e-3], dtype=DT)
    op = hg.MatrixOperator(A, symmetric=True)
    sol = hg.Neumann(60, alpha=0.5).solve(op, b)
    assert sol.status == "diverged"
    M = torch.eye(3, dtype=DT) - 0.5 * A
    terms = [torch.linalg.matrix_power(M, j) @ b for j in range(60)]
    sums = [0.5 * sum(terms[:k], torch.zeros(3, dtype=DT)) for k in range(61)]
    residuals = [float((b - A @ x).norm()) for x in sums[:-1]]
    best = min(range(len(residuals)), key=residuals.__getitem__)
    torch.testing.assert_close(sol.value, sums[best], rtol=1e-12, atol=1e-15)
    assert sol.residual_norm == pytest.approx(residuals[best], rel=1e-10)


# ------------------------------------------------------------------------------- helpers


def _cases():
    g = torch.Generator().manual_seed(0)
    big = torch.full((4,), 1e308, dtype=DT)  # finite, but its sum overflows
    yield [torch.randn(3, generator=g, dtype=DT), torch.randn(2, 2, generator=g)]
    yield [big, torch.ones(2)]
    yield [torch.tensor([1.0, math.nan]), torch.ones(3, dtype=DT)]
    yield [torch.ones(3, dtype=DT), torch.tensor([math.inf, -math.inf])]
    yield [torch.ones(2, dtype=torch.float16) * 60000, torch.ones(1, dtype=torch.bfloat16)]
    yield [torch.tensor([1 + 1j, 2.0]), None, torch.zeros(0)]
    yield [torch.tensor([1 + 1j, complex(math.nan, 0)])]
    yield [torch.arange(3), torch.ones(2)]
    yield []


def test_finiteness_probes_of_leaves_that_require_grad_warn_nothing_and_record_nothing():
    w = torch.linspace(-1.0, 1.0, 5, dtype=DT, requires_grad=True)
    y = w * 2  # a non-leaf in a graph
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when a tensor needing grad is read
        assert _vocab.all_finite([w, y]) and _vocab.is_finite(y)
        assert not _vocab.all_finite([w, y * math.inf])
    assert not _vocab.finite_probe(y).requires_grad


def test_all_finite_agrees_with_the_exact_check():
    for leaves in _cases():
        exact = all(
            bool(torch.isfinite(t).all())
            for t in leaves
            if t is not None and (t.is_floating_point() or t.is_complex())
        )
        assert _vocab.all_finite(leaves) is exact


def test_tree_split_gives_the_views_torch_split_gives():
    spec = _tree.flatten({"a": torch.zeros(2, 3), "b": [torch.zeros(4), torch.zeros(())]}, "t")[1]
    assert spec.size == 11 and spec.numels == [6, 4, 1]
    spec.numels.append(0)  # a fresh list each time: the cached sizes do not change
    assert spec.numels == [6, 4, 1]
    v = torch.arange(11, dtype=DT)
    ref = [p.reshape(s) for p, s in zip(torch.split(v, [6, 4, 1]), spec.shapes)]
    got = _tree.split(v, spec)
    for r, o in zip(ref, got):
        assert torch.equal(r, o) and o.shape == r.shape and o._base is v
    batch = torch.arange(22, dtype=DT).reshape(2, 11)
    for i, o in enumerate(_tree.split(batch, spec)):
        assert o.shape == (2, *spec.shapes[i])
        assert torch.equal(o[1].reshape(-1), batch[1, [0, 6, 10][i] : [6, 10, 11][i]])
    cast = _tree.split(v, spec, [torch.float32, DT, torch.float16])
    assert [c.dtype for c in cast] == [torch.float32, DT, torch.float16]


def test_tree_cat_copies_and_casts():
    a, b = torch.ones(2, 2, dtype=torch.float32), torch.arange(3, dtype=DT)
    spec = _tree.flatten((a, b, torch.zeros(2)), "t")[1]
    out = _tree.cat([a, b, None], spec, DT, "cpu")
    assert out.dtype == DT and torch.equal(
        out, torch.tensor([1, 1, 1, 1, 0, 1, 2, 0, 0.0], dtype=DT)
    )
    one = _tree.flatten(b, "t")[1]
    flat = _tree.cat([b], one, DT, "cpu")
    flat[0] = 5.0
    assert b[0] == 0  # a copy, never the leaf itself


def test_once_differentiable_nodes_are_found_deep_in_a_large_graph():
    w = torch.randn(4, dtype=DT, requires_grad=True)
    c = torch.randn(4, dtype=DT, requires_grad=True)

    def deep(x, cube):
        y = _Cube.apply(x) if cube else x**3 / 3
        for _ in range(300):  # many nodes after the custom function
            y = torch.tanh(y) + 0.1 * y
        return (c * y).sum()

    for cube in (False, True, False, True):  # the node-class cache answers both ways
        (grad,) = torch.autograd.grad(deep(w, cube), w, create_graph=True)
        assert delayed_error_in([grad]) is cube
    with pytest.raises(RuntimeError, match="once_differentiable"):
        hg.HessianOperator(lambda p, h: deep(p, True), w.detach(), c.detach(), mode="double")


def test_operator_from_validated_leaves_equals_the_constructor():
    f, g, params, hparams = _logreg()
    p_leaves, p_spec = _tree.flatten(params, "params")
    h_leaves, h_spec = _tree.flatten(hparams, "hparams")
    a = hg.HessianOperator(f, params, hparams)
    b = hg.HessianOperator.from_leaves(f, (p_leaves, p_spec), (h_leaves, h_spec))
    v = torch.linspace(-1, 1, a.size, dtype=DT)
    assert torch.equal(a.matvec(v), b.matvec(v)) and torch.equal(a.grad, b.grad)
    assert all(torch.equal(x, y) for x, y in zip(a.mixed(v), b.mixed(v)))
    assert float(a.loss) == float(b.loss)
    assert all(x is not y and not y.grad_fn for x, y in zip(p_leaves, b.param_leaves))
    with pytest.raises(ValueError, match="requires_grad"):
        hg.HessianOperator.from_leaves(
            f, (p_leaves, p_spec), (h_leaves, h_spec), hparams_by_reference=True
        )


def test_products_with_matrix_and_mixed_dtype_leaves():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(3, 2, generator=g, dtype=torch.float32)
    u = torch.randn(4, generator=g, dtype=DT)
    s = torch.randn((), generator=g, dtype=DT)

    def f(p, h):
        return (
            (p["W"].double() ** 2).sum() * h[0].exp()
            + (p["u"] ** 4).sum()
            + p["s"] ** 2 * p["u"].sum()
        )

    op = hg.HessianOperator(f, {"W": W, "u": u, "s": s}, (torch.tensor(0.3, dtype=DT),))
    V = torch.randn(3, op.size, generator=g, dtype=DT)
    looped = torch.stack([op.matvec(v) for v in V])
    dense = op.dense()
    assert torch.allclose(looped, V @ dense.T, rtol=1e-6, atol=1e-6)
    assert torch.allclose(op.matmat(V), looped, rtol=1e-6, atol=1e-6)
