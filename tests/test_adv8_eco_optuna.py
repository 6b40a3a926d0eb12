"""Adversarial checks of the Optuna integration (round 8): a holdout score that is NaN was
reported as the validation loss, which became the trial's value."""

from __future__ import annotations

import math

import pytest

import hypergradient as hg
from test_holdout import HOLD
from test_hyperoptimizer_support import batches, build, val_loss

optuna = pytest.importorskip("optuna")
from hypergradient.integrations.optuna import TrialReporter, refine  # noqa: E402


@pytest.mark.filterwarnings("ignore::hypergradient.HypergradientWarning")
def test_a_nan_holdout_score_is_not_reported_as_the_validation_loss():
    """The holdout scores are 2.36, NaN, 3.06: refine reported the NaN step's validation
    loss (0.72) instead, and returned it as the trial's value."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    calls = []

    def holdout_loss(m, h, b):
        calls.append(1)
        value = 3.0 * val_loss(m, h, b)
        return value * math.nan if len(calls) == 2 else value

    _, hopt = build(inner_steps=2, holdout_data=HOLD, holdout_loss=holdout_loss)
    study = optuna.create_study()
    trial = study.ask()
    value = refine(trial, hopt, batches(6))
    records = list(hopt.history)
    scores = [r.holdout_loss for r in records]
    assert math.isnan(scores[1]) and all(math.isfinite(s) for s in scores[::2])
    assert value == min(scores[0], scores[2])
    reported = study._storage.get_trial(trial._trial_id).intermediate_values
    assert reported == {1: scores[0], 3: scores[2]}
    # The sink form: the caller says which loss it reports.
    reporter = TrialReporter(optuna.create_study().ask())
    reporter.log(records[1], holdout=True)
    reporter.log(records[1], holdout=False)
    assert reporter.best_value == records[1].val_loss and reporter.steps == 2
    with pytest.raises(hg.ArgumentTypeError, match="`holdout`"):
        reporter.log(records[1], holdout="yes")
