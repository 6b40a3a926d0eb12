"""hg.implicit against exact references: dense Hessian solves and finite differences."""

from __future__ import annotations

import warnings

import pytest
import torch
from sklearn.datasets import load_breast_cancer
from torch.func import functional_call, hessian

import hypergradient as hg
from conftest import to_device

DT = torch.float64


# ----------------------------------------------------------------------------- fixtures


def _breast_cancer(n_train: int = 150, n_val: int = 150):
    X, y = load_breast_cancer(return_X_y=True)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    X = torch.as_tensor(X, dtype=DT)[perm]
    y = torch.as_tensor(y, dtype=DT)[perm]
    mu, sd = X[:n_train].mean(0), X[:n_train].std(0)
    X = (X - mu) / sd
    return (X[:n_train], y[:n_train]), (X[n_train : n_train + n_val], y[n_train : n_train + n_val])


(XT, YT), (XV, YV) = _breast_cancer()
D = XT.shape[1]


def logreg_inner(w: torch.Tensor, loglam: torch.Tensor) -> torch.Tensor:
    """Mean BCE on train + 0.5 sum exp(loglam) w^2 (bias w[-1] not penalized)."""
    logits = XT @ w[:-1] + w[-1]
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, YT)
    return bce + 0.5 * (loglam.exp() * w[:-1] ** 2).sum()


def logreg_outer(w: torch.Tensor, loglam: torch.Tensor) -> torch.Tensor:
    logits = XV @ w[:-1] + w[-1]
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, YV)


def solve_logreg(loglam: torch.Tensor, w0: torch.Tensor | None = None) -> torch.Tensor:
    """Newton's method to gradient norm < 1e-13 (float64)."""
    w = torch.zeros(D + 1, dtype=DT) if w0 is None else w0.clone()
    for _ in range(100):
        grad = torch.func.grad(logreg_inner)(w, loglam)
        if grad.norm() < 1e-13:
            return w
        w = w - torch.linalg.solve(hessian(logreg_inner)(w, loglam), grad)
    raise AssertionError("Newton did not converge")


LOGLAM = torch.linspace(-4.0, -1.0, D, dtype=DT)
W_STAR = solve_logreg(LOGLAM)


def dense_reference(w: torch.Tensor, loglam: torch.Tensor) -> torch.Tensor:
    """dg/dphi = d_phi g - (d_phi grad_w f)^T H^{-1} grad_w g, all dense, no hypergradient code."""
    H = hessian(logreg_inner)(w, loglam)
    mixed = torch.func.jacrev(torch.func.grad(logreg_inner), argnums=1)(w, loglam)  # (P, D)
    gw = torch.func.grad(logreg_outer)(w, loglam)
    return -mixed.T @ torch.linalg.solve(H, gw)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------ exact references


def test_logreg_matches_dense_solve_and_finite_differences():
    ref = dense_reference(W_STAR, LOGLAM)
    h_exact = hg.exact(logreg_inner, logreg_outer, W_STAR, LOGLAM)
    h_cg, info = hg.implicit(
        logreg_inner,
        logreg_outer,
        W_STAR,
        LOGLAM,
        hg.CG(maxiter=200, tol=1e-10),
        return_info=True,
    )
    assert rel(h_exact, ref) < 1e-10
    assert rel(h_cg, ref) < 1e-9
    assert info.inner_grad_norm < 1e-12
    assert info.converged and info.relative_residual <= 1e-10
    # Central finite differences of the true map loglam -> g(w*(loglam)).
    eps = 1e-5
    fd = torch.empty(D, dtype=DT)
    for i in range(D):
        e = torch.zeros(D, dtype=DT)
        e[i] = eps
        plus = logreg_outer(solve_logreg(LOGLAM + e, W_STAR), LOGLAM)
        minus = logreg_outer(solve_logreg(LOGLAM - e, W_STAR), LOGLAM)
        fd[i] = (plus - minus) / (2 * eps)
    assert rel(h_exact, fd) < 1e-6


def test_direct_term_is_included():
    # outer loss that depends on the hyperparameter directly: g + sum(loglam^2)
    def outer(w, loglam):
        return logreg_outer(w, loglam) + (loglam**2).sum()

    h = hg.exact(logreg_inner, outer, W_STAR, LOGLAM)
    ref = dense_reference(W_STAR, LOGLAM) + 2 * LOGLAM
    assert rel(h, ref) < 1e-10


def test_hessian_operator_products_match_dense():
    op = hg.HessianOperator(logreg_inner, W_STAR, LOGLAM)
    H = hessian(logreg_inner)(W_STAR, LOGLAM)
    mixed = torch.func.jacrev(torch.func.grad(logreg_inner), argnums=1)(W_STAR, LOGLAM)
    v = torch.randn(D + 1, dtype=DT, generator=torch.Generator().manual_seed(1))
    assert rel(op.matvec(v), H @ v) < 1e-12
    V = torch.randn(4, D + 1, dtype=DT, generator=torch.Generator().manual_seed(2))
    assert rel(op.matmat(V), V @ H) < 1e-12
    assert rel(op.matmat(V, chunk_size=3), V @ H) < 1e-12
    assert rel(op.mixed(v)[0], mixed.T @ v) < 1e-12
    assert op.num_matvecs == 1 + 4 + 4
    assert rel(op.dense(), H) < 1e-12


@pytest.mark.parametrize("batched", [True, False, "auto"])
def test_batched_products_in_every_mode_match_dense(batched):
    op = hg.HessianOperator(logreg_inner, W_STAR, LOGLAM, batched=batched)
    H = hessian(logreg_inner)(W_STAR, LOGLAM)
    V = torch.randn(9, D + 1, dtype=DT, generator=torch.Generator().manual_seed(2))
    for _ in range(2):  # "auto" decides on the first call and keeps its choice
        assert rel(op.matmat(V), V @ H) < 1e-12
    assert op._batched in (True, False)
    assert op.num_matvecs == 18
    with pytest.raises(ValueError, match="batched"):
        hg.HessianOperator(logreg_inner, W_STAR, LOGLAM, batched="yes")


def test_each_loss_is_evaluated_once_whatever_the_budget():
    """The Hessian graph is built once; products are backward passes through it."""
    calls = {"inner": 0, "outer": 0}

    def inner(w, lam):
        calls["inner"] += 1
        return logreg_inner(w, lam)

    def outer(w, lam):
        calls["outer"] += 1
        return logreg_outer(w, lam)

    _, info = hg.implicit(inner, outer, W_STAR, LOGLAM, hg.CG(30, tol=0), return_info=True)
    assert info.num_hvps == 30
    assert calls == {"inner": 1, "outer": 1}


def test_fixed_point_of_a_gradient_step_equals_argmin():
    eta = 0.5

    def step(w, lam):
        return w - eta * torch.func.grad(logreg_inner)(w, lam)

    h_fp = hg.implicit_fixed_point(
        step, logreg_outer, W_STAR, LOGLAM, hg.FixedPoint(maxiter=20000, tol=1e-12)
    )
    h_exact_fp = hg.implicit_fixed_point(step, logreg_outer, W_STAR, LOGLAM, hg.Exact())
    ref = dense_reference(W_STAR, LOGLAM)
    assert rel(h_exact_fp, ref) < 1e-9
    assert rel(h_fp, ref) < 1e-8


def test_damping_solves_the_damped_system():
    lam = 0.3
    H = hessian(logreg_inner)(W_STAR, LOGLAM)
    mixed = torch.func.jacrev(torch.func.grad(logreg_inner), argnums=1)(W_STAR, LOGLAM)
    gw = torch.func.grad(logreg_outer)(W_STAR, LOGLAM)
    ref = -mixed.T @ torch.linalg.solve(H + lam * torch.eye(D + 1, dtype=DT), gw)
    h = hg.implicit(logreg_inner, logreg_outer, W_STAR, LOGLAM, hg.Exact(), damping=lam)
    assert rel(h, ref) < 1e-10


def test_warm_start_with_previous_solution():
    _, info = hg.implicit(
        logreg_inner, logreg_outer, W_STAR, LOGLAM, hg.CG(100, tol=1e-10), return_info=True
    )
    _, info2 = hg.implicit(
        logreg_inner,
        logreg_outer,
        W_STAR,
        LOGLAM,
        hg.CG(100, tol=1e-10),
        x0=info.solution,
        return_info=True,
    )
    assert info2.iterations == 0 and info2.num_hvps == 1 and info2.converged


# ------------------------------------------------------------------ structures, dtypes


def _ridge_problem(dtype):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(40, 7, generator=g, dtype=torch.float64)
    y = torch.randn(40, generator=g, dtype=torch.float64)
    Xv = torch.randn(30, 7, generator=g, dtype=torch.float64)
    yv = torch.randn(30, generator=g, dtype=torch.float64)
    lam = torch.rand(7, generator=g, dtype=torch.float64) + 0.1
    A = X.T @ X + torch.diag(lam)
    w = torch.linalg.solve(A, X.T @ y)
    ref = -torch.linalg.solve(A, Xv.T @ (Xv @ w - yv)) * w
    cast = (X.to(dtype), y.to(dtype), Xv.to(dtype), yv.to(dtype))
    return cast, w.to(dtype), lam.to(dtype), ref


# Ways of splitting the 7 weights and 7 penalties into structures: (pack, unpack).
STRUCTURES = {
    "tensor": (lambda v: v, lambda t: t),
    "tuple": (
        lambda v: (v[:3], v[3:].reshape(2, 2)),
        lambda t: torch.cat([t[0], t[1].reshape(-1)]),
    ),
    "list": (lambda v: [v[:1], v[1:]], lambda t: torch.cat(list(t))),
    "dict": (
        lambda v: {"a": v[:5].reshape(5, 1), "b": v[5:]},
        lambda t: torch.cat([t["a"].reshape(-1), t["b"]]),
    ),
    "nested": (
        lambda v: {"x": (v[:2], [v[2:4]]), "y": v[4:].reshape(3, 1, 1)},
        lambda t: torch.cat([t["x"][0], t["x"][1][0], t["y"].reshape(-1)]),
    ),
    "scalars": (  # 0-d leaves between vectors (a bias, a single decay)
        lambda v: (v[0], v[1:6], v[6]),
        lambda t: torch.cat([t[0].reshape(1), t[1], t[2].reshape(1)]),
    ),
}


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("pstruct", list(STRUCTURES))
@pytest.mark.parametrize("hstruct", list(STRUCTURES))
def test_structures_and_dtypes(pstruct, hstruct, dtype, tol):
    (X, y, Xv, yv), w, lam, ref = _ridge_problem(dtype)
    ppack, punpack = STRUCTURES[pstruct]
    hpack, hunpack = STRUCTURES[hstruct]

    def inner(p, h):
        wv, lv = punpack(p), hunpack(h)
        return 0.5 * ((X @ wv - y) ** 2).sum() + 0.5 * (lv * wv**2).sum()

    def outer(p, h):
        wv = punpack(p)
        return 0.5 * ((Xv @ wv - yv) ** 2).sum()

    hp = hpack(lam.clone())
    out = hg.implicit(inner, outer, ppack(w.clone()), hp, hg.CG(maxiter=50, tol=1e-12))
    # same structure, shapes, dtype; detached
    flat_out, spec_out = hg._tree.flatten(out, "out")
    flat_in, spec_in = hg._tree.flatten(hp, "in")
    assert spec_out.structure() == spec_in.structure()
    for a, b in zip(flat_out, flat_in):
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
        assert not a.requires_grad
    assert rel(hunpack(out).double(), ref) < tol


# One configuration per solver family, each exact on the 7-dimensional ridge problem
# (Hessian eigenvalues in [16.4, 62.7]).
FAMILIES = {
    "exact": lambda: hg.Exact(),
    "cg": lambda: hg.CG(maxiter=50, tol=1e-13),
    "neumann-auto": lambda: hg.Neumann(maxiter=300, alpha="auto", tol=1e-14),
    "nystrom": lambda: hg.Nystrom(rank=7, rho=1e-12, sketch="gaussian", seed=0),
    "nystrom-pcg": lambda: hg.NystromPCG(rank=3, maxiter=50, tol=1e-13, seed=0),
    "fixed-point": lambda: hg.FixedPoint(maxiter=300, tol=1e-14, omega=2 / 79),
}


def _ridge_losses(X, y, Xv, yv):
    def inner(p, h):
        return 0.5 * ((X @ p - y) ** 2).sum() + 0.5 * (h * p**2).sum()

    def outer(p, h):
        return 0.5 * ((Xv @ p - yv) ** 2).sum()

    return inner, outer


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_solver_family_matches_the_closed_form_on_device(family, device):
    data, w, lam, ref = _ridge_problem(torch.float64)  # made on the CPU, then moved
    data, w, lam = to_device(device, (data, w, lam))
    inner, outer = _ridge_losses(*data)
    out, info = hg.implicit(inner, outer, w, lam, FAMILIES[family](), return_info=True)
    assert out.device == lam.device and info.solution.device == w.device
    assert rel(out.cpu(), ref) < 1e-9


def test_fixed_point_map_matches_the_closed_form_on_device(device):
    data, w, lam, ref = _ridge_problem(torch.float64)
    data, w, lam = to_device(device, (data, w, lam))
    inner, outer = _ridge_losses(*data)

    def step(p, h):  # a gradient step: its fixed point is the argmin
        return p - 0.02 * torch.func.grad(inner)(p, h)

    for solver in (hg.Exact(), hg.FixedPoint(maxiter=500, tol=1e-14)):
        out = hg.implicit_fixed_point(step, outer, w, lam, solver)
        assert out.device == lam.device
        assert rel(out.cpu(), ref) < 1e-9, solver


def test_mixed_dtypes_and_module_parameters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    model = model.double()
    X = torch.randn(25, 4, dtype=DT)
    y = torch.randn(25, 1, dtype=DT)
    params = dict(model.named_parameters())
    decay = {k: torch.full_like(v, 0.5) for k, v in params.items()}

    def inner(p, h):
        pred = functional_call(model, p, (X,))
        return ((pred - y) ** 2).mean() + 0.5 * sum((h[k] * p[k] ** 2).sum() for k in p)

    def outer(p, h):
        return ((functional_call(model, p, (X[:10],)) - y[:10]) ** 2).mean()

    before = {k: v.detach().clone() for k, v in params.items()}
    h, info = hg.implicit(inner, outer, params, decay, hg.Exact(), damping=1.0, return_info=True)
    assert set(h) == set(decay) and all(h[k].shape == decay[k].shape for k in h)
    # nothing the user passed is modified (values, requires_grad, .grad)
    for k, v in params.items():
        assert torch.equal(v.detach(), before[k]) and v.requires_grad and v.grad is None
    for v in decay.values():
        assert not v.requires_grad and v.grad is None and bool((v == 0.5).all())
    # reference through a flat parametrization
    shapes = [v.shape for v in params.values()]
    sizes = [v.numel() for v in params.values()]
    keys = list(params)

    def unflat(t):
        return {k: s.reshape(sh) for k, s, sh in zip(keys, torch.split(t, sizes), shapes)}

    wflat = torch.cat([v.detach().reshape(-1) for v in params.values()])
    hflat = torch.cat([v.reshape(-1) for v in decay.values()])

    def fi(w, hh):
        return inner(unflat(w), unflat(hh))

    def fo(w, hh):
        return outer(unflat(w), unflat(hh))

    H = hessian(fi)(wflat, hflat) + torch.eye(wflat.numel(), dtype=DT)
    mixed = torch.func.jacrev(torch.func.grad(fi), argnums=1)(wflat, hflat)
    ref = -mixed.T @ torch.linalg.solve(H, torch.func.grad(fo)(wflat, hflat))
    got = torch.cat([h[k].reshape(-1) for k in keys])
    assert rel(got, ref) < 1e-10


def test_float32_params_float64_hparams():
    (X, y, Xv, yv), w, lam, ref = _ridge_problem(torch.float64)

    def inner(p, h):
        return 0.5 * ((X.float() @ p - y.float()) ** 2).sum() + 0.5 * (h * p**2).sum()

    def outer(p, h):
        return 0.5 * ((Xv.float() @ p - yv.float()) ** 2).sum()

    out = hg.implicit(inner, outer, w.float(), lam, hg.CG(50, tol=1e-7))
    assert out.dtype == torch.float64 and rel(out, ref) < 1e-3


# ------------------------------------------------------------------ bad input


def test_non_scalar_losses_are_rejected():
    with pytest.raises(ValueError, match="inner_loss.*scalar"):
        hg.implicit(lambda w, h: w * h, logreg_outer, W_STAR[:D], LOGLAM)
    with pytest.raises(ValueError, match="outer_loss.*scalar"):
        hg.implicit(logreg_inner, lambda w, h: w, W_STAR, LOGLAM)
    with pytest.raises(TypeError, match="inner_loss"):
        hg.implicit(lambda w, h: 1.0, logreg_outer, W_STAR, LOGLAM)


def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match="inner_loss"):
        hg.implicit("not callable", logreg_outer, W_STAR, LOGLAM)
    with pytest.raises(TypeError, match="solver"):
        hg.implicit(logreg_inner, logreg_outer, W_STAR, LOGLAM, solver="cg")
    with pytest.raises(TypeError, match=r"params\[1\].*int64"):
        hg.implicit(logreg_inner, logreg_outer, (W_STAR, torch.arange(3)), LOGLAM)
    with pytest.raises(TypeError, match=r"hparams\['a'\].*must be a tensor"):
        hg.implicit(logreg_inner, logreg_outer, W_STAR, {"a": 1.0})
    with pytest.raises(ValueError, match="hparams.*empty"):
        hg.implicit(logreg_inner, logreg_outer, W_STAR, {})
    with pytest.raises(ValueError, match="x0"):
        hg.implicit(logreg_inner, logreg_outer, W_STAR, LOGLAM, x0=torch.zeros(3, dtype=DT))
    with pytest.raises(ValueError, match="x0"):
        hg.implicit(logreg_inner, logreg_outer, W_STAR, LOGLAM, x0=(W_STAR, W_STAR))
    with pytest.raises(ValueError, match="damping"):
        hg.implicit(logreg_inner, logreg_outer, W_STAR, LOGLAM, damping=-1.0)
    with pytest.raises(ValueError, match="rank"):
        hg.nystrom(logreg_inner, logreg_outer, W_STAR, LOGLAM, rank=0)


def test_unused_hyperparameter_warns_and_gets_zero():
    extra = torch.ones(2, dtype=DT)

    def inner(w, h):
        return logreg_inner(w, h[0])

    with pytest.warns(hg.HypergradientWarning, match=r"hparams\[1\]"):
        h = hg.implicit(inner, logreg_outer, W_STAR, (LOGLAM, extra), hg.Exact())
    assert torch.equal(h[1], torch.zeros(2, dtype=DT))
    assert rel(h[0], dense_reference(W_STAR, LOGLAM)) < 1e-10


def test_outer_loss_without_params_dependence_gives_direct_term_only():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h, info = hg.implicit(
            logreg_inner, lambda w, h: (h**2).sum(), W_STAR, LOGLAM, hg.CG(), return_info=True
        )
    assert torch.allclose(h, 2 * LOGLAM) and info.num_hvps == 0


def test_non_finite_hypergradient_raises():
    def outer(w, h):
        return logreg_outer(w, h) * torch.tensor(float("nan"), dtype=DT)

    with pytest.raises(hg.NonFiniteHypergradientError, match="not finite"):
        hg.implicit(logreg_inner, outer, W_STAR, LOGLAM, hg.CG(10))


def test_negative_curvature_is_reported_not_hidden():
    def inner(w, h):  # saddle: indefinite Hessian diag(h0, -1)
        return 0.5 * h[0] * w[0] ** 2 - 0.5 * w[1] ** 2 + h[1] * w[1]

    def outer(w, h):
        return (w**2).sum()

    w = torch.tensor([0.3, 0.7], dtype=DT)
    h = torch.tensor([2.0, 1.0], dtype=DT)
    with pytest.warns(hg.HypergradientWarning, match="curvature"):
        out, info = hg.implicit(inner, outer, w, h, hg.CG(10), return_info=True)
    assert info.status == "negative_curvature" and not info.converged
    assert bool(torch.isfinite(out).all())
