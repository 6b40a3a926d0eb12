"""T1T2 with a ``torch.compile``'d model crashed at every hyper-step whose step check ran the
replay's backward pass (micro-batches, a loop computing its own loss).

The check keeps the replay's graph for T1T2's look-ahead (``retain_graph=True``), which a
compiled backward with donated buffers refuses ("requires create_graph=False and
retain_graph=False"); the step was rolled back and the next hyper-step failed the same way.
The check now lets that graph go and the look-ahead evaluates (and falls back) on its own.
Reference: the same loop on the uncompiled model. ``aot_eager`` is AOTAutograd without code
generation: the same backward refusal as inductor's, at a fraction of the compile time.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hypergradient as hg

G = torch.Generator().manual_seed(0)
B = [(torch.randn(32, 4, generator=G), torch.randn(32, 1, generator=G)) for _ in range(4)]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def run(compiled):
    torch.manual_seed(0)
    base = MLP()
    model = torch.compile(base, backend="aot_eager") if compiled else base
    hopt = hg.HyperOptimizer(
        model, {"wd": torch.tensor(0.01)},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.1),
        train_loss=lambda m, h, b: nn.functional.mse_loss(m(b[0]), b[1])
        + h["wd"] * sum(p.pow(2).sum() for p in m.parameters()),
        val_loss=lambda m, h, b: nn.functional.mse_loss(m(b[0]), b[1]),
        val_data=B[0], method=hg.T1T2(), inner_steps=2,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)  # (the fallback's notice)
        for batch in B:
            hopt.zero_grad()
            for half in (slice(0, 16), slice(16, 32)):  # micro-batches: the replay's pass
                (0.5 * hopt.train_loss((batch[0][half], batch[1][half]))).backward()
            hopt.step(batch)
    return [float(r.hypergrad["wd"]) for r in hopt.history]


def test_t1t2_on_a_compiled_model_with_micro_batches_is_the_eager_run():
    eager = run(False)
    got = run(True)
    assert len(got) == len(eager) == 2
    assert got == pytest.approx(eager, rel=1e-5)
