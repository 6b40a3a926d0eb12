"""The stationarity warning with an outer loss that does not depend on the parameters (its
gradient is exactly 0): it said the inner gradient was "1.57e+300 times" the outer one (a
division by a 1e-300 floor); it now says the outer gradient is 0. The hypergradient is the
direct term, exactly."""

import warnings

import torch

import hypergradient as hg


def test_zero_outer_gradient_is_named_not_divided_by():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(20, 5, dtype=torch.float64, generator=gen)
    y = torch.randn(20, dtype=torch.float64, generator=gen)
    w = torch.linalg.solve(x.T @ x / 20 + 0.5 * torch.eye(5, dtype=torch.float64), x.T @ y / 20)
    t = torch.tensor(0.7, dtype=torch.float64)

    def f(p, h):  # h shifts the minimum: w is not stationary for it
        return ((x @ p - y) ** 2).mean() / 2 + 0.25 * (p * p).sum() + h * p.sum()

    def g(p, h):
        return h**2

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = hg.implicit(f, g, w, t)
    assert float(out) == 2 * 0.7
    texts = [str(c.message) for c in caught if issubclass(c.category, hg.HypergradientWarning)]
    assert len(texts) == 1
    assert "while the outer gradient is 0" in texts[0]
    assert "e+300" not in texts[0]
