"""Adversarial checks of the Lightning callback (third round): hyperparameters declared as
plain numbers.

A float, a list or a NumPy array returned by ``hyperparameters_to_tune()`` (or passed as
``hparams=``) crashed in ``on_fit_start`` with ``AttributeError: 'float' object has no
attribute 'device'``; it is refused with an ``ArgumentTypeError`` naming the entry and the
fix, before the Trainer takes a step (the weights are the initial ones)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hypergradient as hg

L = pytest.importorskip("lightning.pytorch")
from test_integrations_lightning import LogReg, callback, loader, trainer  # noqa: E402


@pytest.mark.parametrize(
    "value", [0.01, [0.01] * 5, np.full(5, 0.01)], ids=["float", "list", "ndarray"]
)
def test_a_number_declared_as_a_hyperparameter_is_refused_before_training(value):
    class Declared(LogReg):
        def hyperparameters_to_tune(self):
            return {"decay": value}

    module = Declared()
    before = module.linear.weight.detach().clone()
    with pytest.raises(hg.ArgumentTypeError, match=r"\['decay'\].*tensor or a Constraint"):
        trainer(max_steps=3, callbacks=[callback()]).fit(module, loader())
    assert torch.equal(module.linear.weight, before)


def test_the_hparams_argument_is_checked_at_construction():
    with pytest.raises(hg.ArgumentTypeError, match=r"hparams\['decay'\]"):
        callback(hparams={"decay": 0.01})
    with pytest.raises(hg.ArgumentTypeError, match="`hparams` must be a dict"):
        callback(hparams=[torch.ones(3)])
