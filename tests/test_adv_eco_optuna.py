"""Adversarial checks of the Optuna integration in study set-ups the other tests do not
reach: unconstrained hyperparameters, maximizing and multi-objective studies, refined points
on integer and stepped distributions, one-pass iterators.

References: the hyper-optimizer's own records (the values each validation loss was measured
with), the values reported, and Optuna's grids."""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg
from test_hyperoptimizer_support import DT, batches, build

optuna = pytest.importorskip("optuna")
from hypergradient.integrations.optuna import (  # noqa: E402
    TrialReporter,
    add_refined_trial,
    refine,
    refined_hparams,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_refine_stores_the_unconstrained_values_the_best_loss_was_measured_with():
    """A plain tensor hyperparameter is its own raw leaf: hopt.hparams returned it, and the
    hyper-step updated it in place before the report copied it, so the trial stored the
    values *after* the best hyper-step (those of the next record), not the ones scored."""
    start = torch.full((4, 6), 0.05, dtype=DT)
    seen = {}

    def objective(trial):
        model, hopt = build(decay=start.clone(), outer_lr=0.5, inner_steps=2)
        value = refine(trial, hopt, batches(12))
        seen["history"] = [r.hparams["decay"].clone() for r in hopt.history]
        return value

    study = optuna.create_study()
    warnings.simplefilter("ignore", hg.HypergradientWarning)
    study.optimize(objective, n_trials=1)
    trial, history = study.best_trial, seen["history"]
    step = trial.user_attrs["refined_step"]  # hyper-step k was measured with record k-1's
    expected = start if step == 1 else history[step - 2]
    assert len(history) == 6 and not torch.equal(history[0], start)
    assert torch.equal(refined_hparams(trial)["decay"], expected)


def test_a_maximizing_study_keeps_the_highest_score_and_refuses_losses():
    """TrialReporter kept the lowest value whatever the study's direction: a study
    maximizing an accuracy got the worst one as the trial's value."""
    study = optuna.create_study(direction="maximize")

    def objective(trial):
        reporter = TrialReporter(trial)
        for i, v in enumerate([0.5, 0.9, 0.7]):
            reporter.report(v, {"p": torch.tensor([float(i)], dtype=DT)})
        return reporter.finish()

    study.optimize(objective, n_trials=1)
    trial = study.best_trial
    assert trial.value == 0.9 and trial.user_attrs["refined_step"] == 1
    assert torch.equal(refined_hparams(trial)["p"], torch.tensor([1.0], dtype=DT))
    _, hopt = build()
    with pytest.raises(ValueError, match="maximizes"):
        refine(study.ask(), hopt, batches(3))  # validation losses: lower is better


def test_a_multi_objective_trial_keeps_its_best_without_reporting():
    """Optuna's Trial.report raises NotImplementedError in a multi-objective study."""
    study = optuna.create_study(directions=["minimize", "minimize"])

    def objective(trial):
        reporter = TrialReporter(trial)
        for i, v in enumerate([0.5, 0.3, 0.7]):
            reporter.report(v, {"p": torch.tensor([float(i)], dtype=DT)})
        return reporter.finish(), 2.0

    study.optimize(objective, n_trials=1)
    (trial,) = study.trials
    assert trial.values == [0.3, 2.0] and trial.intermediate_values == {}
    assert torch.equal(refined_hparams(trial)["p"], torch.tensor([1.0], dtype=DT))


def test_refined_points_are_rounded_onto_integer_and_stepped_grids():
    """A refined width of 10.6, a rate of 0.3333 on a 0.1 grid: Optuna refused both
    (ValueError: not contained in the distribution); a 0-d tensor was stored as a tensor."""
    study = optuna.create_study()
    trial = study.ask()
    trial.suggest_int("width", 4, 64, log=True)
    trial.suggest_float("rate", 0.0, 1.0, step=0.1)
    trial.suggest_float("decay", 1e-5, 1e-1, log=True)
    study.tell(trial, 1.0)
    source = study.trials[0]
    add_refined_trial(
        study, {"width": 10.6, "rate": 0.3333, "decay": torch.tensor(0.01)}, 0.5, source
    )
    add_refined_trial(study, {"width": 100, "rate": -3.0}, 0.25, source)
    first, second = study.trials[1].params, study.trials[2].params
    assert first["width"] == 11 and type(first["width"]) is int
    assert first["rate"] == pytest.approx(0.3, abs=1e-12)
    assert type(first["decay"]) is float and first["decay"] == float(torch.tensor(0.01))
    assert second["width"] == 64 and second["rate"] == 0.0
    assert study.best_trial.number == 2
    with pytest.raises(hg.ArgumentTypeError, match="params\\['rate'\\]"):
        add_refined_trial(study, {"rate": "high"}, 0.5, source)
    assert len(study.trials) == 3


def test_refine_refuses_a_one_pass_iterator_for_several_epochs():
    """A generator was silently exhausted after the first epoch (the other epochs trained
    nothing)."""
    _, hopt = build()
    study = optuna.create_study()
    with pytest.raises(hg.ArgumentTypeError, match="exhausted"):
        refine(study.ask(), hopt, iter(batches(3)), epochs=2)
    assert hopt.hyper_steps == 0 and hopt.loop.count == 0  # nothing ran


def test_refine_without_a_history_says_what_it_needs():
    """history_size=0 (no record kept): refine failed with IndexError: deque index out of
    range after the first hyper-step's training."""
    _, hopt = build(history_size=0)
    study = optuna.create_study()
    with pytest.raises(ValueError, match="history_size"):
        refine(study.ask(), hopt, batches(6))
    assert hopt.loop.count == 0  # refused before training
    value = refine(study.ask(), hopt, batches(6), score=lambda: 0.25)
    assert value == 0.25 and hopt.hyper_steps == 2


def test_polisher_box_errors_name_the_bound_and_change_nothing():
    """A box of the wrong shape raised torch's RuntimeError from expand_as; an empty box
    raised after the bounds of the previous polish had been overwritten."""
    from hypergradient.integrations.optuna import Polisher

    polisher = Polisher(torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match=r"`lower` has shape \(3,\).*\(4,\)"):
        polisher.start(torch.zeros(4, dtype=DT), 1.0, torch.ones(4, dtype=DT))
    polisher.start(torch.full((3,), 0.5, dtype=DT), 1.0, torch.ones(3, dtype=DT))
    polisher.lower = 2.0  # an empty box for the next start
    with pytest.raises(ValueError, match="empty box"):
        polisher.start(torch.zeros(3, dtype=DT), 1.0, torch.ones(3, dtype=DT))
    assert torch.equal(polisher.lo, torch.zeros(3, dtype=DT))  # the running polish's box
    assert torch.equal(polisher.x, torch.full((3,), 0.5, dtype=DT))


def test_the_reporter_takes_numbers_as_hyperparameters_and_refuses_other_values_first():
    """A float in `hparams` (a learning rate reported next to tensors) raised
    AttributeError ('float' object has no attribute 'detach') after the best value had
    been replaced, leaving the values of the previous best attributed to it."""
    study = optuna.create_study()
    trial = study.ask()
    reporter = TrialReporter(trial)
    reporter.report(0.5, {"lr": 0.1, "decay": torch.ones(2, dtype=DT)})
    with pytest.raises(hg.ArgumentTypeError, match=r"hparams\['lr'\]"):
        reporter.report(0.25, {"lr": "high"})
    assert reporter.best_value == 0.5 and reporter.steps == 1
    study.tell(trial, reporter.finish())
    stored = refined_hparams(study.best_trial)
    assert stored["lr"].item() == 0.1 and torch.equal(stored["decay"], torch.ones(2, dtype=DT))


def test_a_diverging_trial_is_pruned_and_the_study_goes_on():
    """A sampled inner learning rate of 1e30 makes the run non-finite: the
    NonFiniteHypergradientError ended study.optimize (the other trials never ran)."""
    study = optuna.create_study()
    study.enqueue_trial({"lr": 1e30})

    def objective(trial):
        lr = trial.suggest_float("lr", 1e-3, 1e30, log=True)
        _, hopt = build()
        for group in hopt.inner_optimizer.param_groups:
            group["lr"] = lr
        return refine(trial, hopt, batches(12))

    warnings.simplefilter("ignore", hg.HypergradientWarning)
    study.optimize(objective, n_trials=2)
    first, second = study.trials
    assert first.state == optuna.trial.TrialState.PRUNED and "refined_step" in first.user_attrs
    assert second.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def test_a_best_reported_without_hyperparameters_does_not_inherit_the_previous_ones():
    """The values written on the trial are those the best value was measured with: a new
    best without ``hparams`` kept the previous best's values, stored under the new step."""
    study = optuna.create_study()
    trial = study.ask()
    reporter = TrialReporter(trial)
    reporter.report(0.5, {"decay": torch.ones(2, dtype=DT)})
    reporter.report(0.25)
    assert reporter.best_value == 0.25 and reporter.best_step == 1
    assert reporter.best_hparams is None
    study.tell(trial, reporter.finish())
    attrs = study.best_trial.user_attrs
    assert "refined_hparams" not in attrs and attrs["refined_step"] == 1
    reporter2 = TrialReporter(study.ask())
    reporter2.report(0.5)
    reporter2.report(0.25, {"decay": torch.zeros(2, dtype=DT)})
    assert torch.equal(reporter2.best_hparams["decay"], torch.zeros(2, dtype=DT))
