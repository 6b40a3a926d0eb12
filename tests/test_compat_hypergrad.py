"""hypergradient.compat.hypergrad: the seed library's call shapes, correct mathematics."""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg
from conftest import to_device
from hypergradient.compat.hypergrad import approx_hypergrad as compat
from hypergradient.compat.hypergrad.approx_hypergrad import conjugate_gradient, neumann, nystrom

DT = torch.float64
GEN = torch.Generator().manual_seed(11)
X = torch.randn(60, 6, generator=GEN, dtype=DT)
Y = torch.randn(60, generator=GEN, dtype=DT)
XV = torch.randn(40, 6, generator=GEN, dtype=DT)
YV = torch.randn(40, generator=GEN, dtype=DT)
N = X.shape[0]


# The seed's convention: objectives take (in_params, out_params), both tuples of tensors.
def inner_obj(in_params, out_params):
    w, b = in_params
    (lam,) = out_params
    return 0.5 * ((X @ w + b - Y) ** 2).mean() + 0.5 * (lam * w**2).sum()


def outer_obj(in_params, out_params):
    w, b = in_params
    return 0.5 * ((XV @ w + b - YV) ** 2).mean()


LAM = torch.linspace(0.05, 0.5, 6, dtype=DT)


def _solve_inner():
    Xa = torch.cat([X, torch.ones(N, 1, dtype=DT)], 1)
    A = Xa.T @ Xa / N + torch.diag(torch.cat([LAM, torch.zeros(1, dtype=DT)]))
    sol = torch.linalg.solve(A, Xa.T @ Y / N)
    return (sol[:6].clone(), sol[6:].clone()), A


(W, B), A = _solve_inner()
IN_PARAMS = (W, B)
OUT_PARAMS = (LAM,)
XVA = torch.cat([XV, torch.ones(XV.shape[0], 1, dtype=DT)], 1)
GRAD_W = XVA.T @ (XVA @ torch.cat([W, B]) - YV) / XV.shape[0]
# d/dlam <grad_w f, x> = x[:6] * w  (the mixed product is diagonal)
EXACT = -torch.linalg.solve(A, GRAD_W)[:6] * W


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_documented_call_shapes_return_tuples():
    for fn, extra in ((conjugate_gradient, (7, 0.1)), (neumann, (5, 0.1)), (nystrom, (5, 0.1))):
        out = fn(inner_obj, outer_obj, IN_PARAMS, OUT_PARAMS, *extra)
        assert isinstance(out, tuple) and len(out) == 1
        assert out[0].shape == LAM.shape and out[0].dtype == DT and not out[0].requires_grad
    out = compat.nystrom(inner_obj, outer_obj, IN_PARAMS, OUT_PARAMS, rank=5, rho=0.1)
    assert isinstance(out, tuple)
    from hypergradient.compat import hypergrad as package_level

    assert package_level.nystrom is nystrom


def test_conjugate_gradient_is_textbook_cg_whatever_lr():
    # n = 7 unknowns: n iterations of CG are exact in exact arithmetic.
    results = [
        conjugate_gradient(inner_obj, outer_obj, IN_PARAMS, OUT_PARAMS, 7, lr)[0]
        for lr in (1.0, 0.1, 10.0)
    ]
    for r in results:
        assert _rel(r, EXACT) < 1e-10
    # and it matches the core solver iteration by iteration
    core = hg.implicit(inner_obj, outer_obj, IN_PARAMS, OUT_PARAMS, hg.CG(maxiter=3, tol=0))
    three = conjugate_gradient(inner_obj, outer_obj, IN_PARAMS, OUT_PARAMS, 3, 0.01)
    assert torch.allclose(core[0], three[0], rtol=0, atol=1e-14)


def test_neumann_is_the_seed_series():
    lr, k = 0.3, 6
    M = torch.eye(7, dtype=DT) - lr * A
    series = sum(torch.linalg.matrix_power(M, j) for j in range(k + 1)) * lr
    expected = -(series @ GRAD_W)[:6] * W
    out = neumann(inner_obj, outer_obj, IN_PARAMS, OUT_PARAMS, k, lr)[0]
    assert _rel(out, expected) < 1e-12
    # and converges to the exact hypergradient with many terms
    many = neumann(inner_obj, outer_obj, IN_PARAMS, OUT_PARAMS, 3000, 1.0)[0]
    assert _rel(many, EXACT) < 1e-8


def test_nystrom_full_rank_is_exact_and_uses_global_rng():
    out = nystrom(inner_obj, outer_obj, IN_PARAMS, OUT_PARAMS, 7, 1e-10)[0]
    assert _rel(out, EXACT) < 1e-7
    torch.manual_seed(5)
    a = nystrom(inner_obj, outer_obj, IN_PARAMS, OUT_PARAMS, 3, 0.1)[0]
    torch.manual_seed(5)
    b = nystrom(inner_obj, outer_obj, IN_PARAMS, OUT_PARAMS, 3, 0.1)[0]
    assert torch.equal(a, b)


def test_all_three_on_device(device):
    """Data made on the CPU and moved: the same hypergradients, on the data's device."""
    Xd, Yd, XVd, YVd = to_device(device, (X, Y, XV, YV))

    def inner_d(in_params, out_params):
        w, b = in_params
        (lam,) = out_params
        return 0.5 * ((Xd @ w + b - Yd) ** 2).mean() + 0.5 * (lam * w**2).sum()

    def outer_d(in_params, out_params):
        w, b = in_params
        return 0.5 * ((XVd @ w + b - YVd) ** 2).mean()

    ins, outs = to_device(device, (IN_PARAMS, OUT_PARAMS))
    lr, k = 0.3, 6
    M = torch.eye(7, dtype=DT) - lr * A
    series = sum(torch.linalg.matrix_power(M, j) for j in range(k + 1)) * lr
    for out, ref, tol in (
        (conjugate_gradient(inner_d, outer_d, ins, outs, 7)[0], EXACT, 1e-10),
        (nystrom(inner_d, outer_d, ins, outs, 7, 1e-10)[0], EXACT, 1e-7),
        (neumann(inner_d, outer_d, ins, outs, k, lr)[0], -(series @ GRAD_W)[:6] * W, 1e-12),
    ):
        assert out.device == outs[0].device
        assert _rel(out.cpu(), ref) < tol


@pytest.mark.parametrize(
    "call",
    [
        lambda: conjugate_gradient(inner_obj, outer_obj, IN_PARAMS, OUT_PARAMS, 0, 1.0),
        lambda: neumann(inner_obj, outer_obj, IN_PARAMS, OUT_PARAMS, 3, 0.0),
        lambda: nystrom(inner_obj, outer_obj, IN_PARAMS, OUT_PARAMS, 0, 0.1),
        lambda: nystrom(inner_obj, outer_obj, IN_PARAMS, OUT_PARAMS, 3, -1.0),
    ],
)
def test_non_positive_budgets_are_rejected(call):
    with pytest.raises(ValueError, match="`(num_iters|lr|rank|rho)`"):
        call()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_matches_the_seed_library_where_the_seed_is_right():
    """If hypergrad 0.0.1 is installed (benchmark set-up only), compare where it is correct."""
    seed = pytest.importorskip("hypergrad.approx_hypergrad")
    lr, k = 0.3, 6
    theirs = seed.neumann(inner_obj, outer_obj, IN_PARAMS, OUT_PARAMS, k, lr)[0]
    ours = neumann(inner_obj, outer_obj, IN_PARAMS, OUT_PARAMS, k, lr)[0]
    assert _rel(ours, theirs) < 1e-10
    # Same random columns (global generator), same approximation: float64, moderate rho.
    torch.manual_seed(3)
    theirs = seed.nystrom(inner_obj, outer_obj, IN_PARAMS, OUT_PARAMS, 4, 0.1)[0]
    torch.manual_seed(3)
    ours = nystrom(inner_obj, outer_obj, IN_PARAMS, OUT_PARAMS, 4, 0.1)[0]
    assert _rel(ours, theirs) < 1e-8
    # Its CG agrees with textbook CG for one iteration at lr == 1 ...
    theirs = seed.conjugate_gradient(inner_obj, outer_obj, IN_PARAMS, OUT_PARAMS, 1, 1.0)[0]
    ours = conjugate_gradient(inner_obj, outer_obj, IN_PARAMS, OUT_PARAMS, 1, 1.0)[0]
    assert _rel(ours, theirs) < 1e-12
    # ... but then builds the next direction from the previous residual (p = r_k + beta p
    # instead of r_{k+1} + beta p), so with n iterations it is not exact while ours is.
    theirs = seed.conjugate_gradient(inner_obj, outer_obj, IN_PARAMS, OUT_PARAMS, 7, 1.0)[0]
    ours = conjugate_gradient(inner_obj, outer_obj, IN_PARAMS, OUT_PARAMS, 7, 1.0)[0]
    assert _rel(ours, EXACT) < 1e-10 and _rel(theirs, EXACT) > 1e-3


@pytest.mark.parametrize("seed", [3, 4, 17])
def test_nystrom_samples_the_columns_hypergrad_samples(seed):
    """hypergrad's nystrom draws ``torch.randperm(n)[:rank]`` from torch's global generator
    and applies the Woodbury form of ``(H_nys + rho I)^{-1}`` with those Hessian rows: after
    the same ``torch.manual_seed`` the compat call uses the same columns (its hypergradient
    equals that formula, written here on the dense Hessian), and the global stream moves on
    by the same draw."""
    rank, rho, n = 4, 0.1, A.shape[0]
    torch.manual_seed(seed)
    idx = torch.randperm(n)[:rank]
    after = torch.rand(3)
    C = A[idx]  # the sampled rows of H (= columns, H symmetric)
    x = GRAD_W / rho - C.T @ torch.linalg.solve(C[:, idx] + C @ C.T / rho, C @ GRAD_W) / rho**2
    reference = -x[:6] * W
    torch.manual_seed(seed)
    (ours,) = nystrom(inner_obj, outer_obj, IN_PARAMS, OUT_PARAMS, rank, rho)
    assert _rel(ours, reference) < 1e-8
    assert torch.equal(torch.rand(3), after)
    # another seed draws other columns: the comparison above can fail
    torch.manual_seed(seed + 1000)
    (other,) = nystrom(inner_obj, outer_obj, IN_PARAMS, OUT_PARAMS, rank, rho)
    assert _rel(other, reference) > 1e-6


@pytest.mark.parametrize(
    "fn,args,expected",
    [(neumann, (5, 0.1), 5), (nystrom, (4, 0.1), 5), (conjugate_gradient, (3, 1.0), 3)],
    ids=["neumann", "nystrom", "cg"],
)
def test_calls_spend_only_their_products(fn, args, expected, products):
    """``neumann(num_iters=k)`` takes k Hessian-vector products and
    ``conjugate_gradient(num_iters=k)`` k: CG reports its residual and Neumann stops at a
    growing term, so none is spent on a residual. ``nystrom(rank=r)`` takes r + 1: its
    one-shot inverse has no other test of its answer, and one worse than ``x = 0`` must
    warn (``tests/test_adv23_compat_nystrom_residual.py``)."""
    fn(inner_obj, outer_obj, IN_PARAMS, OUT_PARAMS, *args)
    assert products[0] == expected
