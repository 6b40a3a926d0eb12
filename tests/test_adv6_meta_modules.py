"""Adversarial review of ``hg.meta`` on attention modules.

Failed on the code before the review: ``vectorize=True`` with an ``nn.TransformerEncoderLayer``
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
