"""A momentum linked to a hyperparameter and started at exactly 0 (torch.optim.SGD keeps no
momentum buffers then): the trajectory window's functional twin keeps them
(``from_torch(..., tuned=links)``), so the first hyper-step is the derivative of the plain
loop, not a refusal after the inner step."""

from __future__ import annotations

import torch

import hypergradient as hg

D = torch.float64


def data():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(40, 4, generator=g, dtype=D), torch.randn(40, 1, generator=g, dtype=D)
    Xv, yv = torch.randn(30, 4, generator=g, dtype=D), torch.randn(30, 1, generator=g, dtype=D)
    return X, y, Xv, yv


def mse(m, h, b):
    return ((m(b[0]) - b[1]) ** 2).mean()


def plain(momentum: float, steps: int = 4) -> float:
    """Validation loss after ``steps`` of torch.optim.SGD from the same start."""
    X, y, Xv, yv = data()
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 1).double()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=momentum)
    for _ in range(steps):
        opt.zero_grad()
        mse(m, None, (X, y)).backward()
        opt.step()
    with torch.no_grad():
        return float(mse(m, None, (Xv, yv)))


def test_momentum_linked_from_zero_gets_the_plain_loops_derivative():
    X, y, Xv, yv = data()
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 1).double()
    before = [p.detach().clone() for p in m.parameters()]
    hopt = hg.HyperOptimizer(
        m,
        {"mom": torch.tensor(0.0, dtype=D)},
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.0),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.0),
        train_loss=mse,
        val_loss=mse,
        val_data=(Xv, yv),
        method=hg.Unrolled(),
        inner_steps=4,
        optimizer_hparams={"momentum": "mom"},
    )
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    for _ in range(4):
        hopt.zero_grad()
        hopt.train_loss((X, y)).backward()
        hopt.step((X, y))
    eps = 1e-5  # torch refuses a negative momentum: a one-sided second-order difference
    fd = (-3 * plain(0.0) + 4 * plain(eps) - plain(2 * eps)) / (2 * eps)
    got = float(hopt.history[-1].hypergrad["mom"])
    assert abs(fd) > 1e-3 and abs(got - fd) <= 1e-7 * abs(fd) + 1e-10, (got, fd)
