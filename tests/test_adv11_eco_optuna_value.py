"""Adversarial checks of ``add_refined_trial`` (round 11): its ``value`` was ``float(value)``.

A bool (``True``) and a string (``"0.5"``) were told to the study as the losses 1.0 and 0.5;
``None``, a list or a tensor of two elements raised ``float()``'s own errors, which do not
name the argument. They are now refused naming ``value``, before the study changes; a 0-d
tensor and a NumPy scalar are still taken, as their exact values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hypergradient as hg

optuna = pytest.importorskip("optuna")
from hypergradient.integrations.optuna import add_refined_trial  # noqa: E402


def _study():
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study()
    trial = study.ask()
    trial.suggest_float("lr", 1e-3, 1.0, log=True)
    study.tell(trial, 1.0)
    return study, study.trials[0]


@pytest.mark.parametrize("bad", [True, "0.5", None, [0.3], torch.tensor([0.1, 0.2])])
def test_a_value_that_is_not_a_real_number_is_refused_naming_it(bad):
    study, source = _study()
    with pytest.raises(hg.ArgumentTypeError, match=r"`value` must be a (real )?number"):
        add_refined_trial(study, {"lr": 0.1}, bad, source)
    assert len(study.trials) == 1


def test_numeric_values_of_other_types_are_told_exactly():
    study, source = _study()
    for value in (np.float32(0.25), torch.tensor(0.2, dtype=torch.float64), 3):
        add_refined_trial(study, {"lr": 0.1}, value, source)
    assert [t.value for t in study.trials[1:]] == [0.25, 0.2, 3.0]
    assert [t.params["lr"] for t in study.trials[1:]] == [0.1] * 3


@pytest.mark.parametrize("bad", [hg.Positive(torch.tensor(0.2)), "0.3", None])
def test_a_worse_report_with_a_bad_hyperparameter_is_refused_before_the_trial_changes(bad):
    """TrialReporter.report checked ``hparams``' values only for a new best: a worse report
    with a Constraint, a string or None as a value was reported to the trial and counted."""
    from hypergradient.integrations.optuna import TrialReporter

    study, _ = _study()
    trial = study.ask()
    reporter = TrialReporter(trial)
    reporter.report(1.0, {"decay": torch.tensor(0.1, dtype=torch.float64)})
    with pytest.raises(hg.ArgumentTypeError, match=r"hparams\['decay'\] must be a tensor"):
        reporter.report(2.0, {"decay": bad})
    frozen = study._storage.get_trial(trial._trial_id)
    assert frozen.intermediate_values == {0: 1.0} and reporter.steps == 1
    assert reporter.best_value == 1.0 and reporter.best_hparams["decay"].item() == 0.1
    reporter.report(3.0, {"decay": torch.tensor(0.5)})  # worse, well formed: reported
    assert study._storage.get_trial(trial._trial_id).intermediate_values == {0: 1.0, 1: 3.0}
    assert reporter.best_hparams["decay"].item() == 0.1
