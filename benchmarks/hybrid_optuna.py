"""Hybrid search: Optuna TPE chooses where hypergradient descent starts, by wall clock.

The race of ``vs_optuna.py`` (same tasks, training and budget per method, interleaved clocks;
each method's best validation loss retrained and scored on the test set) between TPE,
hypergradient descent and a hybrid: TPE trials (``MedianPruner``) sample the outer lr
(x[0.3, 3] the hypergradient method's) and a start (a log decay per hyperparameter up to 8,
one shared above; with ``--continue-best`` possibly the best decays so far), then take up to
``--trial-steps`` hypergradient steps reported through ``integrations.optuna.TrialReporter``.
Run: ``.venv/bin/python benchmarks/hybrid_optuna.py`` (~12 min; ``--quick``: seconds).
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import harness as H
import hypergradient as hg
import vs_optuna as V
from hypergradient.integrations.optuna import TrialReporter

NAME = "hybrid_optuna"
TITLE = "Hybrid search: Optuna TPE samples starting points, hypergradient descent refines"
METHODS = ("tpe", "hypergradient", "hybrid")
LABELS = {"tpe": "Optuna TPE", "hypergradient": "hypergradient", "hybrid": "hybrid (TPE + HG)"}
SHARED_ABOVE = 8  # more hyperparameters than this: one shared starting decay
STATS, FROM, TASKS = ("min", "median", "max"), ("new", "best"), ("logreg", "mlp-layer")


class Hybrid:
    """TPE trials of up to ``trial_steps`` hypergradient steps each, pruned by the median.

    With ``explore`` > 0: for that fraction of the budget every trial is one evaluation (TPE
    explores), then trials refine the best point found by hypergradient steps until the
    budget ends."""

    def __init__(
        self,
        task: V.Task,
        seed: int,
        trial_steps: int,
        resume: bool = False,
        explore: float = 0.0,
        budget: float = math.inf,
    ):
        optuna = H.import_peer("optuna")[0]
        self.explore_s, self.limit = explore * budget, trial_steps
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna, self.task, self.trial_steps, self.resume = optuna, task, trial_steps, resume
        warmup = max(trial_steps // 4, 1)
        self.study = optuna.create_study(
            sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=warmup),
        )
        self.shared = task.n_hparams > SHARED_ABOVE
        n = 1 if self.shared else task.n_hparams
        self.names = ["log_lam0"] if self.shared else [f"log_lam0_{i}" for i in range(n)]
        start = {"outer_lr": task.outer_lr} | {k: math.log(task.lam0) for k in self.names}
        self.study.enqueue_trial(start)  # the hypergradient method's start
        self.run, self.trial, self.steps, self.state = V.Run("hybrid"), None, 0, {}
        self.counts = {"trials": 0, "pruned": 0, "completed": 0}

    def _start_trial(self) -> None:
        t, lo, hi = self.task, math.log(self.task.lo), math.log(self.task.hi)
        self.trial = trial = self.study.ask()
        lr = trial.suggest_float("outer_lr", 0.3 * t.outer_lr, 3 * t.outer_lr, log=True)
        refine = 0 < self.explore_s <= self.run.clock_wall and bool(self.run.val)
        self.limit = (1 if self.explore_s > 0 else self.trial_steps) if not refine else 10**9
        if refine:  # the exploration is over: hypergradient steps from the best point
            values = self.run.phis[self.run.val.index(min(self.run.val))].tolist()
        elif self.resume and self.run.val and trial.suggest_categorical("from", FROM) == "best":
            values = self.run.phis[self.run.val.index(min(self.run.val))].tolist()
        else:
            starts = [trial.suggest_float(n, lo, hi) for n in self.names]
            values = starts * t.n_hparams if self.shared else starts
        self.phi = torch.tensor(values, dtype=V.F64).requires_grad_(True)
        self.opt = torch.optim.Adam([self.phi], lr=lr)
        self.reporter, self.k, self.x0 = TrialReporter(trial), 0, None
        self.counts["trials"] += 1

    def _end_trial(self, pruned: bool) -> None:
        try:
            if not pruned:
                self.study.tell(self.trial, self.reporter.finish())
        except self.optuna.TrialPruned:  # nothing finite was reported
            pruned = True
        if pruned:
            self.study.tell(self.trial, state=self.optuna.trial.TrialState.PRUNED)
        self.counts["pruned" if pruned else "completed"] += 1
        self.trial = None

    def step(self) -> tuple[float, torch.Tensor, float, float]:
        a, t = time.perf_counter(), self.task
        if self.trial is None:
            self._start_trial()
        b, phi = time.perf_counter(), self.phi.detach().clone()
        params = t.train(phi, self.state)
        with torch.no_grad():
            val = float(t.outer_loss(params, phi))
        known = (val, phi, time.perf_counter(), time.process_time())
        self.run.train_seconds += known[2] - b
        try:
            self.reporter.report(val, {"phi": phi}, self.k)
            self.k += 1
            done, pruned = self.k >= self.limit or not math.isfinite(val), False
        except self.optuna.TrialPruned:
            done = pruned = True
        if done:
            self._end_trial(pruned)
            self.run.sampler_seconds += (b - a) + (time.perf_counter() - known[2])
            return known
        self.run.sampler_seconds, c = self.run.sampler_seconds + b - a, time.perf_counter()
        args = (t.inner_loss, t.outer_loss, params, phi, t.solver())  # warnings: silenced
        hyper, info = hg.implicit(*args, x0=self.x0, return_info=True)
        self.x0, self.phi.grad = info.solution, hyper
        self.opt.step()
        with torch.no_grad():
            self.phi.clamp_(math.log(t.lo), math.log(t.hi))
        self.steps += 1
        self.run.hyper_seconds += time.perf_counter() - c
        return known

    def finish(self) -> None:
        done = self.study.get_trials(states=(self.optuna.trial.TrialState.COMPLETE,))
        best, x = min(done, key=lambda tr: tr.value, default=None), self.run.extras
        x |= self.counts | {"best_trial": best and best.number, "outer_steps": self.steps}
        x["best_trial_start"] = best and best.params
        x["best_trial_step"] = best and best.user_attrs.get("refined_step")


def run_task(
    task: V.Task, budget: float, seed: int, trial_steps: int, resume: bool, explore: float
) -> dict:
    H.log(f"{task.title}: budget {budget:.0f} s per method")
    phi0 = torch.full((task.n_hparams,), math.log(task.lam0), dtype=V.F64)
    start = task.evaluate(task.train(phi0, {}))
    hybrid = Hybrid(task, seed, trial_steps, resume, explore, budget)
    methods = [V.Optuna(task, "tpe", seed), V.Hypergradient(task), hybrid]
    load0, real0 = os.getloadavg()[0], time.perf_counter()
    V.race(methods, budget, "interleaved")
    runs = {m.run.method: m.run for m in methods}
    for r in runs.values():  # retrain with the best decays from a fresh state
        best = r.phis[r.val.index(min(r.val))]
        r.final = task.evaluate(task.train(best, {}))
        r.extras |= {f"best_lambda_{k}": float(getattr(best.exp(), k)()) for k in STATS}
    reached = {o: {"value": min(runs[o].val)} for o in ("tpe", "hypergradient")}
    for t in reached.values():  # each method's wall time to each single method's best
        t |= {m: runs[m].time_to(t["value"]) for m in METHODS}
    res = {"key": task.key, "title": task.title, "n_hparams": task.n_hparams, "budget": budget}
    res |= {"lam0": task.lam0, "outer_lr": task.outer_lr, "trial_steps": trial_steps}
    res["continue_best"], res["explore"] = resume, explore
    res |= {"solver": task.solver_text, "training": task.training_text, "box": [task.lo, task.hi]}
    res |= {"real_seconds": time.perf_counter() - real0, "load": [load0, os.getloadavg()[0]]}
    res |= {"start": start, "reached": reached}
    return res | {"runs": {k: r.json() for k, r in runs.items()}}


def best_of(run: dict[str, Any]) -> str:
    """``best validation / retrained test`` of one method's run."""
    return f"{min(run['val']):.4f} / {run['final']['test_loss']:.4f}"


def render_task(res: dict[str, Any]) -> str:
    runs, s, h = res["runs"], res["start"], res["runs"]["hybrid"]["extras"]
    rows = [{"method": f"start (lambda = {res['lam0']:g})", "evaluations": 1} | s]
    rows[0]["best"] = s["val_loss"]
    for m, r in ((m, runs[m]) for m in METHODS):
        x = {"method": LABELS[m], "evaluations": len(r["val"]), "best": min(r["val"])}
        x |= {"found_at_s": r["wall"][r["val"].index(min(r["val"]))]}
        rows.append(x | {k: r["extras"].get(k) for k in ("trials", "pruned")} | r["final"])
    ex = {m: runs[m]["extras"] for m in METHODS}
    lams = [" / ".join(f"{ex[m][f'best_lambda_{k}']:.3g}" for k in STATS) for m in METHODS]
    notes = [
        f"budget {res['budget']:.0f} s per method, interleaved; lambda in {res['box']}; "
        f"training: {res['training']}; hypergradient: Adam(lr={res['outer_lr']}) on log lambda "
        f"from lambda = {res['lam0']:g}, hg.implicit with {res['solver']}",
        (
            f"hybrid: TPE evaluations for {res['explore']:.0%} of the budget, then "
            "hypergradient steps from the best point; "
            if res.get("explore")
            else f"hybrid: trials of up to {res['trial_steps']} hypergradient steps"
            + (", from a sampled point or the best so far; " if res.get("continue_best") else "; ")
        )
        + H.facts({k: h[k] for k in ("trials", "completed", "pruned", "best_trial")})
        + f"; best trial's start (log lambda_0) and outer lr {h['best_trial_start']}, "
        f"its best at step {h['best_trial_step']}",
        f"{res['real_seconds']:.0f} s of real time; 1-min load average {res['load'][0]:.1f} "
        f"before, {res['load'][1]:.1f} after",
        "best lambdas (min / median / max): "
        + "; ".join(f"{LABELS[m]} {t}" for m, t in zip(METHODS, lams)),
    ]
    cols = "method|evaluations:d|trials:d|pruned:d|best:.4f|found_at_s:.2f|val_loss:.4f"
    for o, t in res["reached"].items():
        at = [f"{LABELS[m]} {'never' if t[m] is None else f'{t[m][0]:.2f} s'}" for m in METHODS]
        notes.append(f"wall time to reach {LABELS[o]}'s best ({t['value']:.4f}): {', '.join(at)}")
    table = H.dict_table(rows, cols + "|test_loss:.4f|test_acc:.3f")
    return f"## {res['title']}\n\n{H.bullets(notes)}\n\n{table}"


def render(d: dict[str, Any]) -> list[str]:
    if not d["tasks"]:
        return ["Optuna not importable: the comparison is SKIPPED."]
    rows = [{"task": r["key"], "hyperparameters": r["n_hparams"]} for r in d["tasks"]]
    for row, res in zip(rows, d["tasks"]):
        row |= {f"{LABELS[m]} val / test": best_of(res["runs"][m]) for m in METHODS}
    cols = "task|hyperparameters:,|" + "|".join(f"{LABELS[m]} val / test" for m in METHODS)
    notes = (
        "Columns: the best validation loss within the budget / the test loss after retraining"
        " with those decays (`best` below; `val_loss`: the retrained model's)."
    )
    summary = f"## Summary\n\n{notes}\n\n{H.dict_table(rows, cols)}"
    return [summary, *map(render_task, d["tasks"])]


def plot(data: dict[str, Any], out: Path) -> Path:
    """Best validation loss so far against each method's wall clock, per task."""
    colors = {"tpe": "tab:blue", "hypergradient": "tab:green", "hybrid": "tab:red"}
    tasks = data["tasks"]
    fig, axes = H.pyplot().subplots(1, len(tasks), figsize=(5.4 * len(tasks), 4.2), squeeze=False)
    for ax, res in zip(axes[0], tasks):
        for m, r in ((m, res["runs"][m]) for m in METHODS):
            x, y = [*r["wall"], res["budget"]], [*r["best_so_far"], min(r["val"])]
            label = f"{LABELS[m]}: {best_of(r).replace(' / ', ' (test ')})"
            ax.step(x, y, where="post", color=colors[m], label=label)
        left = min(min(res["runs"][m]["wall"]) for m in METHODS) * 0.8
        title = f"{res['key']}: {res['n_hparams']:,} decays"
        ax.set(xscale="log", xlim=(left, res["budget"]), xlabel="wall time (s)", title=title)
        ax.set(ylabel="best validation loss so far")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, title="best val (retrained test)", title_fontsize=8)
    fig.suptitle("Same wall-clock budget per method, interleaved", fontsize=10)
    return H.save_figure(fig, out / f"{NAME}.png")


def main(argv: Sequence[str] | None = None) -> int:
    p = H.cli(__doc__)
    p.add_argument("--budget-logreg", type=float, help="seconds per method (default 90)")
    p.add_argument("--budget-mlp", type=float, help="seconds per method (default 150)")
    p.add_argument("--trial-steps-logreg", type=int, help="hybrid trial length (default 150)")
    p.add_argument("--trial-steps-mlp", type=int, help="hybrid trial length (default 15)")
    p.add_argument("--lbfgs-iters", type=int, help="inner L-BFGS iterations (default 200)")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--continue-best", action="store_true", help="trials may resume the best")
    p.add_argument("--explore-logreg", type=float, default=0.0, help="TPE-only budget share")
    p.add_argument("--explore-mlp", type=float, default=0.0, help="TPE-only budget share")
    args = p.parse_args(argv)
    if H.replot(args, NAME, TITLE, render, plot):
        return 0
    H.start(args)
    warnings.filterwarnings("ignore", category=hg.HypergradientWarning)  # counted by vs_optuna
    H.defaults(args, budget_logreg=(1.0, 90.0), budget_mlp=(1.5, 150.0), lbfgs_iters=(20, 200))
    H.defaults(args, trial_steps_logreg=(3, 150), trial_steps_mlp=(2, 15))
    optuna, version = H.import_peer("optuna")
    rep = H.Report(NAME, TITLE, args, optuna=version if optuna else None)
    settings = {"logreg": (args.budget_logreg, args.trial_steps_logreg, args.explore_logreg)}
    settings["mlp-layer"] = (args.budget_mlp, args.trial_steps_mlp, args.explore_mlp)
    results = []
    for key in args.tasks * (optuna is not None):
        budget, steps, explore = settings[key]
        task = V.Task(key, args.seed, args.lbfgs_iters)
        results.append(run_task(task, budget, args.seed, steps, args.continue_best, explore))
    rep.write({"tasks": results}, render, plot if results else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
