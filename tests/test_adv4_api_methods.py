"""``hg.Trajectory`` built by a caller: a generator of batches is named at construction.

``Trajectory(batches=(b for b in ...))`` was accepted and every trajectory method then failed
with "object of type 'generator' has no len()"; the answer for a list is unchanged and
equals the closed form of three SGD steps on a quadratic.
"""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg

DT = torch.float64


def _setup():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(8, 3, generator=g, dtype=DT)
    y = torch.randn(8, generator=g, dtype=DT)

    def step_loss(w, h, b):
        return 0.5 * ((b[0] @ w - b[1]) ** 2).mean() + 0.5 * h * (w**2).sum()

    def outer(w, h):
        return 0.5 * ((X @ w - y) ** 2).mean()

    return X, y, step_loss, outer


def test_a_generator_of_batches_is_named():
    X, y, step_loss, _ = _setup()
    w0 = torch.zeros(3, dtype=DT)
    with pytest.raises(TypeError, match="`batches` must be a sequence with one batch per step"):
        hg.Trajectory(step_loss, w0, hg.optim.sgd(0.1), ((X, y) for _ in range(3)))


def test_a_list_of_batches_gives_the_closed_form():
    X, y, step_loss, outer = _setup()
    lr, h, T = 0.1, torch.tensor(0.3, dtype=DT), 3
    w0 = torch.full((3,), 0.2, dtype=DT)
    tr = hg.Trajectory(step_loss, w0, hg.optim.sgd(lr), [(X, y)] * T)
    got, _ = hg.Unrolled()(hg.Problem(step_loss, outer, w0, h, trajectory=tr))
    # w_{t+1} = M w_t + c with M = I - lr (X^T X / n + h I), c = lr X^T y / n;
    # dw_{t+1}/dh = M dw_t - lr w_t; dg/dh = grad g(w_T) . dw_T/dh
    n = X.shape[0]
    M = torch.eye(3, dtype=DT) - lr * (X.T @ X / n + h * torch.eye(3, dtype=DT))
    c = lr * X.T @ y / n
    w, dw = w0.clone(), torch.zeros(3, dtype=DT)
    for _ in range(T):
        w, dw = M @ w + c, M @ dw - lr * w
    want = (X.T @ (X @ w - y) / n) @ dw
    assert float(got) == pytest.approx(float(want), rel=1e-12)


def test_problem_refuses_a_non_bool_by_reference_flag_and_a_non_trajectory():
    """hparams_by_reference='yes' was read as True (then a misleading 'hparams must be a leaf
    tensor with requires_grad=True'); trajectory={} failed later as 'needs a trajectory'."""
    X, y, step_loss, outer = _setup()
    w, h = torch.zeros(3, dtype=DT), torch.tensor(0.1, dtype=DT)
    with pytest.raises(TypeError, match="`hparams_by_reference` must be True or False"):
        hg.Problem(step_loss, outer, w, h, lr=0.1, hparams_by_reference="yes")
    with pytest.raises(TypeError, match="`trajectory` must be a hg.Trajectory or None"):
        hg.Problem(step_loss, outer, w, h, trajectory={})  # type: ignore[arg-type]


def test_hg_neumann_names_its_own_argument():
    """hg.neumann(..., iters=0) said "`maxiter` must be an integer >= 1" (the class's name)."""

    def f(w, h):
        return 0.5 * h * (w**2).sum()

    def g(w, h):
        return w.sum()

    w, h = torch.ones(2, dtype=DT), torch.tensor(0.5, dtype=DT)
    with pytest.raises(ValueError, match="`iters` must be an integer >= 1"):
        hg.neumann(f, g, w, h, iters=0)
    # H = h I, b = 1, d_h grad_w f = w: dg/dh = -w . (H^{-1} 1) = -2 / h; alpha = 1/h is exact
    got = hg.neumann(f, g, w, h, iters=3, alpha=2.0)
    assert float(got) == pytest.approx(-2.0 / 0.5, rel=1e-14)
