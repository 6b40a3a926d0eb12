"""``refine`` in a multi-objective study kept the worst score; a score that was not callable
failed after an epoch of training.

``refine(trial, hopt, data, score=accuracy)`` in a study with ``directions=["maximize",
"minimize"]`` returned the lowest epoch's accuracy (0.68 where the epochs reached 0.87) and
stored that epoch's hyperparameters: its reporter took a study of several objectives as
minimizing. It now refuses ``score`` there without ``direction=``, before any training, and
keeps the highest with ``direction="maximize"``. ``score=accuracy(model)`` (a value) raised
``TypeError: 'float' object is not callable`` after the first epoch; it is now refused
naming ``score``, before any step.
"""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg

optuna = pytest.importorskip("optuna")
from hypergradient.integrations.optuna import refine, refined_hparams  # noqa: E402

DT = torch.float64
G = torch.Generator().manual_seed(0)
X, Y = torch.randn(80, 4, generator=G, dtype=DT), torch.randn(80, generator=G, dtype=DT)


def setup(directions):
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(directions=directions)
    trial = study.ask()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).to(DT)
    hopt = hg.HyperOptimizer(
        model, {"decay": hg.Positive(torch.full((4,), 0.1, dtype=DT))},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        outer_optimizer=lambda r: torch.optim.SGD(r, lr=0.1),
        train_loss=lambda m, h, b: ((m(b[0]).squeeze(1) - b[1]) ** 2).mean()
        + 0.5 * (h["decay"] * m.weight[0] ** 2).sum(),
        val_loss=lambda m, h, b: ((m(b[0]).squeeze(1) - b[1]) ** 2).mean(),
        val_data=(X[40:], Y[40:]), method=hg.IFT(hg.CG(maxiter=4)), inner_steps=2,
    )  # fmt: skip
    data = [(X[i : i + 10], Y[i : i + 10]) for i in range(0, 40, 10)]
    return study, trial, model, hopt, data


def test_a_score_in_a_multi_objective_study_needs_a_direction():
    _, trial, _, hopt, data = setup(["maximize", "minimize"])
    with pytest.raises(ValueError, match="several objectives.*direction="):
        refine(trial, hopt, data, epochs=3, score=lambda: 0.0)
    assert hopt.loop.count == 0  # before any step


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_the_best_epoch_in_the_direction_given_is_kept(direction):
    study, trial, model, hopt, data = setup(["maximize", "minimize"])
    seen = []

    def score():  # the epochs' values, then whatever the model gives: 0.5, 0.9, 0.7
        seen.append([0.5, 0.9, 0.7][len(seen)])
        seen_h.append(hopt.hparams["decay"].detach().clone())
        return seen[-1]

    seen_h = []
    got = refine(trial, hopt, data, epochs=3, score=score, direction=direction)
    best = max(seen) if direction == "maximize" else min(seen)
    assert got == best
    study.tell(trial, [got, 0.0])
    kept = refined_hparams(study.trials[0])["decay"]
    assert torch.allclose(kept, seen_h[seen.index(best)].to(kept.dtype), rtol=1e-12)


def test_a_score_that_is_a_value_is_refused_naming_it_before_any_step():
    _, trial, model, hopt, data = setup(["minimize"])
    with pytest.raises(hg.ArgumentTypeError, match="`score` must be a callable"):
        refine(trial, hopt, data, epochs=2, score=0.3)
    assert hopt.loop.count == 0
