"""``info.stats["warm_start"]`` says ``"used"`` only when the kept solution started the
solve: HOAG and ``Implicit(warm_start=True)`` said "used" on a model of another size (the
kept solution is dropped, CG starts from 0: ``start_residual`` absent) and for a zero kept
solution (which CG ignores)."""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg


def _problem(n):
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(50, 6, generator=g), torch.randn(50, generator=g)
    Xn = X[:, :n]

    def f(t, h):
        return ((Xn @ t - y) ** 2).mean() + h * (t**2).sum()

    def gv(t, h):
        return ((Xn @ t) ** 2).mean()

    h = torch.tensor(0.1)
    theta = torch.linalg.solve(Xn.T @ Xn / 50 + h * torch.eye(n), Xn.T @ y / 50)
    return hg.Problem(f, gv, theta, h)


@pytest.mark.parametrize("make", [hg.HOAG, lambda: hg.Implicit(hg.CG(), warm_start=True)])
def test_the_warm_start_status_tells_whether_it_started_the_solve(make):
    method = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        first = method(_problem(6))[1]
        same = method(_problem(6))[1]
        other = method(_problem(4))[1]
    assert first.stats["warm_start"] == "none"
    assert same.stats["warm_start"] == "used" and "start_residual" in same.stats
    assert other.stats["warm_start"] == "none"  # was "used"
    assert "start_residual" not in other.stats


def test_a_zero_kept_solution_is_not_used():
    method = hg.Implicit(hg.CG(), warm_start=True)
    method.load_state_dict({"x": torch.zeros(6)})
    info = method(_problem(6))[1]
    assert info.stats["warm_start"] == "none"  # was "used"; CG ignores a zero start
