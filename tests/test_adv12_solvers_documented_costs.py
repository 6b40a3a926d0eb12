"""The documented product counts hold for warm-started calls: HOAG spends ``maxiter + 1``
products from a warm start (its residual ``A x0``; the docstring said "at most maxiter"), and
``Nystrom`` one more than its rank from a non-zero ``x0`` (it said "r products")."""

import warnings

import torch

import hypergradient as hg
from hypergradient.methods.base import Problem
from hypergradient.operators import MatrixOperator


def test_hoag_warm_started_call_costs_maxiter_plus_one_as_documented():
    gen = torch.Generator().manual_seed(10)
    n = 30
    x = torch.randn(60, n, dtype=torch.float64, generator=gen)
    y = torch.randn(60, dtype=torch.float64, generator=gen)
    h = torch.full((n,), 0.01, dtype=torch.float64)
    w = torch.linalg.solve(x.T @ x / 60 + torch.diag(h), x.T @ y / 60)

    def f(p, hp):
        return ((x @ p - y) ** 2).mean() / 2 + 0.5 * (hp * p * p).sum()

    def g(p, hp):
        return ((p - 1) ** 2).sum()

    method = hg.HOAG(maxiter=3, reset_on=("negative_curvature",))
    counts = []
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, info = method(Problem(inner_loss=f, outer_loss=g, params=w, hparams=h))
        counts.append(info.num_hvps)
    assert counts == [3, 4]  # the second call starts from the first one's solution
    doc = " ".join((hg.HOAG.__doc__ or "").split())
    assert "at most ``maxiter + 1`` products per call" in doc


def test_nystrom_warm_start_costs_one_more_product_as_documented():
    n, rank = 30, 5
    a = torch.diag(torch.linspace(1.0, 100.0, n, dtype=torch.float64))
    b = torch.ones(n, dtype=torch.float64)
    op = MatrixOperator(a)
    sol = hg.Nystrom(rank=rank, seed=0).solve(op, b, torch.full((n,), 0.01, dtype=torch.float64))
    assert sol.num_hvps == op.num_matvecs == rank + 1
    assert "one more from a non-zero warm start" in " ".join((hg.Nystrom.__doc__ or "").split())
