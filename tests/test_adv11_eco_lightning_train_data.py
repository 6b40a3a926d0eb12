"""Adversarial checks of the Lightning callback (round 11): ``train_data`` was a no-op.

``HypergradientCallback(train_data=..., train_batch_size=...)`` was accepted (its docstring
listed ``train_data`` among the options passed on to the ``HyperOptimizer``), but the callback
hands every hyper-step the Trainer's batch, and a ``HyperOptimizer`` draws from
``train_data`` only for a step given no batch: a run with other training rows (scaled
inputs, flipped labels) was the run without them, bit for bit. The options are now refused
at construction, naming what the callback uses instead."""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg

pytest.importorskip("lightning.pytorch")
from hypergradient.integrations.lightning import HypergradientCallback  # noqa: E402
from test_integrations_lightning import HOLD, VAL, LogReg, callback, loader, trainer  # noqa: E402


@pytest.mark.parametrize("name", ["train_data", "train_batch_size"])
def test_train_data_which_the_callback_never_draws_from_is_refused(name):
    value = {"train_data": (HOLD[0] * 5, 1 - HOLD[1]), "train_batch_size": 7}[name]
    with pytest.raises(hg.ArgumentTypeError, match=rf"`{name}`.*Trainer's training batch"):
        HypergradientCallback(val_data=VAL, **{name: value})


def test_the_options_still_passed_on_reach_the_hyper_optimizer():
    """Held: ``seed`` and ``history_size`` reach it (the run is the documented loop's)."""
    module, cb = LogReg(), callback(seed=3, history_size=1)
    trainer(max_steps=6, callbacks=[cb]).fit(module, loader())
    assert cb.hopt.hyper_steps == 2 and len(cb.hopt.history) == 1
    assert cb.hopt.history[0].hyper_step == 2
    assert not torch.equal(module.decay.value, torch.full((5,), 1e-2, dtype=torch.float64))
