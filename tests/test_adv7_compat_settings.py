"""HippoTrainer's settings are public attributes a user may reassign (``ho.num_terms = 5``
between epochs). The compat classes checked them only in the constructor: a bad value
set later surfaced at the next hyper-step, after the optimizer's step, as another name's
error (``num_terms = 0``: "`maxiter` must be an integer >= 1"; ``epsilon = -1``: "math
domain error"; ``inner_steps = 0``: ``ZeroDivisionError``) or silently (``T = 0``: one
training step taken). Every assignment is now checked, naming the attribute; a valid value
set later is the one used (Neumann's series against the dense one)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hypergradient.compat.hippotrainer import DRMAD, HOAG, T1T2, Neumann

DT = torch.float64
LR = 0.1
g = torch.Generator().manual_seed(0)
X = torch.randn(20, 3, generator=g, dtype=DT)
Y = torch.randn(20, 1, generator=g, dtype=DT)


def _setup(cls, **kw):
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()
    theta = torch.tensor([0.1], dtype=DT)

    def criterion(out, y):
        return ((out - y) ** 2).mean() + theta * model.weight.square().sum()

    ho = cls(
        {"theta": theta},
        hyper_lr=0.1,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        train_loader=[(X, Y)],
        val_loader=[(X, Y)],
        criterion=criterion,
        **kw,
    )
    return model, theta, ho


@pytest.mark.parametrize(
    ("cls", "attr", "bad", "good"),
    [
        (T1T2, "inner_steps", 0, 2),
        (Neumann, "num_terms", 0, 5),
        (HOAG, "epsilon", -1.0, 1e-6),
        (HOAG, "cg_max_iter", 0, 3),
        (DRMAD, "T", 0, 2),
        (DRMAD, "weight_decay", -0.5, 0.1),
    ],
)
def test_assignments_are_checked_naming_the_attribute(cls, attr, bad, good):
    model, theta, ho = _setup(cls)
    before = getattr(ho, attr)
    with pytest.raises(ValueError, match=f"`{attr}`"):
        setattr(ho, attr, bad)
    assert getattr(ho, attr) == before
    setattr(ho, attr, good)
    assert getattr(ho, attr) == good


def test_a_num_terms_set_later_is_the_series_used():
    model, theta, ho = _setup(Neumann, num_terms=1)
    ho.num_terms = 6
    w = model.weight.detach().reshape(-1)
    jac = torch.autograd.functional.jacobian

    def f(w, t):
        return ((X @ w - Y[:, 0]) ** 2).mean() + t.sum() * (w**2).sum()

    hess = torch.autograd.functional.hessian(lambda w: f(w, theta), w)
    step = torch.eye(3, dtype=DT) - LR * hess
    series = LR * sum(torch.linalg.matrix_power(step, j) for j in range(7))
    mixed = jac(lambda t: jac(lambda w: f(w, t), w, create_graph=True), theta)
    ref = jac(lambda t: f(w, t), theta) - mixed.T @ series @ jac(lambda w: f(w, theta), w)
    got = ho.hyper_grad_on_batches((X, Y), (X, Y))[0]
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-15)
