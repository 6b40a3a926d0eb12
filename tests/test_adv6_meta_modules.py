"""Adversarial review of ``hg.meta`` on attention and embedding modules.

Each test failed on the code before the review (details in the tests' docstrings):
``vectorize=True`` with an ``nn.Embedding(padding_idx=...)`` returned wrong meta-gradients,
``adapt`` overwrote the caller's parameters through ``nn.Embedding(max_norm=...)``, and
``vectorize=True`` with an ``nn.TransformerEncoderLayer``
in eval mode crashed ("derivative for aten::_transformer_encoder_layer_fwd is not
implemented"): under ``vmap`` the layer's weights do not look like they require grad, so
torch took its inference fast path, which has no derivative. The vectorized meta-gradient
now equals a hand-written autograd MAML (math attention kernel), in both modes.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import hypergradient as hg
from hypergradient import meta

DT = torch.float64
mse = nn.functional.mse_loss


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(
            4, 2, dim_feedforward=8, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


def tasks_of():
    g = torch.Generator().manual_seed(1)

    def batch(n):
        return torch.randn(n, 3, 4, generator=g, dtype=DT), torch.randn(n, 1, generator=g, dtype=DT)

    return [(batch(4), batch(3)), (batch(4), batch(3))]


def by_hand(model, theta, tasks, steps, lr):
    total = {k: torch.zeros_like(v) for k, v in theta.items()}
    with sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no double backward
        for (xs, ys), (xq, yq) in tasks:
            t = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
            p = t
            for _ in range(steps):
                loss = mse(functional_call(model, p, (xs,)), ys)
                g = torch.autograd.grad(loss, list(p.values()), create_graph=True)
                p = {k: v - lr * gk for (k, v), gk in zip(p.items(), g)}
            g = torch.autograd.grad(mse(functional_call(model, p, (xq,)), yq), list(t.values()))
            for k, gk in zip(t, g):
                total[k] += gk / len(tasks)
    return total


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_vectorized_maml_through_a_transformer_layer_in_either_mode(mode):
    torch.manual_seed(0)
    model = Encoder().double()
    getattr(model, mode)()
    theta, tasks = meta.parameters_of(model, copy=True), tasks_of()
    ref = by_hand(model, theta, tasks, 2, 0.1)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's vmap fallback and the hvp fallback notes
        got, _ = meta.maml_step(model, theta, tasks, inner_steps=2, inner_lr=0.1, vectorize=True)
    assert torch.backends.mha.get_fastpath_enabled() == fastpath  # put back
    err = max(float((got[k] - ref[k]).abs().max()) for k in ref)
    assert err < 1e-13 * max(float(v.abs().max()) for v in ref.values())


class Bag(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.emb = nn.Embedding(10, 4, **kw)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.emb(x).mean(1))


def token_tasks():
    g = torch.Generator().manual_seed(0)

    def batch(n):
        x = torch.randint(0, 10, (n, 5), generator=g)
        x[:, 0] = 0  # every sequence has a padding token
        return x, torch.randn(n, 1, generator=g, dtype=DT)

    return [(batch(4), batch(3)), (batch(4), batch(3))]


def test_autograd_through_vmap_gives_a_padding_row_a_gradient():
    """The torch behaviour the refusal below guards against (if this starts failing, torch
    has fixed it and the refusal can go)."""
    w = torch.randn(2, 10, 4, dtype=DT, requires_grad=True)
    x = torch.randint(1, 10, (2, 3, 5))
    x[..., 0] = 0
    out = torch.func.vmap(lambda w, x: nn.functional.embedding(x, w, padding_idx=0).sum())(w, x)
    (g,) = torch.autograd.grad(out.sum(), w)
    assert float(g[0, 0].abs().max()) == 0.0 and float(g[1, 0].abs().max()) > 0


@pytest.mark.parametrize("first_order", [False, True])
def test_vectorize_refuses_an_embedding_with_padding_idx(first_order):
    """``vectorize=True`` returned a meta-gradient 0.04 off (second order; 0.003 first
    order), with a nonzero padding row, silently; ``vectorize=False`` is exact."""
    torch.manual_seed(0)
    model = Bag(padding_idx=0).double()
    theta, tasks = meta.parameters_of(model, copy=True), token_tasks()
    kw = dict(inner_steps=2, inner_lr=0.1, first_order=first_order)
    with pytest.raises(ValueError, match="'emb' .*padding_idx=0.*Use vectorize=False"):
        meta.maml_step(model, theta, tasks, vectorize=True, **kw)
    with pytest.raises(ValueError, match="padding_idx"):
        meta.imaml_step(model, theta, tasks, lam=1.0, inner_steps=2, inner_lr=0.1, vectorize=True)
    got, _ = meta.maml_step(model, theta, tasks, **kw)
    assert float(got["emb.weight"][0].abs().max()) == 0.0  # the padding row
    if not first_order:
        total = {k: torch.zeros_like(v) for k, v in theta.items()}
        for (xs, ys), (xq, yq) in tasks:
            t = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
            p = t
            for _ in range(2):
                g = torch.autograd.grad(
                    mse(functional_call(model, p, (xs,)), ys), list(p.values()), create_graph=True
                )
                p = {k: v - 0.1 * gk for (k, v), gk in zip(p.items(), g)}
            g = torch.autograd.grad(mse(functional_call(model, p, (xq,)), yq), list(t.values()))
            for k, gk in zip(t, g):
                total[k] += gk / 2
        assert max(float((got[k] - total[k]).abs().max()) for k in total) < 1e-14


def test_an_embedding_with_max_norm_is_flagged_and_adapt_leaves_params_alone():
    """``adapt`` renormalized the caller's ``params`` in place (max_norm runs on the
    weights it reads; 5.5 of change); MAML's meta-gradient through max_norm was 72 % off
    finite differences of the adaptation, silently."""
    torch.manual_seed(0)
    model = Bag(max_norm=1.0).double()
    with torch.no_grad():
        model.emb.weight.mul_(3)
    theta, tasks = meta.parameters_of(model, copy=True), token_tasks()
    before = {k: v.clone() for k, v in theta.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        meta.adapt(model, theta, tasks[0][0], steps=2, lr=0.1)  # the forward is torch's
    assert all(torch.equal(theta[k], before[k]) for k in theta)
    for make in (
        lambda: meta.MAML(model, inner_steps=2, inner_lr=0.1),
        lambda: meta.IMAML(model, lam=1.0, inner_steps=2, inner_lr=0.1),
    ):
        with pytest.warns(hg.HypergradientWarning, match="'emb' .*max_norm=1.0.*not exact") as w:
            make()
        assert w[0].filename == __file__
