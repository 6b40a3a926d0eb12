"""``integrations.optuna.Polisher``: accept-only hypergradient line searches in a box.

References: closed-form minimizers of quadratics (the box-constrained minimizer of a
separable quadratic is the clamped centre; the secant step on a 1-d quadratic lands on its
minimizer exactly), a linear loss whose minimizer is a corner of the box, and Optuna's own
pruner decisions for ``TrialReporter(prune_until=...)``."""

from __future__ import annotations

import math

import pytest
import torch

import hypergradient as hg

optuna = pytest.importorskip("optuna")
from hypergradient.integrations.optuna import (  # noqa: E402
    Polisher,
    TrialReporter,
    add_refined_trial,
)

DT = torch.float64
optuna.logging.set_verbosity(optuna.logging.WARNING)


def quadratic(A, c):
    def f(x):
        return float(0.5 * (x - c) @ A @ (x - c))

    def grad(x):
        return A @ (x - c)

    return f, grad


def polish(polisher, f, grad, x0, max_evals=500):
    polisher.start(x0, f(x0), grad(x0))
    values, evals = [polisher.value], 0
    while (x := polisher.ask()) is not None and evals < max_evals:
        polisher.tell(f(x), lambda x=x: grad(x))
        values.append(polisher.value)
        evals += 1
    return values, evals


def test_the_secant_step_on_a_1d_quadratic_lands_on_the_minimizer():
    f, grad = quadratic(torch.tensor([[3.0]], dtype=DT), torch.tensor([0.7], dtype=DT))
    p = Polisher(-5.0, 5.0, radius=0.5)
    p.start(
        torch.tensor([-2.0], dtype=DT),
        f(torch.tensor([-2.0], dtype=DT)),
        grad(torch.tensor([-2.0], dtype=DT)),
    )
    x1 = p.ask()
    assert torch.equal(x1, torch.tensor([-1.5], dtype=DT))  # steepest descent, |step| = radius
    assert p.tell(f(x1), grad(x1))
    x2 = p.ask()  # one curvature pair: the inverse Hessian 1/3 exactly
    assert torch.allclose(x2, torch.tensor([0.7], dtype=DT), atol=1e-14, rtol=0)


def test_a_separable_quadratic_converges_to_the_clamped_centre_and_never_gets_worse():
    A = torch.diag(torch.tensor([1.0, 10.0, 100.0, 0.5], dtype=DT))
    c = torch.tensor([0.3, -4.0, 2.5, 9.0], dtype=DT)  # two coordinates outside [-1, 2]
    f, grad = quadratic(A, c)
    p = Polisher(-1.0, 2.0, memory=4)
    values, evals = polish(p, f, grad, torch.zeros(4, dtype=DT))
    ref = c.clamp(-1.0, 2.0)
    assert torch.allclose(p.x, ref, atol=1e-6, rtol=0)
    assert p.value == pytest.approx(f(ref), abs=1e-10)
    assert all(b <= a for a, b in zip(values, values[1:]))
    assert p.done and evals < 500 and p.accepted + p.rejected == evals


def test_a_coupled_quadratic_inside_the_box_converges_to_its_centre():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(6, 6, generator=g, dtype=DT)
    A = M @ M.T + 0.1 * torch.eye(6, dtype=DT)
    c = torch.rand(6, generator=g, dtype=DT) - 0.5
    f, grad = quadratic(A, c)
    p = Polisher(torch.full((6,), -1.0, dtype=DT), torch.full((6,), 1.0, dtype=DT), memory=6)
    polish(p, f, grad, torch.full((6,), 0.9, dtype=DT), max_evals=2000)
    assert torch.allclose(p.x, c, atol=1e-5, rtol=0)


def test_a_linear_loss_walks_to_the_corner_and_stops():
    f, grad = (lambda x: float(x.sum() - 2 * x[1])), (lambda x: torch.tensor([1.0, -1.0], dtype=DT))
    p = Polisher(0.0, 1.0, radius=0.4)
    values, _ = polish(p, f, grad, torch.tensor([0.5, 0.5], dtype=DT))
    assert torch.equal(p.x, torch.tensor([0.0, 1.0], dtype=DT)) and p.value == -1.0
    assert p.done and p.ask() is None


def test_rejected_steps_cost_no_hypergradient_and_end_the_polish():
    p = Polisher(-1.0, 1.0, max_rejects=3, shrink=0.5)
    x0 = torch.tensor([0.0, 0.0], dtype=DT)
    p.start(x0, 1.0, torch.tensor([1.0, 0.5], dtype=DT))
    calls, steps = [], []

    def never():
        calls.append(1)
        return torch.zeros(2, dtype=DT)

    for value in (1.0, math.nan, 2.0):  # equal, NaN, worse: all rejected
        steps.append(p.ask() - x0)
        assert not p.tell(value, never)
    assert not calls and p.done and p.ask() is None and p.rejected == 3
    assert torch.equal(p.x, x0) and p.value == 1.0
    assert torch.allclose(steps[1], steps[0] / 2) and torch.allclose(steps[2], steps[0] / 4)
    assert torch.equal(steps[0], torch.tensor([-1.0, -0.5], dtype=DT))  # largest move = radius


def test_tol_requires_that_decrease():
    p = Polisher(-1.0, 1.0, tol=0.1)
    p.start(torch.zeros(1, dtype=DT), 1.0, torch.ones(1, dtype=DT))
    p.ask()
    assert not p.tell(0.95, torch.ones(1, dtype=DT))
    p.ask()
    assert p.tell(0.85, torch.ones(1, dtype=DT)) and p.value == 0.85


def test_bad_arguments_raise_naming_them():
    with pytest.raises(hg.ArgumentTypeError, match="`lower`"):
        Polisher("0", 1.0)
    with pytest.raises(ValueError, match="`shrink`"):
        Polisher(0.0, 1.0, shrink=1.0)
    with pytest.raises(ValueError, match="`max_rejects`"):
        Polisher(0.0, 1.0, max_rejects=0)
    with pytest.raises(ValueError, match="`radius`"):
        Polisher(0.0, 1.0, radius=0.0)
    p = Polisher(0.0, 1.0)
    assert p.ask() is None  # nothing started
    with pytest.raises(ValueError, match="ask"):
        p.tell(0.5, torch.zeros(1, dtype=DT))
    with pytest.raises(hg.ArgumentTypeError, match="same shape"):
        p.start(torch.zeros(2, dtype=DT), 0.0, torch.zeros(3, dtype=DT))
    with pytest.raises(hg.NonFiniteHypergradientError, match="grad"):
        p.start(torch.zeros(2, dtype=DT), 0.0, torch.tensor([0.0, math.nan], dtype=DT))
    with pytest.raises(ValueError, match="`value`"):
        p.start(torch.zeros(2, dtype=DT), math.inf, torch.zeros(2, dtype=DT))
    with pytest.raises(ValueError, match="below `upper`"):
        Polisher(1.0, 0.0).start(torch.zeros(2, dtype=DT), 0.0, torch.zeros(2, dtype=DT))
    assert p.ask() is None  # the failed starts changed nothing


class PruneFrom(optuna.pruners.BasePruner):
    """Prunes every trial once it has reported at step ``step``."""

    def __init__(self, step):
        self.step = step

    def prune(self, study, trial):
        return trial.last_step is not None and trial.last_step >= self.step


@pytest.mark.parametrize(("until", "pruned_at"), [(None, 1), (1, 1), (0, None)])
def test_prune_until_limits_the_steps_the_pruner_judges(until, pruned_at):
    study = optuna.create_study(pruner=PruneFrom(1))

    def objective(trial):
        reporter = TrialReporter(trial, prune_until=until)
        for step, v in enumerate([0.9, 0.8, 0.7]):
            reporter.report(v, step=step)
        return reporter.finish()

    study.optimize(objective, n_trials=1)
    t = study.trials[0]
    if pruned_at is None:
        assert t.state == optuna.trial.TrialState.COMPLETE and t.value == 0.7
    else:
        assert t.state == optuna.trial.TrialState.PRUNED and t.last_step == pruned_at
    with pytest.raises(ValueError, match="`prune_until`"):
        TrialReporter(study.ask(), prune_until=-1)


def test_refined_points_become_trials_and_the_best_one_is_the_studys_best():
    """A polish of a sampled start on a separable quadratic in log space; every candidate is
    told with its exact value, and the study's best trial holds the polished parameters."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    width = trial.suggest_categorical("width", [8, 16])
    lam = [trial.suggest_float(f"lam{i}", 1e-4, 1.0, log=True) for i in range(2)]
    c = torch.tensor([-3.0, 0.5], dtype=DT)  # the second centre is above log(1.0)
    f, grad = quadratic(torch.eye(2, dtype=DT), c)
    x = torch.tensor(lam, dtype=DT).log()
    study.tell(trial, f(x))
    p = Polisher(math.log(1e-4), 0.0)
    p.start(x, f(x), grad(x))
    while (x := p.ask()) is not None:
        value = f(x)
        p.tell(value, grad(x))
        add_refined_trial(
            study, {"lam0": float(x[0].exp()), "lam1": float(x[1].exp())}, value, trial
        )
    best = study.best_trial
    assert best.value == p.value < study.trials[0].value
    assert best.params["width"] == width and best.user_attrs["refined_from"] == trial.number
    assert best.params["lam0"] == pytest.approx(math.exp(-3.0), rel=1e-6)
    assert best.params["lam1"] == 1.0  # the bound, clipped exactly
    assert len(study.trials) == 1 + p.accepted + p.rejected


def test_add_refined_trial_refuses_unknown_names_and_nonfinite_values():
    study = optuna.create_study()
    trial = study.ask()
    trial.suggest_float("lam", 1e-3, 1.0, log=True)
    study.tell(trial, 1.0)
    with pytest.raises(ValueError, match="did not suggest"):
        add_refined_trial(study, {"other": 0.1}, 0.5, trial)
    with pytest.raises(ValueError, match="`value`"):
        add_refined_trial(study, {"lam": 0.1}, math.nan, trial)
    assert len(study.trials) == 1
