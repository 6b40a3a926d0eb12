"""``hg.Exact`` answered ``x = 0`` ("singular") for an inner loss scaled by 1e180 or more.

Its test of which eigenvalues are rounding noise read ``||skew u||`` (the matrix's
antisymmetric rounding along each eigenvector) with ``vector_norm``, whose squares of
entries ~1e184 overflow: every eigenvalue was dropped as noise, the hypergradient was the
direct term alone and a warning blamed a singular Hessian. The noise is now read in units
of the top eigenvalue. The hypergradient does not depend on the scale (``s H`` and the
``s``-scaled mixed product cancel), so every scale must give the dense solve's answer.
"""

import warnings

import pytest
import torch

import hypergradient as hg

D = torch.float64
torch.manual_seed(0)
N, K = 60, 6
X, Y = torch.randn(N, K, dtype=D), torch.randn(N, dtype=D)
XV, YV = torch.randn(40, K, dtype=D), torch.randn(40, dtype=D)
LAM = torch.linspace(-2, 0, K, dtype=D)
HESS = X.T @ X / N + torch.diag(LAM.exp())
W = torch.linalg.solve(HESS, X.T @ Y / N)
REF = -(torch.diag(LAM.exp() * W)) @ torch.linalg.solve(HESS, XV.T @ (XV @ W - YV) / 40)


def g(w, lam):
    return 0.5 * ((XV @ w - YV) ** 2).mean()


@pytest.mark.parametrize("scale", [1e-250, 1e-200, 1e-150, 1.0, 1e150, 1e180, 1e200, 1e250])
def test_every_scale_gives_the_dense_answer_without_a_warning(scale):
    def f(w, lam):
        return scale * (0.5 * ((X @ w - Y) ** 2).mean() + 0.5 * (lam.exp() * w**2).sum())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h, info = hg.implicit(f, g, W, LAM, hg.Exact(), return_info=True)
    assert float((h - REF).norm() / REF.norm()) < 1e-13
    assert info.relative_residual < 1e-13
    assert not [str(w.message) for w in caught]


@pytest.mark.parametrize("scale", [1.0, 1e200, 1e-200])
def test_a_singular_hessian_is_still_found_at_every_scale(scale):
    """A duplicated feature and no penalty on it: the minimum-norm answer, whatever the
    scale (the noise test, in units of the top eigenvalue, still drops the zero one)."""
    Xd = torch.cat([X[:, :3], X[:, :1]], 1)
    Xvd = torch.cat([XV[:, :3], XV[:, :1]], 1)
    lam = torch.tensor([-1.0, -1.0, -1.0], dtype=D)

    def f(w, lam):
        pen = 0.5 * (lam.exp() * w[1:] ** 2).sum()
        return scale * (0.5 * ((Xd @ w - Y) ** 2).mean() + pen)

    def go(w, lam):
        return 0.5 * ((Xvd @ w - YV) ** 2).mean()

    w0 = torch.zeros(4, dtype=D)
    hess = Xd.T @ Xd / N + torch.diag(torch.cat([torch.zeros(1, dtype=D), lam.exp()]))
    b = Xvd.T @ (Xvd @ w0 - YV) / 40
    x = torch.linalg.pinv(hess, rtol=1e-10, hermitian=True) @ b
    ref = -(lam.exp() * w0[1:]) * x[1:]  # d/dlam of grad_w f is exp(lam) w: zero at w0
    ref = ref - 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h, info = hg.implicit(f, go, w0, lam, hg.Exact(), return_info=True, stationarity=None)
    assert torch.allclose(h, ref, atol=1e-14)
    solution = info.solution * scale  # the solve of s H x = b: x / s
    assert torch.allclose(solution, x, rtol=1e-8, atol=1e-12)
