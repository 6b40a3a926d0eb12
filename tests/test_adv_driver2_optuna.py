"""``refine`` with an evaluation function written as PyTorch users write one
(``model.eval()`` first, never switched back): the loop refine runs for the user must
train every epoch in the mode it started in. It used to train the epochs after the first
score in eval mode (BatchNorm statistics frozen, dropout off). Reference: the same loop
written by hand, ``model.train()`` at each epoch's start (bit for bit)."""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg
from test_hyperoptimizer_support import VAL, batches, build, mlp, val_loss

optuna = pytest.importorskip("optuna")
from hypergradient.integrations.optuna import refine  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _evaluate(model):
    model.eval()  # an evaluation function; the caller's loop switches back
    with torch.no_grad():
        return float(val_loss(model, None, VAL))


def _run():
    model, hopt = build(model=mlp(dropout=0.3, batchnorm=True), outer_lr=0.0)
    model.train()
    return model, hopt


def test_refine_keeps_the_training_mode_across_scores():
    data = batches(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        model, hopt = _run()
        torch.manual_seed(3)
        study = optuna.create_study()
        study.optimize(
            lambda t: refine(t, hopt, data, epochs=3, score=lambda: _evaluate(model)),
            n_trials=1,
        )
        assert all(m.training for m in model.modules())
        ref_model, ref_hopt = _run()
        torch.manual_seed(3)
        scores = []
        for _ in range(3):
            ref_model.train()
            for b in data:
                ref_hopt.zero_grad()
                ref_hopt.train_loss(b).backward()
                ref_hopt.step(b)
            scores.append(_evaluate(ref_model))
    got, ref = model.state_dict(), ref_model.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert study.best_trial.intermediate_values == dict(enumerate(scores))
