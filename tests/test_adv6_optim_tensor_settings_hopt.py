"""An inner optimizer built with tensor settings (``Adam(lr=torch.tensor(...), betas=(tensor,
tensor))``, as torch allows) under a trajectory method (adversarial probe, round 6). The
replayed twin kept the torch optimizer's own tensors as its settings, and the replay warned
at every hyper-step "The optimizer's `lr` is a tensor that is not one of the leaves of
`hparams`, so it is treated as a constant. To tune it, pass the very tensor ..." although
nothing asked to tune it. They are now read as numbers at the window's start (a change
inside the window is still noticed); the hypergradient is that of the same run with float
settings of the same values."""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

DT = torch.float64
G = torch.Generator().manual_seed(0)
X, Y = torch.randn(40, 4, generator=G, dtype=DT), torch.randn(40, generator=G, dtype=DT)


def _loss(m, h, b):
    return 0.5 * ((m(b[0]).reshape(-1) - b[1]) ** 2).mean() + 0.5 * h["lam"] * (m.weight**2).sum()


def _run(method, **settings):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).double()
    hopt = hg.HyperOptimizer(
        model,
        {"lam": torch.tensor(0.3, dtype=DT)},
        inner_optimizer=torch.optim.Adam(model.parameters(), **settings),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=1.0),
        train_loss=_loss,
        val_loss=_loss,
        val_data=(X, Y),
        method=method,
        inner_steps=3,
    )
    for i in range(6):
        batch = (X[i * 5 : i * 5 + 5], Y[i * 5 : i * 5 + 5])
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        hopt.step(batch)
    return [r.hypergrad_norm for r in hopt.history]


@pytest.mark.parametrize("method", [hg.Unrolled(), hg.ForwardMode()], ids=["unrolled", "forward"])
def test_tensor_settings_of_the_inner_optimizer_replay_as_numbers_without_warnings(method):
    lr, b1, b2 = torch.tensor(0.05), torch.tensor(0.8), torch.tensor(0.99)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)
        got = _run(method, lr=lr, betas=(b1, b2))
    ref = _run(method, lr=float(lr), betas=(float(b1), float(b2)))
    # the first window starts from the same model: the same numbers; later ones start where
    # torch's own float32 arithmetic with a float32 tensor lr took the model (1e-7 apart)
    assert len(got) == 2 and got[0] == ref[0]
    assert got[1] == pytest.approx(ref[1], rel=1e-5)
