"""A correct float16 + GradScaler loop with a trajectory method warned "not the run" at every
hyper-step.

A trajectory method replays float16 steps in float32 (unscaled float16 backward passes
underflow), and the float32 replay ends a few float16 roundings from the run: 2.5e-4 to
4.3e-4 over 4 steps of lr 0.5 on the README's float16 example, above the replay check's 1e-4
(keyed on the parameters' float32). The check now also allows four units of the precision
the steps were trained in and the replay does not use (``Trajectory.rounding``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hypergradient as hg
from hypergradient.hyperoptimizer.precision import unreplayed_rounding


def run(method):
    torch.manual_seed(0)
    x, y = torch.randn(256, 8), torch.randn(256, 1)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    mse = nn.functional.mse_loss
    hopt = hg.HyperOptimizer(
        model, {"decay": hg.Positive(torch.tensor(1e-3))},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.01),
        train_loss=lambda m, h, b: mse(m(b[0]), b[1]) + h["decay"] * m[0].weight.pow(2).sum(),
        val_loss=lambda m, h, b: mse(m(b[0]), b[1]), val_data=(x[192:], y[192:]),
        method=method(), inner_steps=4,
    )  # fmt: skip
    scaler = torch.amp.GradScaler("cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(0, 192, 16):
            batch = (x[i : i + 16], y[i : i + 16])
            hopt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = hopt.train_loss(batch)
            scaler.scale(loss).backward()
            scaler.unscale_(hopt)
            scaler.step(hopt, batch)
            scaler.update()
    ours = [str(w.message) for w in caught if "differentiable replay" in str(w.message)]
    return hopt, ours


@pytest.mark.parametrize("method", [hg.Unrolled, hg.DrMAD])
def test_a_correct_float16_loop_is_not_called_another_run(method):
    hopt, ours = run(method)
    errors = [r.info.stats["replay_error"] for r in hopt.history]
    assert ours == [] and hopt.hyper_steps >= 2
    assert max(errors) > 1e-4  # above the float32 bound: the case is exercised
    assert max(errors) < 4 * torch.finfo(torch.float16).eps


def test_the_rounding_allowed_is_that_of_the_precision_the_replay_does_not_use():
    f16, bf16 = torch.finfo(torch.float16).eps, torch.finfo(torch.bfloat16).eps
    assert unreplayed_rounding(None) == 0.0 and unreplayed_rounding(()) == 0.0
    assert unreplayed_rounding((("cpu", torch.bfloat16),)) == 0.0  # replayed in bfloat16
    assert unreplayed_rounding((("cpu", torch.float16),)) == f16
    assert unreplayed_rounding((("cpu", torch.bfloat16), ("cuda", torch.float16))) == f16
    assert bf16 > f16  # (bfloat16 would allow more: it is replayed as trained instead)
