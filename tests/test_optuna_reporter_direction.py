"""``TrialReporter(direction=...)``: which reported value is the best, where the study cannot
say (a multi-objective study) or where the caller reports another quantity than the study's
objective. Reference: the highest (or lowest) of the reported values, by hand."""

from __future__ import annotations

import pytest
import torch

optuna = pytest.importorskip("optuna")
from hypergradient.integrations.optuna import TrialReporter  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)
VALUES = [0.6, 0.9, 0.7]


def best(study, **kw):
    trial = study.ask()
    reporter = TrialReporter(trial, **kw)
    for step, v in enumerate(VALUES):
        reporter.report(v, {"x": torch.tensor([v], dtype=torch.float64)}, step)
    return reporter.finish(), trial.user_attrs


def test_multi_objective_study_keeps_the_highest_with_direction_maximize():
    study = optuna.create_study(directions=["maximize", "minimize"])
    value, attrs = best(study, direction="maximize")
    assert value == max(VALUES) and attrs["refined_step"] == 1
    assert attrs["refined_hparams"]["x"]["values"] == [max(VALUES)]
    assert best(study)[0] == min(VALUES)  # the documented default: lowest best


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_direction_overrides_the_study_s(direction):
    study = optuna.create_study(direction="maximize")
    expected = max(VALUES) if direction == "maximize" else min(VALUES)
    assert best(study, direction=direction)[0] == expected
    assert best(study)[0] == max(VALUES)  # the study's own direction


def test_a_bad_direction_is_named():
    study = optuna.create_study()
    with pytest.raises(ValueError, match="direction"):
        TrialReporter(study.ask(), direction="up")
