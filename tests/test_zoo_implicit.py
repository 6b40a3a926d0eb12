"""The model zoo through the implicit methods (issue 10, item 6).

At each zoo model's initial point (far from stationary, the Hessian indefinite), with
dropout on and off, the implicit formula with damping ``D = max(0, -lambda_min) + 0.5`` is
computed densely in float64 (Hessian and mixed matrix row by row through one graph of
``f``, ``torch.linalg.solve``): every solver of ``hg.implicit``, and the ``Implicit``,
``IFT``, ``HOAG`` and ``T1T2`` method objects, must reproduce it. Dropout masks are drawn
from the same seed as the reference's single evaluation of ``f``. First-order products
(central differences of gradients) must match the dense ones, whatever the direction's
scale (hypothesis).
"""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hypergradient as hg
from zoo_models import DT, NAMES, dense_terms, flat, make, one_thread  # noqa: F401

SEED = 3
CASES = [
    pytest.param(name, d, id=f"{name}-{'dropout' if d else 'nodrop'}")
    for name in NAMES
    for d in (False, True)
]


@functools.cache
def reference(name: str, dropout: bool):
    """Zoo model, point, damping, spectrum bounds and the dense hypergradient."""
    zoo = make(name, dropout)
    p0, h = zoo.params0(), zoo.hparams0()
    H, M, g_theta, g_phi, _ = dense_terms(zoo, p0, h, SEED)
    ev = torch.linalg.eigvalsh(H)
    damping = max(0.0, -float(ev[0])) + 0.5
    n = H.shape[0]
    x = torch.linalg.solve(H + damping * torch.eye(n, dtype=DT), g_theta)
    return {
        "zoo": zoo,
        "p0": p0,
        "h": h,
        "H": H,
        "M": M,
        "g_theta": g_theta,
        "g_phi": g_phi,
        "damping": damping,
        "lmin": float(ev[0]) + damping,
        "lmax": float(ev[-1]) + damping,
        "expected": g_phi - M.T @ x,
    }


def rel(a, b):
    return float((a - b).norm() / b.norm())


def quiet(fn, *args, **kwargs):
    """Call from the reference's seed; the far-from-stationary warning is expected here."""
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        return fn(*args, **kwargs)


def solver(kind: str, ref) -> tuple[hg.Solver, float]:
    """The solver, set to converge on this problem, and the accuracy it must reach."""
    n = ref["H"].shape[0]
    kappa = ref["lmax"] / ref["lmin"]
    if kind == "exact":
        return hg.Exact(), 1e-10
    if kind == "cg":
        return hg.CG(maxiter=4 * n, tol=1e-12), 1e-9
    if kind == "neumann":  # error (1 - 1/kappa)^k: 1e-10 after 23 kappa terms
        return hg.Neumann(maxiter=math.ceil(23 * kappa), alpha=1 / ref["lmax"]), 1e-8
    if kind == "nystrom":  # full-rank Gaussian sketch: (A + rho I)^{-1} b
        return hg.Nystrom(rank=n, rho=1e-9, sketch="gaussian", seed=0), 1e-7
    return hg.NystromPCG(rank=10, maxiter=4 * n, tol=1e-12, seed=0), 1e-9


SOLVERS = ["exact", "cg", "neumann", "nystrom", "nystrompcg"]


@pytest.mark.parametrize("kind", SOLVERS)
@pytest.mark.parametrize(("name", "dropout"), CASES)
def test_implicit_with_each_solver_matches_the_dense_float64_solve(name, dropout, kind):
    ref = reference(name, dropout)
    zoo, p0, h = ref["zoo"], ref["p0"], ref["h"]
    s, tol = solver(kind, ref)
    got, info = quiet(
        hg.implicit, zoo.inner, zoo.outer, p0, h, s, damping=ref["damping"], return_info=True
    )
    assert rel(got["decay"], ref["expected"]) < tol
    assert float(ref["expected"].norm()) > 1e-3  # a hypergradient that can be wrong
    assert info.inner_grad_norm > 1e-3  # far from stationary, as intended
    if kind in ("cg", "nystrompcg"):
        assert info.status.ok


METHOD_CASES = ["implicit", "ift", "hoag", "t1t2", "t1t2_params"]


def method_for(kind: str, ref):
    n, damping = ref["H"].shape[0], ref["damping"]
    if kind == "implicit":
        return hg.Implicit(hg.CG(maxiter=4 * n, tol=1e-12), damping=damping)
    if kind == "ift":
        return hg.IFT(hg.NystromPCG(rank=8, maxiter=4 * n, tol=1e-12, seed=1), damping=damping)
    if kind == "hoag":
        return hg.HOAG(maxiter=4 * n, tol=1e-12, decay=1.0, damping=damping)
    if kind == "t1t2_params":  # the default takes a penalty's hyperparameters first
        return hg.T1T2(mixed="params")
    return hg.T1T2()


@pytest.mark.parametrize("kind", METHOD_CASES)
@pytest.mark.parametrize(("name", "dropout"), CASES)
def test_implicit_method_objects_match_the_dense_formula(name, dropout, kind):
    """The method objects on a ``Problem``; T1T2 is ``d_phi g - lr M^T grad_theta g``."""
    ref = reference(name, dropout)
    zoo, p0, h = ref["zoo"], ref["p0"], ref["h"]
    lr = 0.1
    problem = hg.Problem(zoo.inner, zoo.outer, p0, h, lr=lr)
    got, info = quiet(method_for(kind, ref), problem)
    expected = ref["expected"]
    if kind.startswith("t1t2"):
        expected = ref["g_phi"] - lr * ref["M"].T @ ref["g_theta"]
        assert info.stats["mixed"] == ("params" if kind == "t1t2_params" else "hparams")
    assert rel(got["decay"], expected) < 1e-9


def directions(n: int, k: int, seed: int = 11) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=DT) for _ in range(k)]


@pytest.mark.parametrize(("name", "dropout"), CASES)
def test_first_order_and_double_backward_products_match_the_dense_ones(name, dropout):
    """``H v`` and the mixed product ``M^T v`` in every mode against the dense matrices.
    Measured worst relative error of the first-order mode over the zoo: ~1e-9 in float64."""
    ref = reference(name, dropout)
    zoo, p0, h = ref["zoo"], ref["p0"], ref["h"]
    fused = name == "transformer" and not dropout
    for mode in ("auto", "double_math", "first_order"):
        op = quiet(hg.HessianOperator, zoo.inner, p0, h, mode=mode)
        bound = 1e-7 if mode == "first_order" else 1e-12
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hg.HypergradientWarning)  # auto's fallback
            for v in directions(op.size, 3):
                assert rel(op.matvec(v), ref["H"] @ v) < bound
                assert rel(op.mixed(v)[0], ref["M"].T @ v) < bound
        if mode == "auto":  # the fallback happens at the first product
            assert op.mode == ("double_math" if fused else "double")
    with pytest.raises(RuntimeError, match="not implemented") if fused else _nothing():
        quiet(hg.HessianOperator, zoo.inner, p0, h, mode="double").matvec(directions(op.size, 1)[0])


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    name=st.sampled_from(NAMES),
    dropout=st.booleans(),
    log_scale=st.floats(-6, 6),
    seed=st.integers(0, 2**16),
)
def test_first_order_products_are_scale_free(name, dropout, log_scale, seed):
    """The first-order step adapts to ``||v||``: directions from 1e-6 to 1e6 give ``H v``
    to the same relative accuracy (the product is linear in ``v``)."""
    ref = reference(name, dropout)
    op = quiet(hg.HessianOperator, ref["zoo"].inner, ref["p0"], ref["h"], mode="first_order")
    v = directions(op.size, 1, seed)[0] * 10.0**log_scale
    assert rel(op.matvec(v), ref["H"] @ v) < 1e-7
    assert rel(op.mixed(v)[0], ref["M"].T @ v) < 1e-7
    assert torch.equal(flat(ref["p0"]), flat(make(name, dropout).params0()))  # untouched
