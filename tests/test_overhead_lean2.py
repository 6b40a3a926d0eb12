"""The second round of lean paths of the implicit call (issue 11, goal 3) changes no number.

CG on the CPU steps with Python scalars and keeps its best iterate by reference; Hessian
products take a direct path when every leaf is connected and of one dtype; the implicit
formula returns the difference itself for one hyperparameter leaf; trees keep their leaf
sizes; ``all_finite`` adds CPU sums on the host. Each test compares the lean path with the
general one bit for bit, or checks the guarantee the lean path could have broken.
"""

from __future__ import annotations

import importlib
import math
import sys

import pytest
import torch

import hypergradient as hg
from hypergradient import _autograd, _tree, _vocab
from hypergradient.operators.graph import SYMBOLIC_SHAPES, direct_vjp
from hypergradient.solvers import cg as cg_module

DT = torch.float64


def _spd(n: int, cond: float, seed: int, dtype: torch.dtype = DT, negative: bool = False):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    eig = torch.logspace(0, math.log10(cond), n, dtype=DT)
    if negative:
        eig[0] = -1.0
    a = (q * eig) @ q.T
    return a.to(dtype), torch.randn(n, generator=g, dtype=DT).to(dtype)


def _solve(a, b, *, accelerator_path: bool, monkeypatch, **kw):
    """CG's solution with the CPU (Python scalars) or the accelerator (0-d tensors) path."""
    if accelerator_path:
        init = cg_module._Run.__init__

        def as_accelerator(self, op, b, *args, **kwargs):
            init(self, op, b, *args, **kwargs)
            self.on_host = False
            self.host = torch.empty(5, dtype=self.wide, device=b.device)
            self.host_pap, self.host_norms = self.host[0], self.host[1:]

        monkeypatch.setattr(cg_module._Run, "__init__", as_accelerator)
    x0 = kw.pop("x0", None)
    sol = hg.CG(**kw).solve(hg.MatrixOperator(a, symmetric=True), b, x0)
    monkeypatch.undo()
    return sol


CASES = [
    dict(dtype=DT, cond=10.0, tol=0.0),
    dict(dtype=DT, cond=1e8, tol=1e-10),  # rounding amplified: any changed rounding shows
    dict(dtype=DT, cond=1e4, tol=1e-8, warm=True),
    dict(dtype=DT, cond=1e4, tol=1e-8, pre=True),
    dict(dtype=torch.float32, cond=1e3, tol=1e-5),
    dict(dtype=torch.float32, cond=1e6, tol=0.0, pre=True),
    dict(dtype=DT, cond=100.0, tol=1e-8, negative=True),
]


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_cpu_scalar_steps_equal_tensor_steps_bit_for_bit(case, monkeypatch):
    """The CPU path (Python-float step sizes) rounds exactly as the 0-d-tensor path."""
    a, b = _spd(30, case["cond"], 3, case["dtype"], case.get("negative", False))
    kw = dict(maxiter=60, tol=case["tol"])
    if case.get("pre"):
        d = torch.diagonal(a).clone()
        kw["preconditioner"] = lambda r: r / d
    if case.get("warm"):
        kw["x0"] = torch.full_like(b, 0.1)
    host = _solve(a, b, accelerator_path=False, monkeypatch=monkeypatch, **dict(kw))
    device = _solve(a, b, accelerator_path=True, monkeypatch=monkeypatch, **dict(kw))
    assert torch.equal(host.value, device.value)
    assert (host.status, host.iterations, host.num_hvps) == (
        device.status,
        device.iterations,
        device.num_hvps,
    )
    assert host.residual_norm == device.residual_norm
    assert host.stats == device.stats


def test_negative_curvature_returns_the_kept_iterate_unchanged():
    """The best iterate is kept by reference: later steps must not alter it, so the returned
    solution's true residual is the one reported."""
    a, b = _spd(30, 100.0, 5, negative=True)
    sol = hg.CG(maxiter=60, tol=1e-12).solve(hg.MatrixOperator(a, symmetric=True), b)
    assert sol.status == "negative_curvature" and sol.iterations >= 1
    true = float(torch.linalg.vector_norm(b - a @ sol.value))
    assert true == pytest.approx(sol.residual_norm, rel=1e-8)
    assert true < float(torch.linalg.vector_norm(b))  # never worse than x = 0


def test_unconverged_run_returns_the_iterate_it_reports():
    """A run stopped by maxiter returns the iterate whose residual it reports (the kept or
    the last one, never one modified afterwards)."""
    a, b = _spd(40, 1e3, 7)
    sol = hg.CG(maxiter=8, tol=0.0).solve(hg.MatrixOperator(a, symmetric=True), b)
    assert sol.status == "max_iterations" and sol.iterations == 8
    true = float(torch.linalg.vector_norm(b - a @ sol.value))
    assert sol.residual_norm == pytest.approx(true, rel=1e-6)


def _loss(p, h):
    w, m, s = p
    return (
        0.5 * torch.sum(torch.exp(h[0]) * w**2)
        + torch.sum(torch.sin(m) * m.sum())
        + (s**2).sum() * w.sum()
    )


@pytest.mark.parametrize(
    "leaves",
    [
        (torch.randn(5, dtype=DT), torch.randn(3, 4, dtype=DT), torch.randn(2, dtype=DT)),
        (torch.randn(5, dtype=DT), torch.randn(3, 4, dtype=DT), torch.randn(1, 2, dtype=DT)),
    ],
    ids=["1-D", "matrices"],
)
def test_direct_products_equal_the_general_path(leaves, monkeypatch):
    op = hg.HessianOperator(_loss, leaves, (torch.randn(5, dtype=DT),))
    assert op._direct
    v = torch.randn(op.size, dtype=DT)
    # before torch's symbolic-shape module is imported the direct path answers where
    # hypergradient._autograd runs the engine itself (importing nothing), and declines
    # otherwise (the general path then avoids importing it); once imported it answers
    monkeypatch.delitem(sys.modules, SYMBOLIC_SHAPES, raising=False)
    early = direct_vjp(op, v)
    if _autograd.DIRECT:
        assert early is not None and SYMBOLIC_SHAPES not in sys.modules
    else:
        assert early is None
    monkeypatch.undo()
    importlib.import_module(SYMBOLIC_SHAPES)
    fast = direct_vjp(op, v)
    assert fast is not None and torch.equal(fast, op._param_vjp_flat(v))
    assert early is None or torch.equal(early, fast)
    assert torch.equal(op.matvec(v), fast)
    dense = torch.func.hessian(
        lambda t: _loss(_tree.split(t, op.param_spec), (op.hparam_leaves[0],))
    )(torch.cat([x.reshape(-1) for x in leaves]))
    torch.testing.assert_close(fast, dense @ v, rtol=1e-12, atol=1e-12)


def test_direct_product_with_a_leaf_the_gradient_does_not_depend_on():
    """A connected output whose gradient ignores a leaf: zeros there, as the general path."""

    def f(p, h):  # grad wrt p[1] is constant (linear in p[1]): its output is unconnected
        return torch.sum(torch.exp(h[0]) * p[0] ** 3) + 2.0 * p[1].sum()

    op = hg.HessianOperator(
        f, (torch.randn(3, dtype=DT), torch.randn(2, dtype=DT)), (torch.zeros(3, dtype=DT),)
    )
    assert not op._direct  # one output is not connected: the general path
    v = torch.randn(5, dtype=DT)
    out = op.matvec(v)
    assert torch.equal(out[3:], torch.zeros(2, dtype=DT))
    torch.testing.assert_close(out[:3], 6.0 * op.param_leaves[0].detach() * v[:3])


def test_mixed_dtypes_take_the_general_path():
    leaves = (torch.randn(4, dtype=DT), torch.randn(3, dtype=torch.float32))

    def f(p, h):
        return torch.sum(torch.exp(h[0]) * p[0] ** 2) + torch.sum(p[1].double() ** 4)

    op = hg.HessianOperator(f, leaves, (torch.zeros(4, dtype=DT),))
    assert not op._direct and direct_vjp(op, torch.ones(7, dtype=DT)) is None
    out = op.matvec(torch.ones(7, dtype=DT))
    torch.testing.assert_close(out[4:], 12.0 * op.param_leaves[1].detach().double() ** 2)


def _ridge(n=40, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)
    Xv, yv = torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)

    def f(p, h):
        return 0.5 * ((X @ p[0] - y) ** 2).mean() + 0.5 * torch.sum(torch.exp(h) * p[0] ** 2)

    def gv(p, h):
        return 0.5 * ((Xv @ p[0] - yv) ** 2).mean()

    lam = torch.full((d,), -1.0, dtype=DT)
    A = X.T @ X / n + torch.diag(torch.exp(lam))
    w = torch.linalg.solve(A, X.T @ y / n)
    # closed form: d/dlam of g(w*(lam)) = -(diag(exp(lam) w))^T A^{-1} grad g
    grad_g = Xv.T @ (Xv @ w - yv) / n
    ref = -torch.exp(lam) * w * torch.linalg.solve(A, grad_g)
    return f, gv, (w,), lam, ref


def test_one_hyperparameter_leaf_result_is_its_own_tensor():
    """One leaf: the result is the difference itself: exact, detached, not shared with the
    info, and a second call gives an independent tensor."""
    f, gv, params, lam, ref = _ridge()
    out, info = hg.implicit(f, gv, params, lam, hg.CG(tol=1e-12), return_info=True)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
    assert out.shape == lam.shape and out.dtype == lam.dtype and not out.requires_grad
    again = hg.implicit(f, gv, params, lam, hg.CG(tol=1e-12))
    assert out.untyped_storage().data_ptr() != again.untyped_storage().data_ptr()
    assert out.untyped_storage().data_ptr() != info.solution.untyped_storage().data_ptr()
    before = info.solution.clone()
    out.add_(1.0)
    assert torch.equal(info.solution, before)


def test_one_leaf_of_another_shape_or_dtype_takes_the_per_leaf_path():
    f, gv, params, lam, ref = _ridge()
    as_matrix = hg.implicit(
        lambda p, h: f(p, h.reshape(-1)), gv, params, lam.reshape(2, 3), hg.CG(tol=1e-12)
    )
    assert as_matrix.shape == (2, 3)
    torch.testing.assert_close(as_matrix.reshape(-1), ref, rtol=1e-9, atol=1e-12)
    low = hg.implicit(lambda p, h: f(p, h.double()), gv, params, lam.float(), hg.CG(tol=1e-12))
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref.float(), rtol=1e-5, atol=1e-7)


def test_unused_single_leaf_still_warns_and_is_zero():
    f, gv, params, lam, _ = _ridge()
    with pytest.warns(hg.HypergradientWarning, match="neither directly nor through"):
        out = hg.implicit(lambda p, h: f(p, lam), gv, params, lam.clone(), hg.CG())
    assert torch.equal(out, torch.zeros_like(lam))


# ------------------------------------------------------------------------------ trees


@pytest.mark.parametrize(
    "tree",
    [
        torch.zeros(2, 3),
        (torch.zeros(1), torch.ones(2, 2)),
        [torch.zeros(1)],
        {"a": torch.zeros(4), "b": torch.ones(3, 1)},
        {"a": (torch.zeros(1),), "b": [torch.ones(3), {"c": torch.zeros(2, 2)}]},
        (),
        {},
    ],
    ids=["leaf", "tuple", "list", "dict", "nested", "empty-tuple", "empty-dict"],
)
def test_flatten_sizes_and_unflatten_round_trip(tree):
    leaves, spec = _tree.flatten(tree, "x")
    assert spec.numels == [t.numel() for t in leaves]
    assert spec.size == sum(t.numel() for t in leaves)
    rebuilt = _tree.unflatten(spec, leaves)
    assert type(rebuilt) is type(tree)
    again, spec2 = _tree.flatten(rebuilt, "x")
    assert spec2 == spec and all(a is b for a, b in zip(again, leaves))
    # a spec built without flatten computes the same sizes
    plain = _tree.TreeSpec(spec.kind, spec.children, spec.keys, spec.paths, spec.shapes)
    assert plain.numels == spec.numels and plain.size == spec.size


@pytest.mark.parametrize(
    "dtype",
    [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.int64],
)
def test_accumulator_dtype_is_the_promotion_with_float32(dtype):
    leaves = [torch.zeros(2, dtype=dtype), torch.zeros(1, dtype=dtype)]
    assert _tree.accumulator_dtype(leaves) == torch.promote_types(dtype, torch.float32)
    mixed = [torch.zeros(1, dtype=torch.float16), torch.zeros(1, dtype=dtype)]
    want = torch.promote_types(torch.promote_types(torch.float16, dtype), torch.float32)
    assert _tree.accumulator_dtype(mixed) == want


def test_cat_of_absent_leaves_is_zeros_of_the_size():
    _, spec = _tree.flatten((torch.ones(2, 2), torch.ones(3)), "x")
    out = _tree.cat([None, None], spec, torch.float32, "cpu")
    assert torch.equal(out, torch.zeros(7)) and out.dtype == torch.float32


# ------------------------------------------------------------------------------ vocabulary


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", [0, 1, 2])
def test_all_finite_on_cpu_finds_any_non_finite_entry(bad, where):
    leaves = [torch.ones(3, dtype=DT), torch.ones(2, 2, dtype=torch.float32), torch.ones(4)]
    assert _vocab.all_finite(leaves)
    leaves[where].view(-1)[1] = bad
    assert not _vocab.all_finite(leaves)


def test_all_finite_overflowing_sums_of_finite_entries_are_finite():
    big = torch.full((4,), 1e308, dtype=DT)
    assert _vocab.all_finite([big, big])  # the host sum overflows; the entries are finite
    half = torch.full((10,), 6e4, dtype=torch.float16)
    assert _vocab.all_finite([half, torch.tensor([1 + 2j])])
    assert _vocab.all_finite([None, torch.arange(3), torch.zeros(0)])
    assert not _vocab.all_finite([torch.tensor([1 + 0j, complex(0, math.inf)])])


def test_as_scalar_loss_keeps_a_0d_loss_and_reshapes_a_1_element_one():
    x = torch.tensor(2.0, requires_grad=True)
    loss = x * 3
    assert _vocab.as_scalar_loss(loss, "f") is loss
    one = (x * 3).reshape(1)
    out = _vocab.as_scalar_loss(one, "f")
    assert out.shape == () and float(out.detach()) == 6.0
    (g,) = torch.autograd.grad(out, x)
    assert float(g) == 3.0
