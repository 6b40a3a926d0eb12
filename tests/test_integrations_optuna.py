"""Hybrid search (``hypergradient.integrations.optuna``) with real Optuna studies.

References: the values a trial reports are the hyper-optimizer's own records (or the
scores given), and its stored refined hyperparameters are exactly the values that produced
its best value; pruning follows the study's pruner; the benchmark and the example run in
their quick modes."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import hypergradient as hg
from test_hyperoptimizer_support import DT, VAL, batches, build, val_loss

optuna = pytest.importorskip("optuna")
from hypergradient.integrations.optuna import (  # noqa: E402
    TrialReporter,
    refine,
    refined_hparams,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


class PruneFrom(optuna.pruners.BasePruner):
    """Prunes every trial once it has reported at step ``step``."""

    def __init__(self, step):
        self.step = step

    def prune(self, study, trial):
        return trial.last_step is not None and trial.last_step >= self.step


def test_the_reporter_reports_keeps_the_best_and_skips_nonfinite_values():
    values = [0.9, 0.5, float("nan"), 0.7, 0.4, 0.6]
    study = optuna.create_study()

    def objective(trial):
        reporter = TrialReporter(trial)
        for i, v in enumerate(values):
            reporter.report(v, {"phi": torch.tensor([float(i), -1.0], dtype=DT)})
        return reporter.finish()

    study.optimize(objective, n_trials=1)
    t = study.best_trial
    assert t.value == 0.4
    assert t.intermediate_values == {0: 0.9, 1: 0.5, 3: 0.7, 4: 0.4, 5: 0.6}
    assert t.user_attrs["refined_step"] == 4 and t.user_attrs["refinement_steps"] == 6
    assert torch.equal(refined_hparams(t)["phi"], torch.tensor([4.0, -1.0], dtype=DT))


def test_the_pruner_stops_a_trial_and_its_best_so_far_is_kept():
    study = optuna.create_study(pruner=PruneFrom(2))

    def objective(trial):
        reporter = TrialReporter(trial)
        for i, v in enumerate([0.8, 0.3, 0.5, 0.1]):
            reporter.report(v, {"phi": torch.full((2, 2), float(i), dtype=DT)})
        return reporter.finish()

    study.optimize(objective, n_trials=1)
    t = study.trials[0]
    assert t.state == optuna.trial.TrialState.PRUNED
    assert t.intermediate_values == {0: 0.8, 1: 0.3, 2: 0.5}  # 0.1 never reached
    assert torch.equal(refined_hparams(t)["phi"], torch.ones(2, 2, dtype=DT))
    # without pruning, the same trial runs to the end
    study = optuna.create_study(pruner=PruneFrom(2))
    study.optimize(
        lambda trial: _scripted(TrialReporter(trial, prune=False), [0.8, 0.3, 0.5, 0.1]),
        n_trials=1,
    )
    assert study.best_value == 0.1


def _scripted(reporter, values):
    for v in values:
        reporter.report(v)
    return reporter.finish()


def test_a_trial_that_never_reports_a_finite_value_is_pruned():
    study = optuna.create_study()
    study.optimize(lambda t: _scripted(TrialReporter(t), [math.inf, math.nan]), n_trials=1)
    assert study.trials[0].state == optuna.trial.TrialState.PRUNED


def test_refine_reports_each_hyper_step_and_stores_the_values_it_scored():
    study = optuna.create_study()
    seen = {}

    def objective(trial):
        decay0 = trial.suggest_float("decay0", 1e-3, 1e-1, log=True)
        _, hopt = build(decay=hg.Positive(torch.full((4, 6), decay0, dtype=DT)), history_size=None)
        seen[trial.number] = hopt
        return refine(trial, hopt, batches(6), epochs=2)

    study.optimize(objective, n_trials=2)
    for trial in study.trials:
        hopt = seen[trial.number]
        records = list(hopt.history)
        assert len(records) == 4  # 12 steps, a hyper-step every 3
        assert trial.intermediate_values == {r.hyper_step: r.val_loss for r in records}
        best = min(records, key=lambda r: r.val_loss)
        assert trial.value == best.val_loss
        # the values the best record's validation batch saw: those before its update
        before = records[best.hyper_step - 2].hparams["decay"] if best.hyper_step > 1 else None
        stored = refined_hparams(trial)["decay"]
        if before is None:
            assert torch.allclose(stored, torch.full((4, 6), trial.params["decay0"], dtype=DT))
        else:
            assert torch.equal(stored, before)


def test_refine_with_a_score_reports_it_every_epoch():
    study = optuna.create_study()

    def objective(trial):
        model, hopt = build(inner_steps=2)
        scores = []

        def score():
            with torch.no_grad():
                scores.append(float(val_loss(model, hopt.hparams, VAL)))
            return scores[-1]

        value = refine(trial, hopt, batches(4), epochs=3, score=score)
        trial.set_user_attr("scores", scores)
        return value

    study.optimize(objective, n_trials=1)
    t = study.trials[0]
    assert t.intermediate_values == dict(enumerate(t.user_attrs["scores"]))
    assert t.value == min(t.user_attrs["scores"])


def test_a_hybrid_study_samples_structure_and_starts_then_refines():
    """TPE picks the hidden width and the starting decay; the refined decay is read back
    and has the shape of that trial's model."""
    from test_hyperoptimizer_support import mlp

    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))

    def objective(trial):
        width = trial.suggest_categorical("width", [2, 4])
        decay0 = trial.suggest_float("decay0", 1e-3, 1e-1, log=True)
        model = mlp(width=width)
        decay = hg.Positive(torch.full((width, 6), decay0, dtype=DT))
        _, hopt = build(model=model, decay=decay)
        return refine(trial, hopt, batches(6))

    study.optimize(objective, n_trials=4)
    best = study.best_trial
    assert refined_hparams(best)["decay"].shape == (best.params["width"], 6)
    assert study.best_value == min(min(t.intermediate_values.values()) for t in study.trials)


def test_bad_arguments_raise_naming_them():
    study = optuna.create_study()
    trial = study.ask()
    with pytest.raises(hg.ArgumentTypeError, match="`trial`"):
        TrialReporter("trial")
    with pytest.raises(hg.ArgumentTypeError, match="`hopt`"):
        refine(trial, "hopt", [])
    with pytest.raises(ValueError, match="`epochs`"):
        refine(trial, build()[1], [], epochs=0)
    reporter = TrialReporter(trial, max_elements=3)
    reporter.report(0.5, {"big": torch.zeros(4, dtype=DT)})
    reporter.finish()
    study.tell(trial, 0.5)
    with pytest.raises(ValueError, match="max_elements"):
        refined_hparams(study.trials[0])
    frozen = optuna.create_study()
    frozen.optimize(lambda t: 1.0, n_trials=1)
    with pytest.raises(ValueError, match="no refined"):
        refined_hparams(frozen.trials[0])


# ------------------------------------------------------------------ benchmark and example

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def _restore_torch_state():
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


@pytest.mark.usefixtures("_restore_torch_state")
def test_the_hybrid_benchmark_quick_run_writes_its_results(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    module = importlib.import_module("hybrid_optuna")
    assert module.main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "hybrid_optuna.json").read_text())
    assert [t["key"] for t in data["tasks"]] == ["logreg", "mlp-layer"]
    for task in data["tasks"]:
        runs = task["runs"]
        assert set(runs) == {"tpe", "hypergradient", "hybrid"}
        for r in runs.values():
            assert r["val"] and all(math.isfinite(v) for v in r["val"])
            assert math.isfinite(r["final"]["test_loss"])
        h = runs["hybrid"]
        x = h["extras"]
        assert x["trials"] >= 1 and x["polished"] >= 1 and task["seed"] == 0
        # every evaluation is a trial's start or a polisher candidate, accepted or not
        assert x["trials"] + x["accepted"] + x["rejected"] == len(h["val"]) + h["dropped"]
        assert x["hypergradients"] == x["polished"] + x["accepted"]
    md = (tmp_path / "hybrid_optuna.md").read_text()
    assert "hybrid" in md and "test_loss" in md
    assert (tmp_path / "hybrid_optuna.png").stat().st_size > 10_000
    # the committed tables are those of the committed JSON
    committed = BENCHMARKS / "results" / "hybrid_optuna.json"
    if committed.exists():
        text = "\n\n".join(module.render(json.loads(committed.read_text())))
        assert text.strip() in (BENCHMARKS / "results" / "hybrid_optuna.md").read_text()
