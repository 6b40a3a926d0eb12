"""The third round of lean paths of the implicit call (issue 11, goal 3) changes no number.

Products go through one concatenated output of the retained graph (``flat_output``), which
is also the operator's gradient; the CPU random-number state is captured as a generator
copy; flat trees flatten without the recursive walk; solver reprs are kept per plain
configuration; the int/float validators and the finiteness probes skip work in the usual
case; CG normalizes ``b`` in place and reads its norms inline. Each test compares a lean
path with the general one bit for bit, against an exact reference, or checks the guarantee
the lean path could have broken.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections import namedtuple

import pytest
import torch

import hypergradient as hg
from hypergradient import _autograd, _tree, _vocab
from hypergradient.methods._checks import check_inputs
from hypergradient.operators.graph import SYMBOLIC_SHAPES, flat_output
from hypergradient.operators.modes import RngState
from once_diff import Cube

DT = torch.float64


def _model(dtype=DT, seed=0):
    """Leaves of four shapes (0-d, 1-D, 2-D, 3-D) and two hyperparameter leaves."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(30, 4, generator=g, dtype=dtype)
    y = torch.randn(30, generator=g, dtype=dtype)
    params = {
        "s": torch.tensor(0.7, dtype=dtype),
        "v": torch.randn(4, generator=g, dtype=dtype),
        "m": 0.3 * torch.randn(4, 3, generator=g, dtype=dtype),
        "t": 0.2 * torch.randn(2, 3, 2, generator=g, dtype=dtype),
    }
    hparams = {
        "decay": torch.tensor([-1.0, -2.0], dtype=dtype),
        "w": torch.tensor(0.3, dtype=dtype),
    }

    def f(p, h):
        z = torch.tanh(X @ p["m"]).sum(1) * p["s"] + torch.sin(X @ p["v"]) + p["t"].sum() ** 2
        reg = torch.exp(h["decay"][0]) * (p["m"] ** 2).sum()
        reg = reg + torch.exp(h["decay"][1]) * ((p["v"] ** 2).sum() + (p["t"] ** 2).sum())
        return ((z - y) ** 2).mean() * (1 + h["w"] ** 2) + reg + 0.1 * p["s"] ** 2

    def g_(p, h):
        z = torch.tanh(X @ p["m"]).sum(1) * p["s"] + torch.sin(X @ p["v"]) + p["t"].sum() ** 2
        return ((z - y) ** 2).mean() + 0.01 * h["w"]

    return f, g_, params, hparams


def _dense_hessian(op, f):
    """H and the mixed matrix d/dphi grad_theta f, by torch.func in float64."""
    theta0 = torch.cat([t.detach().reshape(-1) for t in op.param_leaves])
    phi0 = torch.cat([t.detach().reshape(-1) for t in op.hparam_leaves])

    def loss(theta, phi):
        p = _tree.unflatten(op.param_spec, _tree.split(theta, op.param_spec))
        h = _tree.unflatten(op.hparam_spec, _tree.split(phi, op.hparam_spec))
        return f(p, h)

    H = torch.func.hessian(loss, argnums=0)(theta0, phi0)
    M = torch.func.jacfwd(torch.func.grad(loss, argnums=0), argnums=1)(theta0, phi0)
    return H, M


@pytest.fixture
def symbolic_shapes():
    """The grad_outputs form (and so the direct path) is in use once this module is loaded."""
    importlib.import_module(SYMBOLIC_SHAPES)


def _general(op, v, leaves, monkeypatch):
    """``op._vjp`` by the general path (the direct one declined)."""
    monkeypatch.setattr(op, "_direct", False)
    out = op._vjp(v, leaves)
    monkeypatch.undo()
    return out


def test_flat_output_products_equal_the_per_leaf_form_bit_for_bit(symbolic_shapes, monkeypatch):
    f, _, params, hparams = _model()
    op = hg.HessianOperator(f, params, hparams)
    assert op._direct and not op._all_flat
    H, M = _dense_hessian(op, f)
    for seed in range(4):
        v = torch.randn(op.size, generator=torch.Generator().manual_seed(seed), dtype=DT)
        general = _general(op, v, op.param_leaves, monkeypatch)
        fast = op.matvec(v)
        assert torch.equal(fast, _tree.cat(general, op.param_spec, DT, "cpu"))
        torch.testing.assert_close(fast, H @ v, rtol=1e-10, atol=1e-12)
        mixed = op.mixed(v)
        for a, b in zip(mixed, _general(op, v, op.hparam_leaves, monkeypatch)):
            assert torch.equal(a, b)
        torch.testing.assert_close(
            _tree.cat(mixed, op.hparam_spec, DT, "cpu"), M.T @ v, rtol=1e-10, atol=1e-12
        )


def test_products_under_no_grad_and_the_result_is_a_copy(symbolic_shapes):
    """The concatenated output is made in grad mode even when the first product runs under
    no_grad; a product is a new tensor, never (a view of) v, and v is left as it was."""

    def f(p, h):  # H = diag(exp(h)): the product is exp(h) * v, a function of v alone
        return 0.5 * torch.sum(torch.exp(h[0]) * p[0] ** 2)

    op = hg.HessianOperator(f, (torch.randn(5, dtype=DT),), (torch.zeros(5, dtype=DT),))
    v = torch.randn(5, dtype=DT)
    keep = v.clone()
    with torch.no_grad():
        out = op.matvec(v)
    assert flat_output(op).requires_grad and torch.equal(out, v)
    assert out.data_ptr() != v.data_ptr() and torch.equal(v, keep)
    out.add_(1.0)
    assert torch.equal(v, keep)


def test_the_gradient_attribute_is_the_gradient_and_survives_release():
    f, _, params, hparams = _model()
    op = hg.HessianOperator(f, params, hparams)
    leaves = [t.detach().requires_grad_(True) for t in _tree.flatten(params, "p")[0]]
    grads = torch.autograd.grad(f(_tree.unflatten(op.param_spec, leaves), hparams), leaves)
    assert torch.equal(op.grad, torch.cat([g.reshape(-1) for g in grads]))
    assert not op.grad.requires_grad
    op.release()
    assert op._flat is None and torch.equal(op.grad, torch.cat([g.reshape(-1) for g in grads]))


def test_implicit_equals_the_dense_formula_and_the_general_path(monkeypatch):
    """hg.implicit through the direct products (symbolic shapes loaded) and through the
    general dot form (as in a fresh process) gives the same bits, near the dense formula."""
    f, g_, params, hparams = _model()
    lam = 5.0  # H + lam I is positive definite at this (non-stationary) point
    kw = dict(damping=lam, return_info=True, stationarity=None)
    importlib.import_module(SYMBOLIC_SHAPES)
    fast, info = hg.implicit(f, g_, params, hparams, hg.CG(maxiter=40, tol=0.0), **kw)
    monkeypatch.delitem(sys.modules, SYMBOLIC_SHAPES)
    monkeypatch.setattr(_autograd, "DIRECT", False)  # (a torch without the engine call)
    monkeypatch.setattr(_autograd, "_RUN", None)
    general, info2 = hg.implicit(f, g_, params, hparams, hg.CG(maxiter=40, tol=0.0), **kw)
    monkeypatch.undo()
    for k in fast:
        assert torch.equal(fast[k], general[k])
    fields = ("residual_norm", "num_hvps", "outer_grad_norm", "inner_grad_norm", "status")
    assert [getattr(info, k) for k in fields] == [getattr(info2, k) for k in fields]
    assert torch.equal(info.solution, info2.solution)
    op = hg.HessianOperator(f, params, hparams)
    H, M = _dense_hessian(op, f)
    leaves = [t.detach().requires_grad_(True) for t in op.param_leaves]
    hl = [t.detach().requires_grad_(True) for t in op.hparam_leaves]
    outer = g_(_tree.unflatten(op.param_spec, leaves), _tree.unflatten(op.hparam_spec, hl))
    grads = torch.autograd.grad(outer, leaves + hl, allow_unused=True)
    b = torch.cat([t.reshape(-1) for t in grads[: len(leaves)]])
    direct = _tree.cat(list(grads[len(leaves) :]), op.hparam_spec, DT, "cpu")
    ref = direct - M.T @ torch.linalg.solve(H + lam * torch.eye(op.size, dtype=DT), b)
    got = torch.cat([fast["decay"], fast["w"].reshape(1)])
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    assert info.num_hvps == info.iterations <= 40 and info.extra_hvps == 0


def test_float32_model_products_equal_the_general_path(symbolic_shapes, monkeypatch):
    f, _, params, hparams = _model(torch.float32)
    op = hg.HessianOperator(f, params, hparams)
    v = torch.randn(op.size, dtype=torch.float32)
    general = _general(op, v, op.param_leaves, monkeypatch)
    assert torch.equal(op.matvec(v), _tree.cat(general, op.param_spec, torch.float32, "cpu"))


def test_once_differentiable_is_still_found_with_the_flat_output():
    """The graph walk still finds a once-differentiable function whose backward receives a
    gradient that depends on the parameters: "double" raises before any product, "auto"
    falls back to first-order products, which see its curvature."""
    x0 = torch.tensor([0.5, -1.0, 2.0], dtype=DT)

    def f(p, h):  # d/dx sum(tanh(cube(x))) = (1 - tanh^2) x^2: the incoming gradient needs x
        return torch.tanh(Cube.apply(p[0])).sum() + 0.5 * torch.sum(torch.exp(h[0]) * p[0] ** 2)

    def g(x):
        return torch.tanh(x**3 / 3).sum() + 0.5 * torch.sum(x**2)

    h = (torch.zeros(3, dtype=DT),)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        hg.HessianOperator(f, (x0,), h, mode="double")
    with pytest.warns(hg.HypergradientWarning):
        op = hg.HessianOperator(f, (x0,), h)
    assert op.mode == "first_order" and not op._direct
    v = torch.tensor([1.0, 2.0, -1.0], dtype=DT)
    dense = torch.func.hessian(g)(x0)
    torch.testing.assert_close(op.matvec(v), dense @ v, rtol=1e-6, atol=1e-8)


def test_rng_state_is_captured_and_replayed_exactly():
    torch.manual_seed(3)
    torch.randn(3)  # leaves a cached normal sample in the generator
    state = RngState(torch.device("cpu"))
    assert torch.equal(state.cpu, torch.get_rng_state())
    first = (torch.randn(5), torch.rand(4), torch.empty(1).normal_())
    live = torch.get_rng_state()
    with state.replay():
        again = (torch.randn(5), torch.rand(4), torch.empty(1).normal_())
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert torch.equal(torch.get_rng_state(), live)  # the live stream is left as it was
    assert state.cpu is state.cpu  # read once


def test_first_order_products_replay_dropout_masks_from_the_capture():
    torch.manual_seed(0)
    X = torch.randn(16, 5, dtype=DT)
    drop = torch.nn.Dropout(0.5)

    def f(p, h):
        return (drop(torch.tanh(X @ p[0])) ** 2).mean() + torch.exp(h[0]) * (p[0] ** 2).sum()

    w, h = (torch.randn(5, dtype=DT),), (torch.tensor(-1.0, dtype=DT),)
    torch.manual_seed(7)
    double = hg.HessianOperator(f, w, h, mode="double")
    torch.manual_seed(7)
    first = hg.HessianOperator(f, w, h, mode="first_order")
    torch.randn(100)  # the live stream moves on: products replay the captured state
    v = torch.randn(5, dtype=DT)
    torch.testing.assert_close(first.matvec(v), double.matvec(v), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "tree",
    [
        (torch.zeros(3), torch.ones(2, 2)),
        [torch.zeros(1)],
        (),
        [torch.nn.Parameter(torch.zeros(2)), torch.zeros(())],
    ],
    ids=["tuple", "list", "empty", "parameter"],
)
def test_flat_trees_flatten_as_the_recursive_walk(tree):
    """A tuple subclass takes the recursive walk: its spec is the fast path's."""
    Pair = namedtuple("Pair", "a b") if len(tree) == 2 else None
    leaves, spec = _tree.flatten(tree, "params")
    assert [a is b for a, b in zip(leaves, tree)] == [True] * len(tree) == [True] * len(leaves)
    assert spec.paths == tuple(f"params[{i}]" for i in range(len(tree)))
    assert spec.shapes == tuple(t.shape for t in tree)
    assert spec.numels == [t.numel() for t in tree] and spec.size == sum(spec.numels)
    assert spec.kind == type(tree).__name__
    again = _tree.flatten(tree, "params")[1]
    assert spec == again and hash(spec) == hash(again)
    assert type(_tree.unflatten(spec, leaves)) is type(tree)
    if Pair is not None and isinstance(tree, tuple):
        _, slow = _tree.flatten(Pair(*tree), "params")
        assert slow == spec and slow.paths == spec.paths and slow.numels == spec.numels


def test_flat_trees_with_a_non_tensor_are_refused_as_before():
    with pytest.raises(TypeError, match=r"params\[1\] is a int"):
        _tree.flatten((torch.zeros(1), 3), "params")
    with pytest.raises(TypeError, match=r"params\[0\] is a NoneType"):
        _tree.flatten([None], "params")


def test_solver_repr_follows_its_settings():
    cg = hg.CG(maxiter=10, tol=0.0)
    assert repr(cg) == "CG(maxiter=10, tol=0.0, atol=0.0, preconditioner=None)"
    cg.maxiter = 7
    assert repr(cg) == "CG(maxiter=7, tol=0.0, atol=0.0, preconditioner=None)"
    cg.tol = -0.0  # equal to 0.0 but printed otherwise
    assert repr(cg) == "CG(maxiter=7, tol=-0.0, atol=0.0, preconditioner=None)"

    class Custom(hg.Solver):
        def __init__(self, value):
            self.value = value

    assert repr(Custom(1)) == "Custom(value=1)" and repr(Custom(1.0)) == "Custom(value=1.0)"
    assert repr(Custom(True)) == "Custom(value=True)"
    t = torch.zeros(2)
    c = Custom(t)
    assert repr(c) == f"Custom(value={t!r})"
    t.add_(1.0)  # not a plain setting: its text is never kept
    assert repr(c) == f"Custom(value={t!r})"


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: hg.CG(maxiter=0), r"`maxiter` must be an integer >= 1, got 0"),
        (lambda: hg.CG(maxiter=True), r"`maxiter` must be an integer, got the bool"),
        (lambda: hg.CG(maxiter=2.0), r"`maxiter` must be an integer, got float"),
        (lambda: hg.CG(tol=-1), r"`tol` must be a number >= 0, got -1"),
        (lambda: hg.CG(tol=math.inf), r"`tol` must be a finite number"),
        (lambda: hg.CG(tol=True), r"`tol` must be a number, got the bool"),
        (lambda: hg.CG(tol="1"), r"`tol` must be a real number, got str"),
    ],
)
def test_validators_fast_paths_refuse_what_they_refused(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make()


def test_validators_fast_paths_return_plain_values():
    assert _vocab.as_int(3, "n", min=0, max=3) == 3
    assert type(_vocab.as_float(2, "x")) is float and _vocab.as_float(2, "x") == 2.0
    assert _vocab.as_int(torch.tensor(4), "n") == 4
    with pytest.raises(ValueError, match="<= 3"):
        _vocab.as_int(4, "n", max=3)


def test_finiteness_probes_of_plain_and_grad_leaves():
    a = torch.randn(5, dtype=DT)
    b = torch.randn(3, dtype=DT, requires_grad=True)
    assert _vocab.all_finite([a, b])
    for bad in (math.nan, math.inf, -math.inf):
        c = a.clone()
        c[2] = bad
        assert not _vocab.all_finite([b, c])
    with torch.enable_grad():
        probe = _vocab.finite_probe(b)
    assert probe.grad_fn is None and not probe.requires_grad


def test_alias_checks_still_refuse_shared_memory():
    base = torch.randn(10, dtype=DT)
    with pytest.raises(ValueError, match="also a leaf of `params`"):
        check_inputs((base[:6],), (base[4:],))
    with pytest.raises(ValueError, match="also a leaf of `params`"):
        check_inputs({"w": base}, {"w": base})
    inputs = check_inputs((base[:5],), (base[5:],))  # one storage, no overlap: accepted
    assert inputs.param_leaves[0].data_ptr() == base.data_ptr()


@pytest.mark.parametrize("scale", [1e-170, 1e170])
def test_cg_norms_that_overflow_in_float64_take_the_safe_path(scale):
    """Norms beyond float64's range in the inline read fall back to safe_norm: the solution
    is ``scale`` times the unscaled one (CG iterates on b / ||b||)."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=DT))
    a = (q * torch.linspace(1, 10, 8, dtype=DT)) @ q.T
    b = torch.randn(8, generator=g, dtype=DT)
    op = hg.MatrixOperator(a * scale, symmetric=True)
    sol = hg.CG(maxiter=8, tol=0.0).solve(op, b * scale)
    ref = hg.CG(maxiter=8, tol=0.0).solve(hg.MatrixOperator(a, symmetric=True), b)
    assert sol.iterations == ref.iterations
    torch.testing.assert_close(sol.value, ref.value, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(sol.value, torch.linalg.solve(a, b), rtol=1e-9, atol=1e-12)


def test_one_leaf_mixed_product_that_is_the_solution_itself():
    """f = |theta|^2 / 2 + <theta, phi>: the mixed product is x itself (autograd may hand
    back v); the result -x is a new tensor and the solution in the info is left as it was."""
    c = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    phi = torch.tensor([0.3, 0.1, -0.2], dtype=DT)
    theta = -phi  # the minimum

    def f(p, h):
        return 0.5 * (p[0] ** 2).sum() + (p[0] * h).sum()

    def g(p, h):
        return 0.5 * ((p[0] - c) ** 2).sum()

    out, info = hg.implicit(f, g, (theta,), phi, hg.CG(tol=0.0), return_info=True)
    x = theta - c  # H = I
    assert torch.equal(info.solution, x) and torch.equal(out, -x)
    assert out.data_ptr() != info.solution.data_ptr()
    out.add_(1.0)
    assert torch.equal(info.solution, x)
