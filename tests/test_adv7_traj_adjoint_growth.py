"""A bounded but unstable (chaotic) inner run: the adjoint's growth is reported.

Adam with ``beta1 = 0`` at lr 0.3 for 200 steps of a tanh MLP: the training loss ends below
its start (no loss rule fires), but the reverse pass's adjoint grows ~3e9-fold and the
hypergradient in lr is ~-2e9, while central differences of the validation loss with steps
1e-3 and 1e-6 give ~92 and ~9e4: a number that holds for no usable change of lr. It was
returned with ``status == "fixed_budget"`` and no warning; now ``status == "diverged"``,
``stats["diverging"]`` and a ``HypergradientWarning`` say so (Unrolled, DrMAD; ForwardMode
by its probe tangent since). Healthy runs (the same net, Adam with ``beta1 = 0.9``, SGD at the
edge of stability) are not flagged.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg
from hypergradient.methods.growth import ADJOINT_GROWTH

DT = torch.float64
GEN = torch.Generator().manual_seed(0)
X = torch.randn(64, 5, generator=GEN, dtype=DT)
Y = torch.sin(X.sum(1, keepdim=True))
XV = torch.randn(32, 5, generator=GEN, dtype=DT)
YV = torch.sin(XV.sum(1, keepdim=True))
P0 = {
    "w1": torch.randn(5, 16, generator=GEN, dtype=DT) * 0.7,
    "b1": torch.zeros(16, dtype=DT),
    "w2": torch.randn(16, 1, generator=GEN, dtype=DT) * 0.3,
}


def net(p, x):
    return torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def inner(p, h):
    return ((net(p, X) - Y) ** 2).mean()


def outer(p, h):
    return ((net(p, XV) - YV) ** 2).mean()


def plain(lr, steps, beta1):
    """The validation loss after ``steps`` Adam steps, by hand (no library method)."""
    opt = hg.optim.adam(lr=lr, betas=(beta1, 0.999))
    p = [v.clone() for v in P0.values()]
    s = opt.init(p)
    for t in range(steps):
        leaves = [q.requires_grad_(True) for q in p]
        g = torch.autograd.grad(inner(dict(zip(P0, leaves)), None), leaves)
        p, s = opt.update([q.detach() for q in p], list(g), s, t)
    return float(outer(dict(zip(P0, p)), None))


def call(method, lr, steps, beta1):
    h = {"lr": torch.tensor(lr, dtype=DT)}
    opt = hg.optim.adam(lr=h["lr"], betas=(beta1, 0.999))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g, info = method(inner, outer, P0, h, steps, opt, return_info=True)
    unstable = [w for w in caught if "of no use" in str(w.message)]
    return float(g["lr"]), info, unstable


METHODS = {
    "unrolled": hg.unrolled,
    "drmad_exact": lambda *a, **k: hg.drmad(*a, anchors=199, max_deviation=None, **k),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_chaotic_run_is_reported(name):
    got, info, unstable = call(METHODS[name], 0.3, 200, 0.0)
    losses = info.inner_losses
    assert losses[-1] < losses[0]  # the loss did not diverge
    assert abs(got) > 1e8  # the exact derivative of this run
    fd = (plain(0.3 + 1e-3, 200, 0.0) - plain(0.3 - 1e-3, 200, 0.0)) / 2e-3
    assert abs(fd) < 1e3  # ... which no usable change of lr shows
    assert info.status == hg.Status.DIVERGED and info.stats["unstable"]
    assert info.stats["adjoint_growth"] >= ADJOINT_GROWTH
    assert "adjoint grew" in info.stats["diverging"]
    assert len(unstable) == 1 and "truncate" in str(unstable[0].message)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_healthy_run_is_not_flagged_and_is_exact(name):
    got, info, unstable = call(METHODS[name], 0.1, 50, 0.9)
    eps = 1e-6
    fd = (plain(0.1 + eps, 50, 0.9) - plain(0.1 - eps, 50, 0.9)) / (2 * eps)
    assert got == pytest.approx(fd, rel=1e-6)
    assert info.status == hg.Status.FIXED_BUDGET and not unstable
    assert 0.1 <= info.stats["adjoint_growth"] < 100


def edge(anchors=None):
    h = {"lr": torch.tensor(0.44, dtype=DT)}  # 1.4 * 2 / lambda_max at the start
    opt = hg.optim.sgd(lr=h["lr"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if anchors is None:
            g, info = hg.unrolled(inner, outer, P0, h, 200, opt, return_info=True)
        else:
            g, info = hg.drmad(inner, outer, P0, h, 200, opt, anchors=anchors, return_info=True)
    return float(g["lr"]), info, [w for w in caught if "of no use" in str(w.message)]


def test_sgd_at_the_edge_of_stability_is_not_flagged():
    exact, info, unstable = edge()
    assert info.status == hg.Status.FIXED_BUDGET and not unstable
    assert edge(anchors=199)[0] == pytest.approx(exact, rel=1e-9)


def test_drmads_straight_line_far_from_that_run_is_flagged():
    exact, _, _ = edge()
    got, info, unstable = edge(anchors=0)
    assert abs(got) > 1e6 * abs(exact)  # 2e27 against 4.8: the recursion on the line blew up
    assert info.status == hg.Status.DIVERGED and len(unstable) == 1
    assert "anchors" in str(unstable[0].message)
