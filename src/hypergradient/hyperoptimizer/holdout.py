"""``HoldoutGuard``: a held-out split that watches the hyper-steps for validation overfitting.

With thousands of hyperparameters (a decay per weight), hypergradient descent fits the
validation set: its loss keeps falling while the loss on unseen data stops improving or
rises. The guard scores a *second* held-out split, never used by any hypergradient, at
every hyper-step:

- the score is ``holdout_loss(model, hparams, batch)`` at the current weights with the
  hyperparameters *before* the hyper-step's update (the ones these weights were trained
  with), on a batch of the held-out data (averaged over the ranks in data-parallel use, so
  that every rank takes the same decisions); it goes into the record
  (``HyperStepRecord.holdout_loss``) and to the logger;
- the best score so far and the raw hyperparameters that produced it are kept
  (``keep_best``): ``hopt.best_hparams``, ``hopt.restore_best()``;
- with ``patience``, hyper-steps stop after ``patience`` scores in a row without an
  improvement larger than ``min_delta`` (training goes on; ``hopt.stopped``), and the best
  hyperparameters are restored when ``keep_best``.

Cost per hyper-step: one forward pass of the holdout loss on one batch (no backward), and a
copy of the raw hyperparameters when the score improves. Its state (sampler, best score and
values, counter, stop flag) is part of the hyper-optimizer's checkpoint and of its rollback.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .. import distributed
from .._vocab import as_bool, as_float, as_int, as_optional_int
from .hparams import HyperParameters
from .model import ModelView
from .sampler import BatchSampler

__all__ = ["GuardState", "HoldoutGuard"]

LossFn = Callable[[Any, dict[str, Tensor], Any], Tensor]


@dataclass
class GuardState:
    """What the guard has seen so far.

    Attributes:
        best_loss: the lowest holdout score (inf before the first).
        best_hyper_step: the hyper-step that scored it (0: none yet).
        best_raw: the raw hyperparameters it scored (copies; None without ``keep_best``).
        bad: scores in a row without an improvement.
        stopped: hyper-steps have stopped (``patience`` exhausted).
    """

    best_loss: float = math.inf
    best_hyper_step: int = 0
    best_raw: dict[str, Tensor] | None = field(default=None, repr=False)
    bad: int = 0
    stopped: bool = False


class HoldoutGuard:
    """Scores held-out data at each hyper-step; keeps the best hyperparameters; stops early.

    Args:
        sampler: the held-out batches.
        loss: ``loss(model, hparams, batch) -> scalar`` (the validation loss by default).
        keep_best: keep a copy of the best raw hyperparameters (restored when hyper-steps
            stop early, and by ``hopt.restore_best()``).
        patience: stop the hyper-steps after this many scores in a row without
            improvement (None: never).
        min_delta: an improvement must lower the best score by more than this.
    """

    def __init__(
        self,
        sampler: BatchSampler,
        loss: LossFn,
        *,
        keep_best: bool = True,
        patience: int | None = None,
        min_delta: float = 0.0,
    ):
        self.sampler, self.loss = sampler, loss
        self.keep_best = as_bool(keep_best, "keep_best")
        hint = " Pass the number of hyper-steps without improvement to wait, or None."
        self.patience = as_optional_int(patience, "patience", min=1, hint=hint)
        self.min_delta = as_float(min_delta, "min_delta", min=0.0)
        self.state = GuardState()

    def config(self) -> dict[str, Any]:
        """The settings every data-parallel rank must share."""
        return {"keep_best": self.keep_best, "patience": self.patience, "min_delta": self.min_delta}

    # ------------------------------------------------------------------ scoring
    def score(self, view: ModelView, hp: HyperParameters, group: Any) -> float:
        """The holdout loss at the current weights and hyperparameters (one forward pass)."""
        batch = self.sampler.next()
        like = [torch.zeros((), dtype=torch.float64, device=view.device)]

        def local() -> list[Tensor]:
            with torch.no_grad():
                value = view.call(self.loss, view.detached(), hp.values(), batch)
            return [value.detach().reshape(()).to(torch.float64)]

        return float(distributed.guarded(local, like, group, "the holdout loss")[0])

    def update(self, loss: float, hyper_step: int, raw_before: Mapping[str, Tensor]) -> bool:
        """Account for a score; returns True when the hyper-steps must stop now."""
        s = self.state
        if math.isfinite(loss) and loss < s.best_loss - self.min_delta:
            copies = {k: v.detach().clone() for k, v in raw_before.items()}
            best = copies if self.keep_best else None
            self.state = GuardState(loss, hyper_step, best, 0, False)
        else:
            self.state = replace(s, bad=s.bad + 1)
        if self.patience is not None and self.state.bad >= self.patience:
            self.state = replace(self.state, stopped=True)
        return self.state.stopped

    # ------------------------------------------------------------------ best values
    @property
    def best_loss(self) -> float | None:
        """The best score so far (None before the first)."""
        return None if self.state.best_hyper_step == 0 else self.state.best_loss

    def best_values(self, hp: HyperParameters) -> dict[str, Tensor] | None:
        """The constrained values of the best raw hyperparameters (detached copies)."""
        if self.state.best_raw is None:
            return None
        with torch.no_grad():
            return {k: v.detach().clone() for k, v in hp.transform(self.state.best_raw).items()}

    @staticmethod
    def restore_best(
        guard: HoldoutGuard | None, hp: HyperParameters, inner: torch.optim.Optimizer
    ) -> None:
        """Write ``guard``'s best raw hyperparameters into ``hp`` (and linked settings).

        Raises:
            ValueError: none is kept.
        """
        best = None if guard is None else guard.state.best_raw
        if best is None:
            raise ValueError(
                "No best hyperparameters are kept: pass holdout_data=... with keep_best=True "
                "and take at least one hyper-step first."
            )
        hp.restore(best)
        hp.write_settings(inner)

    # ------------------------------------------------------------------ rollback
    def snapshot(self) -> GuardState:
        """The state (its tensors are replaced, never modified, so a shallow copy holds)."""
        return replace(self.state)

    def restore(self, snapshot: GuardState) -> None:
        self.state = replace(snapshot)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        s = self.state
        best = None if s.best_raw is None else {k: v.clone() for k, v in s.best_raw.items()}
        return {
            "sampler": self.sampler.state_dict(),
            "best_loss": s.best_loss,
            "best_hyper_step": s.best_hyper_step,
            "best_raw": best,
            "bad": s.bad,
            "stopped": s.stopped,
        }

    def parse_state(self, state: Any, hp: HyperParameters) -> GuardState:
        """Validate :meth:`state_dict` data (nothing changes); returns the state to load."""
        if not isinstance(state, Mapping):
            raise ValueError("The checkpoint's `holdout` entry is malformed.")
        self.sampler.check_state(state.get("sampler"))
        loss = state.get("best_loss")
        if isinstance(loss, bool) or not isinstance(loss, (int, float)) or math.isnan(loss):
            raise ValueError(f"The checkpoint's best holdout loss is {loss!r}.")
        step = as_int(state.get("best_hyper_step"), "holdout best_hyper_step", min=0)
        bad = as_int(state.get("bad"), "holdout bad", min=0)
        stopped = state.get("stopped")
        if not isinstance(stopped, bool):
            raise ValueError(f"The checkpoint's holdout `stopped` flag is {stopped!r}.")
        raw = state.get("best_raw")
        if raw is not None:
            hp.check_state({"raw": raw})
            raw = {k: v.to(hp.raw[k].device) for k, v in raw.items()}
        return GuardState(float(loss), step, raw if self.keep_best else None, bad, stopped)

    def load_state_dict(self, state: Any, hp: HyperParameters) -> None:
        parsed = self.parse_state(state, hp)
        self.sampler.load_state_dict(state["sampler"])
        self.state = parsed


class HoldoutViews:
    """The holdout guard's results as the hyper-optimizer shows them (a mixin of
    :class:`~hypergradient.HyperOptimizer`, which sets ``guard``, ``hyperparameters`` and
    ``inner_optimizer``)."""

    guard: HoldoutGuard | None
    hyperparameters: HyperParameters
    inner_optimizer: torch.optim.Optimizer

    @property
    def stopped(self) -> bool:
        """True once the holdout guard's ``patience`` ran out: steps no longer hyper-step."""
        return self.guard is not None and self.guard.state.stopped

    @property
    def best_hparams(self) -> dict[str, Tensor] | None:
        """The hyperparameter values with the best holdout score so far (detached copies;
        None without ``holdout_data`` and ``keep_best``, or before the first hyper-step)."""
        return None if self.guard is None else self.guard.best_values(self.hyperparameters)

    @property
    def best_holdout_loss(self) -> float | None:
        """The best holdout score so far (None without ``holdout_data`` or before any)."""
        return None if self.guard is None else self.guard.best_loss

    def restore_best(self) -> dict[str, Tensor]:
        """Set the hyperparameters to :attr:`best_hparams` (the outer optimizer's state is
        kept); returns the values. Raises ``ValueError`` when none is kept (no
        ``holdout_data``, ``keep_best=False``, or no hyper-step yet)."""
        HoldoutGuard.restore_best(self.guard, self.hyperparameters, self.inner_optimizer)
        return self.hyperparameters.values()
