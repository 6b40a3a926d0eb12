"""The compat ``nystrom`` returned answers worse than ``x = 0`` without a word.

It called ``hg.implicit(..., residual=False)`` (hypergrad's calls return the hypergradient
alone), and Nystrom's one-shot inverse has no other test of its answer: on the README's
ridge problem with hypergrad's own ``rank=5, rho=0.1`` the compat answer was 2.1-2.4 times
the exact hypergradient's norm away from it (``x = 0``: 1.0), with no warning, where
``hg.nystrom`` warns. It now spends one product on ``||b - H x||`` and warns as the core
does; the hypergradient itself is unchanged (the same columns, the same arithmetic).
CG reports its residual and Neumann stops at a growing term, so they spend nothing more.
"""

import warnings

import pytest
import torch
from sklearn.datasets import load_diabetes

import hypergradient as hg
from hypergradient.compat.hypergrad.approx_hypergrad import conjugate_gradient, neumann, nystrom

D = torch.float64
_X, _Y = load_diabetes(return_X_y=True)
X, Y = torch.tensor(_X * 20), torch.tensor((_Y - _Y.mean()) / _Y.std())
XT, YT, XV, YV = X[:200], Y[:200], X[200:], Y[200:]
PHI = torch.full((10,), -3.0, dtype=D)
THETA = torch.linalg.solve(XT.T @ XT / 200 + torch.diag(PHI.exp()), XT.T @ YT / 200)


def f(p, h):
    return 0.5 * ((XT @ p[0] - YT) ** 2).mean() + 0.5 * (h[0].exp() * p[0] ** 2).sum()


def g(p, h):
    return 0.5 * ((XV @ p[0] - YV) ** 2).mean()


EXACT = hg.implicit(f, g, (THETA,), (PHI,), hg.Exact())[0]


def _call(fn, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (h,) = fn(f, g, (THETA,), (PHI,), **kw)
    return h, [w for w in caught if issubclass(w.category, hg.HypergradientWarning)]


def _error(h):
    return float((h - EXACT).norm() / EXACT.norm())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_answer_worse_than_zero_warns_at_the_callers_line(seed):
    torch.manual_seed(seed)
    h, ours = _call(nystrom, rank=5, rho=0.1)
    assert _error(h) > 1.5  # worse than x = 0 (error 1): the warning is owed
    texts = [str(w.message) for w in ours]
    assert len(ours) == 1 and "worse than x = 0" in texts[0], texts
    assert ours[0].filename == __file__
    # the answer is the one the call returned before: same columns, no residual read
    torch.manual_seed(seed)
    columns = torch.Generator().set_state(torch.get_rng_state())
    torch.randperm(10)
    solver = hg.Nystrom(5, 0.1, generator=columns)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same = hg.implicit(f, g, (THETA,), (PHI,), solver, stationarity=None, residual=False)
    assert torch.equal(h, same[0])


def test_a_good_answer_is_silent():
    torch.manual_seed(0)
    h, ours = _call(nystrom, rank=10, rho=1e-9)  # full rank: the exact inverse
    assert _error(h) < 1e-6 and not ours, [str(w.message) for w in ours]


@pytest.mark.parametrize(
    "fn, kw, matvecs",
    [(nystrom, dict(rank=5, rho=0.1), 1), (conjugate_gradient, dict(num_iters=4), 4)]
    + [(neumann, dict(num_iters=4, lr=1e-3), 4)],
)
def test_products_spent(fn, kw, matvecs, monkeypatch):
    """Single products: Nystrom's residual (its 5 columns are one batched product), CG's
    and Neumann's iterations and nothing more."""
    counted = []
    original = hg.HessianOperator.matvec

    def matvec(self, v):
        counted.append(1)
        return original(self, v)

    monkeypatch.setattr(hg.HessianOperator, "matvec", matvec)
    torch.manual_seed(0)
    _call(fn, **kw)
    assert len(counted) == matvecs
