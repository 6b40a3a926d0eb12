"""Sparse gradients (``nn.Embedding(sparse=True)``) are refused by name (adversarial round).

Torch does not differentiate through sparse gradients. Before: ``hg.implicit`` and
``hg.forward_mode`` failed with torch's internal "reshape is not implemented for sparse
tensors", and ``hg.unrolled`` returned a weight-decay hypergradient of 0.0016 where the
same model with ``sparse=False`` gives 0.066 (silently wrong). Now every method raises a
``ValueError`` naming the loss, the parameter and the fix (``sparse=False``); the dense model
is unchanged (its numbers are checked against central finite differences of the loop).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hypergradient as hg

DT = torch.float64
T, LR = 3, 0.1


def _setup(sparse: bool, decay_embedding: bool):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(10, 4, sparse=sparse), nn.Flatten(), nn.Linear(12, 1))
    net = net.to(DT)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 10, (16, 3), generator=g)
    y = torch.randn(16, 1, dtype=DT, generator=g)
    p0 = {k: v.detach().clone() for k, v in net.named_parameters()}
    decayed = [k for k in p0 if decay_embedding or not k.startswith("0.")]

    def inner(p, h, batch=None):
        reg = h["wd"].exp() * sum((p[k] ** 2).sum() for k in decayed)
        return ((functional_call(net, p, (idx,)) - y) ** 2).mean() + reg

    def outer(p, h):
        return ((functional_call(net, p, (idx[:8],)) - y[:8]) ** 2).mean()

    return inner, outer, p0


H = {"wd": torch.tensor(-2.0, dtype=DT)}
CALLS = {
    "implicit": lambda i, o, p: hg.implicit(i, o, p, H, solver=hg.CG(maxiter=5)),
    "implicit_first_order": lambda i, o, p: hg.implicit(i, o, p, H, hvp="first_order"),
    "unrolled": lambda i, o, p: hg.unrolled(i, o, p, H, T, hg.optim.sgd(LR)),
    "forward_mode": lambda i, o, p: hg.forward_mode(i, o, p, H, T, hg.optim.sgd(LR)),
    "drmad": lambda i, o, p: hg.drmad(i, o, p, H, T, hg.optim.sgd(LR)),
}


@pytest.mark.parametrize("decay_embedding", [True, False], ids=["outer_sparse", "both_sparse"])
@pytest.mark.parametrize("name", list(CALLS))
def test_sparse_embedding_is_refused_by_name(name, decay_embedding):
    inner, outer, p0 = _setup(True, decay_embedding)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        with pytest.raises(
            ValueError, match=r"(\['0.weight'\] is a sparse tensor|has a sparse part)"
        ) as err:
            CALLS[name](inner, outer, p0)
    assert "sparse=False" in str(err.value)


def _loop_outer(inner, outer, p0, wd: float) -> float:
    p = dict(p0)
    h = {"wd": torch.tensor(wd, dtype=DT)}
    for _ in range(T):
        leaves = {k: v.detach().requires_grad_(True) for k, v in p.items()}
        grads = torch.autograd.grad(inner(leaves, h), list(leaves.values()))
        p = {k: v.detach() - LR * gk for (k, v), gk in zip(leaves.items(), grads)}
    return float(outer(p, h))


@pytest.mark.parametrize("name", ["unrolled", "forward_mode"])
def test_dense_embedding_matches_finite_differences(name):
    inner, outer, p0 = _setup(False, True)
    out = CALLS[name](inner, outer, p0)
    eps = 1e-6
    fd = (_loop_outer(inner, outer, p0, -2.0 + eps) - _loop_outer(inner, outer, p0, -2.0 - eps)) / (
        2 * eps
    )
    assert float(out["wd"]) == pytest.approx(fd, rel=1e-6)
