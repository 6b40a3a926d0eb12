"""``from_torch`` of an ``AdamW`` whose param groups have no ``decoupled_weight_decay`` key
(adversarial probe, round 6). torch 2.1-2.5 (the project supports ``torch>=2.1``) implement
``AdamW`` as its own class whose groups have no such key; the twin read the missing key as
False and replayed AdamW as Adam with an L2 term: with the default ``weight_decay=0.01`` its
parameters left torch's at the first step. Simulated here by deleting the key (torch 2.6+
always has it)."""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg

DT = torch.float64


def _loss(w: torch.Tensor, t: int) -> torch.Tensor:
    return ((w - 1.0) ** 2 * torch.arange(1, 4, dtype=DT)).sum() + 0.3 * t * w.sum()


@pytest.mark.parametrize(
    ("cls", "decoupled"), [(torch.optim.AdamW, True), (torch.optim.Adam, False)]
)
def test_a_group_without_the_decoupled_key_keeps_the_optimizers_own_rule(cls, decoupled):
    w = torch.tensor([0.5, -2.0, 3.0], dtype=DT, requires_grad=True)
    ref = cls([w], lr=0.1, weight_decay=0.5)
    old = cls([torch.zeros(3, dtype=DT, requires_grad=True)], lr=0.1, weight_decay=0.5)
    old.param_groups[0]["params"] = [w]  # the same parameter, groups as torch < 2.6 has them
    del old.param_groups[0]["decoupled_weight_decay"]
    fopt, state, step0 = hg.optim.from_torch(old, [w])
    assert fopt.decoupled is decoupled and state is None and step0 == 0
    ps, state = [w.detach().clone()], fopt.init([w])
    for t in range(5):
        ref.zero_grad()
        _loss(w, t).backward()
        ref.step()
        q = ps[0].clone().requires_grad_()
        (g,) = torch.autograd.grad(_loss(q, t), q)
        ps, state = fopt.update(ps, [g], state, t)
    torch.testing.assert_close(ps[0], w.detach(), rtol=1e-14, atol=1e-14)
