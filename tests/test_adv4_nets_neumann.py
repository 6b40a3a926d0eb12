"""IFT's Neumann series with a cached lambda_max estimate when the curvature grows.

``hg.IFT()`` steps its series by ``min(lr, 1 / (s lambda_est))`` with ``lambda_est`` cached
for ``refresh_every`` hyper-steps, and documents that a diverging series refreshes the
estimate at once. When the Hessian's top grew past ``2 / lr`` between refreshes, the
growing residual was declared negative curvature ("the Hessian is not positive definite")
because the step came from *an* estimate, even a stale one; the refresh never ran and a
hypergradient 87-100 % off the dense solve was applied, on a positive definite Hessian.
A stale estimate now proves nothing: the series is reported diverged, re-estimated and
summed again. Reference: the same truncated series with the dense float64 Hessian.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

import hypergradient as hg

DT = torch.float64
SCALES = [1.0, 1.0, 10.0]  # the last batch's Hessian top is ~90 times the first's
MAXITER = 50


def test_a_stale_estimate_is_refreshed_not_called_negative_curvature():
    gen = torch.Generator().manual_seed(0)

    def sample(scale=1.0):
        return (
            scale * torch.randn(20, 3, generator=gen, dtype=DT),
            torch.randn(20, 1, generator=gen, dtype=DT),
        )

    batches, val = [sample(s) for s in SCALES], sample()
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    mse = nn.functional.mse_loss

    def train_loss(m, h, b):
        return mse(m(b[0]), b[1]) + 0.5 * (h["decay"] * m.weight**2).sum()

    decay = torch.full((1, 3), 0.1, dtype=DT)
    hopt = hg.HyperOptimizer(
        model,
        {"decay": decay},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.0),
        train_loss=train_loss,
        val_loss=lambda m, h, b: mse(m(b[0]), b[1]),
        val_data=val,
        method=hg.IFT(maxiter=MAXITER, seed=0),
        inner_steps=1,
    )
    for b in batches:
        hopt.zero_grad()
        hopt.train_loss(b).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("error", hg.HypergradientWarning)  # before: it warned
            hopt.step(b)
    record = hopt.history[-1]
    info = record.diagnostics
    assert info["status"] == "fixed_budget" and info["estimated"]

    # the same series with the dense Hessian at the trained weights, on the last batch
    x, y = batches[-1]
    p = torch.cat([model.weight.detach().flatten(), model.bias.detach()])

    def f(q, d):
        return mse(x @ q[:3, None] + q[3], y) + 0.5 * (d * q[:3][None] ** 2).sum()

    hess = torch.autograd.functional.hessian(lambda q: f(q, decay), p)
    assert float(torch.linalg.eigvalsh(hess).min()) > 0  # positive definite
    pr = p.clone().requires_grad_()
    b = torch.autograd.grad(mse(val[0] @ pr[:3, None] + pr[3], val[1]), pr)[0]
    alpha = info["alpha"]
    assert alpha * float(torch.linalg.eigvalsh(hess).max()) < 2  # the refreshed step is safe
    term, total = b.clone(), b.clone()
    for _ in range(MAXITER):
        term = term - alpha * hess @ term
        total = total + term
    dr = decay.clone().requires_grad_()
    g = torch.autograd.grad(f(pr, dr), pr, create_graph=True)[0]
    want = -torch.autograd.grad(g @ (alpha * total), dr)[0]
    got = record.hypergrad["decay"]
    assert float((got - want).norm() / want.norm()) < 1e-10
