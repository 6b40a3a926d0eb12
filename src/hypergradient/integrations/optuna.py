"""Hybrid search: Optuna for the discrete choices and starting values, hypergradient descent
for the continuous hyperparameters inside each trial.

Black-box search and hypergradients are complementary. Optuna's samplers handle what has no
gradient (a width, a solver, an optimizer, an outer learning rate) and explore several
basins; hypergradient descent moves many continuous hyperparameters at once, but only
downhill from where it starts. In the hybrid, each Optuna trial samples the structure and
the *starting* values, then refines the continuous hyperparameters by hypergradient steps,
reporting the validation loss along the way (Optuna's pruners stop hopeless trials early)
and storing the refined values on the trial::

    import optuna
    from hypergradient.integrations.optuna import refine, refined_hparams

    def objective(trial):
        width = trial.suggest_categorical("width", [16, 32, 64])          # structure
        decay0 = trial.suggest_float("decay0", 1e-5, 1e-1, log=True)     # starting value
        model, hopt = make_run(width, decay0)                           # your HyperOptimizer
        return refine(trial, hopt, train_batches, epochs=5, score=lambda: val_loss(model))

    study = optuna.create_study(pruner=optuna.pruners.MedianPruner())
    study.optimize(objective, n_trials=30)
    decay = refined_hparams(study.best_trial)["decay"]                 # the refined tensor

:func:`refine` runs the documented ``HyperOptimizer`` loop; a loop of your own (a functional
``hg.implicit`` outer loop, a Lightning ``Trainer``) reports through a
:class:`TrialReporter` instead: ``reporter.report(value, hparams, step)`` after each
evaluation, ``return reporter.finish()`` at the end.

When a trial is one training (as in TPE alone), refine only the promising starts: a
``TrialReporter(trial, prune_until=0)`` lets a ``PercentilePruner`` judge the start, a
:class:`Polisher` refines the starts it passes by hypergradient line searches that keep only
improving steps, and :func:`add_refined_trial` tells the study each polished point as a trial of its
own (the sampler models every evaluated point; the best polished point is ``study.best_trial``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import optuna
import torch
from torch import Tensor

from .._vocab import (
    ArgumentTypeError,
    NonFiniteHypergradientError,
    as_bool,
    as_choice,
    as_int,
    as_optional_int,
    as_real,
)
from ..hyperoptimizer import HyperOptimizer, HyperStepRecord
from ._optuna_checks import check_refine
from .optuna_polish import REFINED_FROM, Polisher, add_refined_trial

__all__ = [
    "REFINED_FROM",
    "Polisher",
    "TrialReporter",
    "add_refined_trial",
    "refine",
    "refined_hparams",
]

#: User attributes written on the trial.
REFINED, BEST_STEP, STEPS = "refined_hparams", "refined_step", "refinement_steps"


def _plain(values: Mapping[str, Tensor], limit: int) -> dict[str, Any]:
    """JSON-ready values: ``{"shape", "values"}`` per tensor (summaries beyond ``limit``)."""
    out: dict[str, Any] = {}
    for name, t in values.items():
        t = t.detach().to(torch.float64).cpu()
        entry: dict[str, Any] = {"shape": list(t.shape)}
        if t.numel() <= limit:
            entry["values"] = t.reshape(-1).tolist()
        else:
            entry |= {"mean": float(t.mean()), "min": float(t.min()), "max": float(t.max())}
        out[name] = entry
    return out


class TrialReporter:
    """Report a hypergradient refinement to an Optuna trial.

    Every :meth:`report` passes the value to ``trial.report`` (for the study's pruner), keeps
    the lowest value and the hyperparameters that produced it, and raises
    ``optuna.TrialPruned`` when the pruner says so (after writing the best values found so
    far on the trial). :meth:`finish` writes them and returns the value to give Optuna.

    Args:
        trial: the ``optuna.trial.Trial`` being run.
        prune: ask ``trial.should_prune()`` after each report.
        prune_until: ask it only after reports at steps up to this one (``None``: every
            step). ``prune_until=0`` lets the pruner judge a trial's starting point and then
            lets its refinement run (pruning a refinement that only improves is rarely
            worth the lost steps).
        max_elements: hyperparameters up to this size are stored element by element (as
            JSON lists: :func:`refined_hparams` reads them back); larger ones as a summary.
        direction: ``"minimize"`` or ``"maximize"`` the reported values (None: see below).

    User attributes written: ``refined_hparams`` (``{name: {"shape", "values"}}``),
    ``refined_step`` (the step of the best value), ``refinement_steps`` (reports made).
    A value that is not finite is not reported (Optuna's pruners would take it as the
    worst); the trial is pruned if nothing finite was ever reported.

    The best value is the lowest, or the highest with ``direction="maximize"`` (None: the
    study's one direction; a multi-objective study's values are kept, not reported).
    """

    def __init__(
        self,
        trial: optuna.trial.Trial,
        *,
        prune: bool = True,
        prune_until: int | None = None,
        max_elements: int = 10_000,
        direction: str | None = None,
    ):
        methods = (getattr(trial, "report", None), getattr(trial, "set_user_attr", None))
        if not all(callable(m) for m in methods):
            raise ArgumentTypeError(
                f"`trial` must be an optuna.trial.Trial (the objective's argument or "
                f"study.ask()), got {type(trial).__name__}."
            )
        self.trial = trial
        self.prune = as_bool(prune, "prune")
        self.prune_until = as_optional_int(prune_until, "prune_until", min=0)
        self.max_elements = as_int(max_elements, "max_elements", min=0)
        self.sign, self.reports = _sense(trial, direction)
        self.best_value = self.sign * math.inf
        self.best_hparams: dict[str, Tensor] | None = None
        self.best_step: int | None = None
        self.steps = 0

    def report(
        self, value: float, hparams: Mapping[str, Tensor] | None = None, step: int | None = None
    ) -> None:
        """Report ``value`` (lower is better) measured with ``hparams`` at ``step``.

        Args:
            value: the validation (or holdout) loss of this evaluation.
            hparams: the hyperparameter values that produced it (kept if it is the best; a
                best reported without them leaves the best values unknown: none are
                written on the trial).
            step: the step index for the pruner (default: the number of reports so far).

        Raises:
            optuna.TrialPruned: the study's pruner stops this trial.
            ArgumentTypeError: ``value`` is not a number, ``hparams`` not a mapping or one of
                its values neither a tensor nor a number (raised before any change).
        """
        value = as_real(value, "value", " Report a float (a loss) or a 0-d tensor.")
        step = self.steps if step is None else as_int(step, "step", min=0)
        best = math.isfinite(value) and self.sign * value < self.sign * self.best_value
        copies = _copies(hparams, best)
        if self.reports and math.isfinite(value):  # first: a finished trial refuses it
            self.trial.report(value, step)
        self.steps += 1
        if not math.isfinite(value):
            return
        if best:
            self.best_value, self.best_step = value, step
            self.best_hparams = copies  # None: unknown (not the previous best's values)
        if not self.reports:
            return
        judged = self.prune_until is None or step <= self.prune_until
        if self.prune and judged and self.trial.should_prune():
            self._write()
            raise optuna.TrialPruned(f"pruned at step {step} (value {value:.6g})")

    def log(self, record: HyperStepRecord, hparams: Any = None, holdout: Any = None) -> None:
        """Report ``record`` at step ``record.hyper_step``: its holdout loss with
        ``holdout=True`` (NaN: not reported), its validation loss with False (None: the
        holdout loss when it was scored). ``hparams``: the values it scored."""
        scored = record.holdout_scored if holdout is None else holdout
        value = record.holdout_loss if as_bool(scored, "holdout") else record.val_loss
        self.report(value, hparams, record.hyper_step)

    def _write(self) -> None:
        if self.best_hparams is not None:
            self.trial.set_user_attr(REFINED, _plain(self.best_hparams, self.max_elements))
        self.trial.set_user_attr(BEST_STEP, self.best_step)
        self.trial.set_user_attr(STEPS, self.steps)

    def finish_pruned(self) -> None:
        """Write the best values found so far on the trial (before it is pruned)."""
        self._write()

    def finish(self) -> float:
        """Write the best values on the trial; returns the best reported value.

        Raises:
            optuna.TrialPruned: no finite value was reported (the refinement diverged).
        """
        self._write()
        if not math.isfinite(self.best_value):
            raise optuna.TrialPruned("no finite value was reported")
        return self.best_value


def _copies(hparams: Any, best: bool) -> dict[str, Tensor] | None:
    """Copies of the reported hyperparameters if ``best`` (else None); each one checked."""
    if hparams is not None and not isinstance(hparams, Mapping):
        raise ArgumentTypeError(
            f"`hparams` must map names to values (hopt.hparams), got {type(hparams).__name__}."
        )
    copies = {k: _copy(v, k, best) for k, v in (hparams or {}).items()}
    return copies if hparams and best else None


def _copy(value: Any, name: str, keep: bool = True) -> Tensor:
    """A detached copy of a reported hyperparameter (a tensor or a number), made if ``keep``."""
    if isinstance(value, Tensor):
        return value.detach().clone() if keep else value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(
            f"hparams[{name!r}] must be a tensor or a number, got {type(value).__name__}."
        )
    return torch.tensor(float(value), dtype=torch.float64)


def _sense(trial: Any, direction: str | None) -> tuple[float, bool]:
    """``(sign, reports)``: -1 keeps the highest value; whether the study has one objective."""
    found = list(getattr(getattr(trial, "study", None), "directions", None) or [])
    if direction is None:
        up = found == [optuna.study.StudyDirection.MAXIMIZE]
    else:
        up = as_choice(direction, "direction", ("minimize", "maximize")) == "maximize"
    return (-1.0 if up else 1.0), len(found) <= 1


def refine(
    trial: optuna.trial.Trial,
    hopt: HyperOptimizer,
    data: Iterable[Any],
    *,
    epochs: int = 1,
    score: Callable[[], float] | None = None,
    prune: bool = True,
    progress: bool = False,
    direction: str | None = None,
) -> float:
    """Run the ``HyperOptimizer`` loop over ``data`` inside an Optuna trial, reporting to it.

    The loop is the documented one (``hopt.zero_grad()``,
    ``hopt.train_loss(batch).backward()``, ``hopt.step(batch)``) for ``epochs`` passes over
    ``data``. Reported values: ``score()`` after every epoch when given (e.g. the loss on
    the whole validation set), else after every hyper-step its holdout loss (with
    ``holdout_data``) or its validation batch's loss.

    Args:
        trial: the trial the objective received.
        hopt: a hyper-optimizer built with the trial's sampled choices and starting values.
        data: the training batches (re-iterated every epoch; a ``DataLoader``).
        epochs: passes over ``data``.
        score: ``() -> float``, evaluated at the current model; better in the study's
            direction (a multi-objective study: pass ``direction``).
        prune: let the study's pruner stop the trial (``optuna.TrialPruned``).
        progress: show a ``tqdm`` bar over the epochs' batches.
        direction: ``"minimize"`` or ``"maximize"`` ``score`` (:class:`TrialReporter`).

    Returns:
        The best reported value (the objective's value); the trial's ``refined_hparams``
        holds the values that produced it (an epoch's last, or a hyper-step's first).

    A refinement that diverges (``NonFiniteHypergradientError``, or
    ``HyperparameterDomainError`` when an outer step leaves a domain) is a sampled setting
    that does not train: the trial is pruned, with the best values so far written on it,
    and the study goes on (the error used to end ``study.optimize``).

    Raises:
        optuna.TrialPruned: pruned, diverged, or no finite value.
        ArgumentTypeError: ``data`` is a one-pass iterator and ``epochs > 1``, ``score``
            is not callable, or ``score()`` returned something that is not a number.
        ValueError: no ``score`` is given and the study maximizes (losses are reported), a
            ``score`` in a multi-objective study without ``direction`` (it kept the worst
            epoch's), ``hopt`` keeps no history (``history_size=0``), or ``epochs``
            passes over ``data`` end before its next hyper-step (checked before training
            when ``data`` has a length, after it otherwise).
    """
    reporter = TrialReporter(trial, prune=prune, direction=direction)
    epochs = check_refine(hopt, data, epochs, score, direction is None and not reporter.reports)
    if score is None and reporter.sign < 0:
        raise ValueError(
            "The study maximizes, but without `score` refine reports validation losses "
            "(lower is better); pass score=... (e.g. an accuracy) or minimize the loss."
        )
    started = (hopt.hyper_steps, hopt.skipped)
    try:
        for epoch in range(epochs):
            desc = f"trial {trial.number}, epoch {epoch + 1}"
            _epoch(hopt, _progress(data, desc) if progress else data, reporter, score is None)
            if score is not None:
                reporter.report(_score(hopt, score), hopt.hparams, epoch)
    except NonFiniteHypergradientError as err:  # a sampled setting that does not train
        reporter.finish_pruned()
        raise optuna.TrialPruned(f"the refinement diverged: {err}") from err
    if score is None and (hopt.hyper_steps, hopt.skipped) == started:  # data of no length
        raise ValueError(
            f"refine reports each hyper-step, but no hyper-step was due over `data` "
            f"(inner_steps={hopt.inner_steps}, {hopt.loop.count} steps so far): pass more "
            f"`data` or `epochs`, or score=...."
        )
    return reporter.finish()


def _score(hopt: HyperOptimizer, score: Callable[[], float]) -> float:
    """``score()``, with the model's train/eval flags put back afterwards: an evaluation
    function calls ``model.eval()``, and the next epoch of the loop refine runs for the
    user (who cannot call ``model.train()`` in it) would train in eval mode."""
    module = hopt.view.module
    modes = [] if module is None else [(m, m.training) for m in module.modules()]
    try:
        return as_real(score(), "score()", " `score` must return the number to report.")
    finally:
        for m, training in modes:
            m.training = training


def _epoch(hopt: HyperOptimizer, batches: Iterable[Any], reporter: Any, log: bool) -> None:
    """One pass of the documented loop; each hyper-step's record reported when ``log``."""
    for batch in batches:
        done = hopt.hyper_steps
        # Copies: an unconstrained value is its raw leaf, updated in place by hyper-steps.
        before = {k: v.clone() for k, v in hopt.hparams.items()} if log else None
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        hopt.step(batch)
        if log and hopt.hyper_steps > done:  # a NaN holdout score is not the val loss
            reporter.log(hopt.history[-1], before, holdout=hopt.guard is not None)


def _progress(data: Iterable[Any], desc: str) -> Iterable[Any]:
    from tqdm.auto import tqdm

    return tqdm(data, desc=desc, leave=False)


def refined_hparams(trial: optuna.trial.FrozenTrial, device: Any = None) -> dict[str, Tensor]:
    """The refined hyperparameters stored on a finished trial, as float64 tensors.

    Raises:
        ValueError: the trial holds none (it did not report through a
            :class:`TrialReporter`), or only summaries (larger than ``max_elements``).
    """
    stored, added = trial.user_attrs.get(REFINED), REFINED_FROM in trial.user_attrs
    if not isinstance(stored, Mapping):
        raise ValueError(
            f"Trial {trial.number} holds no refined hyperparameters; report through "
            "hypergradient.integrations.optuna.refine or TrialReporter."
            + (" (Added by add_refined_trial: its values are trial.params.)" if added else "")
        )
    out = {}
    for name, entry in stored.items():
        if "values" not in entry:
            raise ValueError(
                f"Trial {trial.number} stored only a summary of {name!r} (shape "
                f"{entry['shape']}); raise TrialReporter's max_elements to keep its values."
            )
        values = torch.tensor(entry["values"], dtype=torch.float64, device=device)
        out[name] = values.reshape(entry["shape"])
    return out
