"""GroupNorm networks through the batched (vmapped) second-order products.

torch's batching rule for ``group_norm``'s double backward (``is_grads_batched=True``)
raises for most shapes and is silently wrong when the channels equal the spatial size with
a batch of one. Forward mode's batched tangents then crashed ("backward through the graph
a second time": the failed batched pass had freed the graph its row-by-row fallback
needed) or returned a wrong hypergradient; the Hessian operator's vmapped ``matmat`` (the
``Exact`` solver's dense Hessian, with ``batched="auto"``, the default) returned a wrong
one. References: plain autograd through the same loop and a dense float64 Hessian solve.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hypergradient as hg

DT = torch.float64
LR, MOMENTUM, STEPS = 0.3, 0.5, 3


def problem(channels: int, side: int, n: int):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, channels, 1),
        nn.GroupNorm(1, channels),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(channels * side * side, 2),
    ).double()
    c_in = net[0].in_channels
    x, y = torch.randn(n, c_in, side, side, dtype=DT), torch.randint(0, 2, (n,))
    xv, yv = torch.randn(5, c_in, side, side, dtype=DT), torch.randint(0, 2, (5,))
    p0 = {k: v.detach().clone() for k, v in net.named_parameters()}
    ce = nn.functional.cross_entropy

    def inner(p, h):
        decay = sum(h[i] * (v**2).sum() for i, v in enumerate(p.values()))
        return ce(functional_call(net, p, (x,)), y) + 0.5 * decay

    def outer(p, h):
        return ce(functional_call(net, p, (xv,)), yv)

    return inner, outer, p0


def through_the_loop(inner, outer, p0, h):
    """Momentum SGD unrolled in plain autograd: the exact hypergradient."""
    phi = h.clone().requires_grad_()
    q = {k: v.clone().requires_grad_() for k, v in p0.items()}
    buf = None
    for _ in range(STEPS):
        g = torch.autograd.grad(inner(q, phi), list(q.values()), create_graph=True)
        buf = list(g) if buf is None else [MOMENTUM * b + gi for b, gi in zip(buf, g)]
        q = {k: v - LR * b for (k, v), b in zip(q.items(), buf)}
    return torch.autograd.grad(outer(q, phi), phi)[0]


@pytest.mark.parametrize(
    ("channels", "side", "n"),
    [(3, 4, 1), (3, 4, 2), (4, 2, 1), (9, 3, 1)],
    ids=["no-rule", "no-rule-batch2", "wrong-rule", "wrong-rule-9"],
)
def test_forward_mode_on_group_norm_is_the_loop_s_hypergradient(channels, side, n):
    inner, outer, p0 = problem(channels, side, n)
    h = torch.full((len(p0),), 0.1, dtype=DT)
    want = through_the_loop(inner, outer, p0, h)
    opt = hg.optim.sgd(lr=LR, momentum=MOMENTUM)
    got = hg.forward_mode(inner, outer, p0, h, STEPS, opt)  # before: raised, or 5e-4 off
    assert float((got - want).norm() / want.norm()) < 1e-12
    assert float((hg.unrolled(inner, outer, p0, h, STEPS, opt) - want).norm()) < 1e-12


@pytest.mark.parametrize("batched", ["auto", True, False])
def test_exact_solver_on_group_norm_is_the_dense_solve(batched):
    """Channels = spatial size, one sample: the vmapped rows were wrong (4.7 relative)."""
    inner, outer, p0 = problem(4, 2, 1)
    h = torch.full((len(p0),), 3.0, dtype=DT)
    names, shapes = list(p0), [v.shape for v in p0.values()]

    def unflat(f):
        out, i = {}, 0
        for k, s in zip(names, shapes):
            out[k] = f[i : i + s.numel()].view(s)
            i += s.numel()
        return out

    flat = torch.cat([v.flatten() for v in p0.values()])
    hess = torch.autograd.functional.hessian(lambda f: inner(unflat(f), h), flat)
    fr, hr = flat.clone().requires_grad_(), h.clone().requires_grad_()
    b = torch.autograd.grad(outer(unflat(fr), h), fr)[0]
    x = torch.linalg.solve(hess, b)
    g = torch.autograd.grad(inner(unflat(fr), hr), fr, create_graph=True)[0]
    want = -torch.autograd.grad(g @ x, hr)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)  # indefinite: a saddle
        got = hg.implicit(inner, outer, p0, h, solver=hg.Exact(), batched=batched)
    assert float((got - want).norm() / want.norm()) < 1e-10


def test_forward_mode_in_the_hyperoptimizer_on_a_group_norm_net():
    """ForwardMode crashed at the hyper-step; now it is Unrolled's hypergradient."""
    g = torch.Generator().manual_seed(3)

    def sample(n):
        return torch.randn(n, 2, 4, 4, generator=g, dtype=DT), torch.randint(
            0, 3, (n,), generator=g
        )

    batches, val = [sample(6) for _ in range(3)], sample(8)
    ce = nn.functional.cross_entropy

    def train_loss(m, h, b):
        return ce(m(b[0]), b[1]) + 0.5 * sum(h["decay"] * (p**2).sum() for p in m.parameters())

    def run(method):
        torch.manual_seed(1)
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.Tanh(), nn.Flatten(),
            nn.Linear(48, 3),
        ).double()  # fmt: skip
        hopt = hg.HyperOptimizer(
            model,
            {"decay": torch.tensor(0.02, dtype=DT)},
            inner_optimizer=torch.optim.Adam(model.parameters(), lr=0.02),
            outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.0),
            train_loss=train_loss,
            val_loss=lambda m, h, b: ce(m(b[0]), b[1]),
            val_data=val,
            method=method,
            inner_steps=3,
        )
        for b in batches:
            hopt.zero_grad()
            hopt.train_loss(b).backward()
            hopt.step(b)
        return hopt.history[-1].hypergrad["decay"]

    want = run(hg.Unrolled())
    got = run(hg.ForwardMode())
    assert float((got - want).abs() / want.abs()) < 1e-10
