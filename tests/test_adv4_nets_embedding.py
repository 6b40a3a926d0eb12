"""``nn.Embedding(max_norm=...)`` renormalizes its weight in place in every forward pass.

The implicit methods evaluate the inner loss with its graph, then the outer loss, at the
same parameter tensors: the outer forward's renormalization bumped the version of a tensor
the inner graph had saved, and every IFT/HOAG/Implicit hyper-step raised torch's "modified
by an inplace operation". The hyper-step's losses now get copies of such weights; the
hypergradient is the dense float64 implicit formula's, and training is left as plain
training. Trajectory methods still replay the renormalization on their own states, as
training does (checked against central differences of the run).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hypergradient as hg

DT = torch.float64
V = 6
GEN = torch.Generator().manual_seed(3)


def sample(n):
    return torch.randint(0, V, (n, 4), generator=GEN), torch.randint(0, 2, (n,), generator=GEN)


BATCHES, VAL = [sample(5) for _ in range(3)], sample(6)
ce = nn.functional.cross_entropy


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, 3, max_norm=1.0)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.emb(x).mean(1)))


def make():
    torch.manual_seed(1)
    model = Net().double()
    with torch.no_grad():
        model.emb.weight.mul_(3)  # rows above max_norm
    return model


def train_loss(m, h, b):
    return ce(m(b[0]), b[1]) + 0.5 * h["decay"] * sum((p**2).sum() for p in m.parameters())


def val_loss(m, h, b):
    return ce(m(b[0]), b[1])


def train(method=None, decay=0.05):
    model = make()
    inner = torch.optim.SGD(model.parameters(), lr=0.3)
    h = {"decay": torch.tensor(decay, dtype=DT)}
    hopt = None
    if method is not None:
        hopt = hg.HyperOptimizer(
            model,
            h,
            inner_optimizer=inner,
            outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.0),
            train_loss=train_loss,
            val_loss=val_loss,
            val_data=VAL,
            method=method,
            inner_steps=len(BATCHES),
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)  # not at a minimum
        for b in BATCHES:
            inner.zero_grad()
            train_loss(model, h, b).backward()
            if hopt is None:
                inner.step()
            else:
                hopt.step(b)
    return model, hopt


def dense_implicit(model):
    """The implicit formula at the trained weights, dense Hessian, float64."""
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    names, shapes = list(params), [v.shape for v in params.values()]
    flat = torch.cat([v.flatten() for v in params.values()])

    def unflat(f):  # copies: the renormalization must not touch f
        out, i = {}, 0
        for k, s in zip(names, shapes):
            out[k] = f[i : i + s.numel()].view(s).clone()
            i += s.numel()
        return out

    def inner(f, d):
        p = unflat(f)
        out = functional_call(model, p, (BATCHES[-1][0],))
        return ce(out, BATCHES[-1][1]) + 0.5 * d * sum((v**2).sum() for v in p.values())

    def outer(f):
        return ce(functional_call(model, unflat(f), (VAL[0],)), VAL[1])

    d0 = torch.tensor(0.05, dtype=DT)
    hess = torch.autograd.functional.hessian(lambda f: inner(f, d0), flat)
    fr, dr = flat.clone().requires_grad_(), d0.clone().requires_grad_()
    x = torch.linalg.solve(hess, torch.autograd.grad(outer(fr), fr)[0])
    g = torch.autograd.grad(inner(fr, dr), fr, create_graph=True)[0]
    return float(-torch.autograd.grad(g @ x, dr)[0])


@pytest.mark.parametrize(
    "method",
    [lambda: hg.Implicit(hg.Exact()), lambda: hg.IFT(), lambda: hg.HOAG()],
    ids=["exact", "ift", "hoag"],
)
def test_implicit_hyper_steps_run_and_leave_training_alone(method):
    model, hopt = train(method())  # before: RuntimeError (modified by an inplace operation)
    assert hopt.hyper_steps == 1
    plain, _ = train()
    for key, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_the_exact_hypergradient_is_the_dense_formula_s():
    model, hopt = train(hg.Implicit(hg.Exact()))
    got, want = float(hopt.history[-1].hypergrad["decay"]), dense_implicit(model)
    assert abs(got - want) < 1e-10 * abs(want)


def test_unrolled_is_still_the_run_s_derivative():
    _, hopt = train(hg.Unrolled())

    def run(decay):
        model, _ = train(decay=decay)
        return float(val_loss(model, None, VAL).detach())

    eps = 1e-6
    fd = (run(0.05 + eps) - run(0.05 - eps)) / (2 * eps)
    assert abs(float(hopt.history[-1].hypergrad["decay"]) - fd) < 1e-8
