"""A transformer's losses under ``torch.autocast(bfloat16)`` through ``hg.unrolled``.

The fused CPU attention kernel has no double backward, so ``hvp="auto"`` re-evaluates the
reverse steps with the math kernel. The reverse sweep compares each re-evaluated loss with
the forward sweep's at ``max(1e-4, 16 eps)`` of the loss's dtype (float32); under bfloat16
autocast the two kernels' rounding moved the loss by 3.7e-4, and every call warned "the
hypergradient is that of another run", for a hypergradient within 3e-3 of central
differences of the float64 run. Re-evaluations in other kernels are now held to twice
bfloat16's unit roundoff; a private generator's masks still warn (test_adv4_nets_generator).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hypergradient as hg

GEN = torch.Generator().manual_seed(0)
X, Y = torch.randn(8, 5, 4, generator=GEN), torch.randint(0, 3, (8,), generator=GEN)
XV, YV = torch.randn(10, 5, 4, generator=GEN), torch.randint(0, 3, (10,), generator=GEN)
STEPS, LR = 3, 0.1


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.body(x).mean(1))


torch.manual_seed(0)
NET = Net()


def losses(dtype, autocast):
    net = Net().to(dtype)
    net.load_state_dict(NET.state_dict())

    def logits(p, x):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return functional_call(net, p, (x.to(dtype),)).to(dtype)

    def inner(p, h):
        decay = sum((h * (v**2).sum()) for v in p.values())
        return nn.functional.cross_entropy(logits(p, X), Y) + 0.5 * decay

    def outer(p, h):
        return nn.functional.cross_entropy(logits(p, XV), YV)

    p0 = {k: v.detach().to(dtype) for k, v in NET.named_parameters()}
    return inner, outer, p0


def float64_reference():
    """Central difference of the float64 run (no autocast) in the decay."""
    inner, outer, p0 = losses(torch.float64, autocast=False)

    def run(h):
        p = dict(p0)
        for _ in range(STEPS):
            leaves = {k: v.detach().requires_grad_(True) for k, v in p.items()}
            grads = torch.autograd.grad(inner(leaves, h), list(leaves.values()))
            p = {k: v - LR * g for (k, v), g in zip(p.items(), grads)}
        return float(outer(p, h))

    h = torch.tensor(1e-2, dtype=torch.float64)
    return (run(h + 1e-6) - run(h - 1e-6)) / 2e-6


@pytest.mark.parametrize("hvp", ["auto", "double_math"])
def test_bfloat16_autocast_transformer_no_false_alarm_and_right_number(hvp):
    inner, outer, p0 = losses(torch.float32, autocast=True)
    h = torch.tensor(1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", hg.HypergradientWarning)
        got = hg.unrolled(inner, outer, p0, h, STEPS, hg.optim.sgd(lr=LR), hvp=hvp)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "re-evaluated" in m], messages
    reference = float64_reference()
    assert abs(float(got) - reference) < 2e-2 * abs(reference)


def test_first_order_products_under_bfloat16_autocast_name_the_precision():
    """First-order products difference two gradients; under bfloat16 autocast their rounding
    swamps the difference and the kink check refuses them. The error named only kinks
    (ReLU, max-pool, abs, clamp), none of which this network has; it now names half
    precision too."""
    inner, outer, p0 = losses(torch.float32, autocast=True)
    with pytest.raises(hg.NonSmoothLossError, match="autocast"):
        hg.unrolled(
            inner, outer, p0, torch.tensor(1e-2), STEPS, hg.optim.sgd(lr=LR), hvp="first_order"
        )
