"""Adversarial checks of the Optuna integration as client code meets it: a refinement too
short to reach a hyper-step, values that are not numbers, a Polisher told a hypergradient
of another shape or dtype, refined points that diverged.

References: the hyper-optimizer's own records, a Polisher run fed the exact float64
hypergradient, and the study left as it was."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import hypergradient as hg
from test_holdout import HOLD
from test_hyperoptimizer_support import DT, batches, build

optuna = pytest.importorskip("optuna")
from hypergradient.integrations.optuna import (  # noqa: E402
    Polisher,
    TrialReporter,
    add_refined_trial,
    refine,
    refined_hparams,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_refine_refuses_a_run_that_never_reaches_a_hyper_step():
    """4 batches, inner_steps=10: no hyper-step, nothing reported, and every trial was
    pruned ("no finite value was reported") as if the sampled setting had diverged."""
    study = optuna.create_study()
    _, hopt = build(inner_steps=10)
    with pytest.raises(ValueError, match="would take none.*inner_steps=10"):
        refine(study.ask(), hopt, batches(4))
    assert hopt.loop.count == 0 and hopt.hyper_steps == 0  # refused before training
    # 3 epochs of 4 batches reach step 10: hyper-step 1 is reported (its exact record)
    trial = study.ask()
    value = refine(trial, hopt, batches(4), epochs=3)
    study.tell(trial, value)
    (record,) = hopt.history
    assert value == record.val_loss and study.trials[-1].intermediate_values == {1: value}
    # a guard that stopped the hyper-steps: none can be reported
    _, guarded = build(inner_steps=2, holdout_data=HOLD, outer_lr=0.3, patience=2)
    warnings.simplefilter("ignore", hg.HypergradientWarning)
    refine(study.ask(), guarded, batches(20))
    assert guarded.stopped
    count = guarded.loop.count
    with pytest.raises(ValueError, match="holdout guard: True"):
        refine(study.ask(), guarded, batches(20))
    assert guarded.loop.count == count
    # a generator has no length: the run is checked after it
    _, hopt = build(inner_steps=10)
    with pytest.raises(ValueError, match="no hyper-step was due.*inner_steps=10, 4 steps"):
        refine(study.ask(), hopt, (b for b in batches(4)))
    # with a score, the epochs are reported whatever the hyper-steps
    assert refine(study.ask(), guarded, batches(2), score=lambda: 0.5) == 0.5


def test_values_that_are_not_numbers_are_refused_naming_them():
    """report("abc") raised ValueError: could not convert string to float; a score
    function that forgot its return raised TypeError: float() argument must be ... not
    'NoneType', after an epoch of training, naming neither."""
    study = optuna.create_study()
    reporter = TrialReporter(study.ask())
    for bad in ("abc", None, torch.ones(2)):
        with pytest.raises(hg.ArgumentTypeError, match="`value`"):
            reporter.report(bad)
    assert reporter.steps == 0 and reporter.best_value == math.inf
    reporter.report(np.float32(0.5))
    reporter.report(torch.tensor(0.25, dtype=DT, requires_grad=True))
    assert reporter.best_value == 0.25 and reporter.steps == 2
    _, hopt = build(inner_steps=2)
    with pytest.raises(hg.ArgumentTypeError, match=r"`score\(\)`.*NoneType"):
        refine(study.ask(), hopt, batches(2), score=lambda: None)
    # hopt.raw_hparams() (a list) for hparams: AttributeError: 'list' has no 'items'
    with pytest.raises(hg.ArgumentTypeError, match="`hparams` must map names"):
        reporter.report(0.125, hopt.raw_hparams())
    assert reporter.best_value == 0.25 and reporter.steps == 2
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    study.tell(trial, 1.0)
    with pytest.raises(hg.ArgumentTypeError, match="`params` must map names"):
        add_refined_trial(study, [0.5], 0.25, study.trials[-1])  # was: "names [0.5]"
    assert len(study.trials) == 3  # the reporter's, the refine's, this one


def _quadratic():
    a = torch.tensor([1.0, 4.0, 9.0], dtype=DT)
    c = torch.tensor([0.3, -0.2, 0.5], dtype=DT)
    return (lambda x: float(0.5 * (a * (x - c) ** 2).sum())), (lambda x: a * (x - c))


def _polish(polisher, f, grad, x0):
    polisher.start(x0, f(x0), grad(x0))
    path = []
    while (x := polisher.ask()) is not None:
        path.append((x, polisher.tell(f(x), lambda x=x: grad(x))))
    return path


def test_a_float32_hypergradient_of_a_float64_point_is_polished_as_its_float64_value():
    """Optuna's floats make a float64 x; a float32 model gives a float32 hypergradient: the
    first tell crashed with RuntimeError: dot : expected both vectors to have same dtype."""
    f, grad = _quadratic()
    g32 = lambda x: grad(x).float()  # noqa: E731
    got = Polisher(-1.0, 1.0, memory=3)
    path = _polish(got, f, g32, torch.zeros(3, dtype=DT))
    ref = Polisher(-1.0, 1.0, memory=3)
    want = _polish(ref, f, lambda x: g32(x).double(), torch.zeros(3, dtype=DT))
    assert len(path) == len(want) > 3
    assert all(torch.equal(a, b) and s == t for (a, s), (b, t) in zip(path, want))
    assert got.x.dtype == DT and got.value == ref.value < 1e-6
    with pytest.raises(hg.ArgumentTypeError, match="`x` must be a floating-point"):
        Polisher(-5.0, 5.0).start(torch.tensor([2, 3]), 13.0, torch.tensor([4.0, 6.0]))


def test_a_hypergradient_of_another_shape_is_refused_and_the_candidate_stays_pending():
    """A (1,)-shaped hypergradient of a (3,) point was broadcast: the step was accepted and
    the incumbent's hypergradient became shape (1,), silently."""
    f, grad = _quadratic()
    x0 = torch.zeros(3, dtype=DT)
    polisher, ref = Polisher(-1.0, 1.0), Polisher(-1.0, 1.0)
    polisher.start(x0, f(x0), grad(x0))
    ref.start(x0, f(x0), grad(x0))
    x, xr = polisher.ask(), ref.ask()
    with pytest.raises(hg.ArgumentTypeError, match=r"`grad`.*\(3,\); got \(1,\)"):
        polisher.tell(f(x), torch.ones(1, dtype=DT))
    with pytest.raises(hg.NonFiniteHypergradientError, match="grad"):
        polisher.tell(f(x), torch.full((3,), math.nan, dtype=DT))
    assert polisher.candidate is not None and polisher.accepted == polisher.rejected == 0
    assert polisher.tell(f(x), grad(x)) and ref.tell(f(xr), grad(xr))
    assert torch.equal(polisher.x, ref.x) and torch.equal(polisher.g, ref.g)
    x = polisher.ask()
    with pytest.raises(hg.ArgumentTypeError, match="`value`"):
        polisher.tell("low", grad(x))
    assert polisher.candidate is not None and polisher.accepted == 1


def test_add_refined_trial_refuses_non_finite_parameters_before_the_study_changes():
    """NaN on a stepped grid raised ValueError: cannot convert float NaN to integer, inf on
    an int one OverflowError; inf on a log-float distribution was stored as its upper
    bound (a diverged refinement recorded as a point of the space)."""
    study = optuna.create_study()
    trial = study.ask()
    trial.suggest_float("lr", 1e-3, 1.0, log=True)
    trial.suggest_float("rate", 0.0, 1.0, step=0.1)
    trial.suggest_int("width", 1, 8)
    study.tell(trial, 1.0)
    source = study.trials[0]
    for name, v in [("lr", math.inf), ("rate", math.nan), ("width", math.inf), ("lr", -math.inf)]:
        with pytest.raises(ValueError, match=rf"params\['{name}'\] must be finite"):
            add_refined_trial(study, {name: v}, 0.5, source)
    with pytest.raises(ValueError, match=r"params\['lr'\]"):
        add_refined_trial(study, {"lr": torch.tensor(math.nan)}, 0.5, source)
    assert len(study.trials) == 1
    add_refined_trial(study, {"lr": 2.0}, 0.5, source)  # finite: clipped to the bound
    assert study.trials[-1].params["lr"] == 1.0 and study.best_value == 0.5


def test_refined_values_survive_a_study_reloaded_from_storage(tmp_path):
    """Not a defect (held): the values written on a trial, NaN and inf included, read back
    from an RDB storage by a resumed study."""
    url = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(storage=url, study_name="s")
    trial = study.ask()
    reporter = TrialReporter(trial)
    values = torch.tensor([[math.nan, math.inf], [-2.5, 1e-300]], dtype=DT)
    reporter.report(1.0, {"p": values, "lr": 0.1})
    study.tell(trial, reporter.finish())
    again = optuna.load_study(study_name="s", storage=url).best_trial
    got = refined_hparams(again)
    assert got["p"].shape == (2, 2) and got["lr"].item() == 0.1
    assert torch.equal(got["p"].nan_to_num(7.0), values.nan_to_num(7.0))


def test_a_report_the_trial_refuses_changes_nothing():
    """After ``study.tell``, Optuna refuses the report (UpdateFinishedTrialError), but the
    reporter had already taken the value as its best and counted the step."""
    study = optuna.create_study()
    trial = study.ask()
    reporter = TrialReporter(trial)
    reporter.report(0.5, {"p": torch.ones(1, dtype=DT)})
    study.tell(trial, reporter.finish())
    with pytest.raises(RuntimeError, match="already finished"):
        reporter.report(0.125, {"p": torch.zeros(1, dtype=DT)})
    assert reporter.best_value == 0.5 and reporter.steps == 1 and reporter.best_step == 0
    assert torch.equal(reporter.best_hparams["p"], torch.ones(1, dtype=DT))


def test_a_start_outside_the_box_is_refused_and_a_rounding_error_is_clamped():
    """x0 = 2.5 in [-1, 1] was clamped to 1 but kept f(2.5) = 0.25 as the incumbent's value:
    the polisher reported (1.0, 0.25) where f(1.0) = 4.0 (and every true step was rejected
    against that value)."""
    f = lambda x: float(((x - 3.0) ** 2).sum())  # noqa: E731
    g = lambda x: 2 * (x - 3.0)  # noqa: E731
    polisher = Polisher(-1.0, 1.0)
    inside = torch.tensor([0.5], dtype=DT)
    polisher.start(inside, f(inside), g(inside))
    for bad in (torch.tensor([2.5], dtype=DT), torch.tensor([math.nan], dtype=DT)):
        with pytest.raises(ValueError, match="`x` must be a finite point inside the box"):
            polisher.start(bad, 0.25, g(bad).nan_to_num(1.0))
    assert torch.equal(polisher.x, inside) and polisher.value == f(inside)  # unchanged
    # a bound's log computed another way (1 ulp beyond): clamped onto the bound
    lo = math.log(1e-4)
    x = torch.tensor([math.nextafter(lo, -math.inf), 0.0], dtype=DT)
    polisher = Polisher(lo, 1.0)
    polisher.start(x, f(x), g(x))
    assert polisher.x[0].item() == lo and polisher.x[1].item() == 0.0


def test_refined_hparams_of_an_added_trial_points_to_its_params():
    """The best trial of a polished study is often one add_refined_trial added: asking it
    for refined_hparams said only "report through refine or TrialReporter"."""
    study = optuna.create_study()
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    study.tell(trial, 1.0)
    add_refined_trial(study, {"x": 0.25}, 0.5, study.trials[0])
    with pytest.raises(ValueError, match=r"add_refined_trial: its values are trial\.params"):
        refined_hparams(study.best_trial)
    assert study.best_trial.params == {"x": 0.25}
