"""CG-family solvers on half-precision products report what they reach (adversarial round).

A bfloat16 (float16) model's Hessian products round at 3.9e-3 (4.9e-4): with tol=1e-6 the
CG, NystromPCG and RecycledCG solves used to report "converged" with the *updated*
residual (7e-7) while the true one, ||b - H x|| / ||b|| against the dense float64 Hessian,
was 2.7e-3 (3.7e-4). They now verify with the product precision's epsilon and say
"max_iterations" with ``stats["precision_limited"]``, the measured true residual in
``relative_residual`` and a HypergradientWarning; float32 keeps "converged", silently.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

D = 12
DT = torch.float64
BCE = torch.nn.functional.binary_cross_entropy_with_logits


def _data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, D, generator=g, dtype=DT)
    w_true = torch.randn(D, generator=g, dtype=DT)
    y = (torch.sigmoid(X @ w_true) > torch.rand(400, generator=g, dtype=DT)).to(DT)
    return X[:200], y[:200], X[200:], y[200:]


XT, YT, XV, YV = _data()
H_LOG = torch.full((D,), -1.0, dtype=DT)


def f(w, h):
    z = XT.to(w.dtype) @ w
    return BCE(z, YT.to(z.dtype)) + 0.5 * torch.sum(h.exp().to(w.dtype) * w**2)


def g(w, h):
    z = XV.to(w.dtype) @ w
    return BCE(z, YV.to(z.dtype))


def _optimum() -> torch.Tensor:
    w = torch.zeros(D, dtype=DT)
    for _ in range(30):
        grad = torch.func.grad(f)(w, H_LOG)
        w = w - torch.linalg.solve(torch.func.hessian(f)(w, H_LOG), grad)
    return w


W = _optimum()


def true_residual(w_half: torch.Tensor, x: torch.Tensor) -> float:
    """||b - H x|| / ||b|| with the dense float64 Hessian at the (rounded) point."""
    w64 = w_half.detach().double()
    H = torch.func.hessian(f)(w64, H_LOG)
    b = torch.func.grad(g)(w64, H_LOG)
    return float((b - H @ x.double()).norm() / b.norm())


SOLVERS = {
    "CG": lambda: hg.CG(maxiter=100, tol=1e-6),
    "NystromPCG": lambda: hg.NystromPCG(rank=5, maxiter=100, tol=1e-6, seed=0),
    "RecycledCG": lambda: hg.RecycledCG(maxiter=100, tol=1e-6),
}


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_products_not_reported_converged(name, dtype):
    w = W.to(dtype)
    with pytest.warns(hg.HypergradientWarning, match="cannot reach its tolerance"):
        _, info = hg.implicit(f, g, w, H_LOG.float(), solver=SOLVERS[name](), return_info=True)
    true = true_residual(w, info.solution)
    assert true > 100 * 1e-6  # the tolerance is out of reach of these products
    assert info.status == "max_iterations" and not info.status.ok
    assert info.stats["precision_limited"] is True
    assert info.converged is False
    # the reported residual is a true one (the products' own), not the updated 7e-7
    assert true / 3 < info.relative_residual < 3 * true


@pytest.mark.parametrize("name", list(SOLVERS))
def test_float32_products_still_converge_silently(name):
    w = W.float()
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)
        _, info = hg.implicit(f, g, w, H_LOG.float(), solver=SOLVERS[name](), return_info=True)
    assert info.status == "converged"
    assert "precision_limited" not in info.stats
    assert true_residual(w, info.solution) < 1e-5


def test_loose_tolerance_within_reach_converges_in_bf16():
    # tol above the attainable residual: a verified "converged", no warning
    w = W.bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)
        _, info = hg.implicit(f, g, w, H_LOG.float(), solver=hg.CG(tol=5e-2), return_info=True)
    assert info.status == "converged"
    assert true_residual(w, info.solution) < 5e-2


def test_autocast_products_not_reported_converged():
    w = W.float()
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _, info = hg.implicit(f, g, w, H_LOG.float(), solver=hg.CG(tol=1e-6), return_info=True)
    assert info.status == "max_iterations" and info.stats["precision_limited"]
    assert any("cannot reach its tolerance" in str(r.message) for r in rec)
    assert true_residual(w, info.solution) > 1e-4


def test_hoag_keeps_a_precision_limited_warm_start():
    # bf16 products: from the third call HOAG's tolerance is out of reach; the answer is as
    # good as the products allow, so it stays the next warm start (a reset would restart
    # every later solve from 0)
    w = W.bfloat16()
    method = hg.HOAG(tol=1e-4, maxiter=100)
    problem = hg.Problem(inner_loss=f, outer_loss=g, params=w, hparams=H_LOG.float())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        _, first = method(problem)
        _, second = method(problem)
    assert first.status == "max_iterations" and first.stats["precision_limited"]
    assert "warm_start_reset" not in first.stats
    assert second.stats["warm_start"] == "used"
    assert true_residual(w, second.solution) < 1e-2
