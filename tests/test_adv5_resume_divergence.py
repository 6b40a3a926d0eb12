"""A run resumed inside the last steps of a window takes the same divergence decision as
the uninterrupted run: the checkpoint holds the training losses the divergence watch
recorded, not only the parameter norms. Before, a run diverging by the loss rule
(gradient descent at |1 - lr lambda_max| = 1.5: the loss grows 2.25x per step, the norm
less than 2x) with ``on_divergence="skip"`` skipped its hyper-step uninterrupted but
applied the diverged hypergradient, without a warning, once resumed."""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg
from test_hyperoptimizer_support import (
    DT,
    VAL,
    assert_same,
    batches,
    everything,
    roundtrip,
    run,
)

BATCH = batches(1)[0]
STEPS = [BATCH] * 8


def _lr():
    x = torch.cat([BATCH[0], torch.ones(len(BATCH[0]), 1, dtype=DT)], 1)
    lmax = float(torch.linalg.eigvalsh(2 * x.T @ x / len(x)).max())
    return 2.5 / lmax  # |1 - lr lambda_max| = 1.5


def _loss(m, h, batch):
    x, y = batch
    return ((m(x).reshape(-1) - y) ** 2).mean() + 0.5 * (h["decay"] * m.weight**2).sum()


def _val(m, h, batch):
    x, y = batch
    return ((m(x).reshape(-1) - y) ** 2).mean()


def _build():
    torch.manual_seed(0)
    model = torch.nn.Linear(BATCH[0].shape[1], 1).double()
    hopt = hg.HyperOptimizer(
        model,
        {"decay": hg.Positive(torch.full((1, BATCH[0].shape[1]), 1e-2, dtype=DT))},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=_lr()),
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.05),
        train_loss=_loss,
        val_loss=_val,
        val_data=VAL,
        val_batch_size=16,
        inner_steps=4,
        method=hg.IFT(hg.CG(maxiter=3), damping=1.0),
        on_divergence="skip",
    )
    return model, hopt


@pytest.mark.parametrize("cut", [5, 6, 7])
def test_resumed_run_skips_the_diverged_hyper_step_as_the_uninterrupted_run(cut):
    warnings.simplefilter("ignore", hg.HypergradientWarning)
    model, hopt = _build()
    run(hopt, STEPS)
    assert (hopt.hyper_steps, hopt.skipped) == (1, 1)  # the second window diverged
    expected = everything(model, hopt)

    model, hopt = _build()
    run(hopt, STEPS[:cut])
    saved_model, saved = roundtrip(model.state_dict()), roundtrip(hopt.state_dict())
    model2, hopt2 = _build()
    model2.load_state_dict(saved_model)
    hopt2.load_state_dict(saved)
    with pytest.warns(hg.HypergradientWarning, match="diverg"):
        run(hopt2, STEPS[cut:])
    assert (hopt2.hyper_steps, hopt2.skipped) == (1, 1)
    got = everything(model2, hopt2)
    got["grads"] = expected["grads"] = None
    assert_same(expected, got)


def test_a_checkpoint_without_losses_still_loads_and_bad_losses_are_refused():
    model, hopt = _build()
    run(hopt, STEPS[:6])
    state = roundtrip(hopt.state_dict())
    assert len(state["watch"]["losses"]) == len(state["watch"]["norms"]) > 0
    old = {**state, "watch": {"norms": state["watch"]["norms"]}}
    bad = {**state, "watch": {**state["watch"], "losses": [torch.ones(2)]}}
    model2, hopt2 = _build()
    before = everything(model2, hopt2)
    with pytest.raises(ValueError, match="watch"):
        hopt2.load_state_dict(bad)
    assert_same(before, everything(model2, hopt2))
    hopt2.load_state_dict(old)
    assert hopt2.loop.losses == ()
