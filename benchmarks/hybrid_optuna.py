"""Hybrid search: Optuna TPE proposes starting points, hypergradient line searches polish them.

The race of ``vs_optuna.py`` (same tasks, training and budget per method, interleaved clocks;
each method's best decays retrained and tested) between TPE, hypergradient descent and a hybrid:
TPE proposes starts that ``integrations.optuna.Polisher`` refines (projected L-BFGS on the
implicit hypergradient, a step kept only if the exact validation loss falls). ``--space start``
(tens of decays): a trial samples one decay shared by all, polished to the end and told its best
polished loss (TPE searches 1-D, the hypergradient 30-D); ``full`` (a few decays): a trial
samples every decay, a ``PercentilePruner`` at step 0 passes the best ``--percentile`` % of
starts to polishing, every polished point a trial of its own. A median per task over ``--seeds``
(each its own data split and initialization). Run: ``.venv/bin/python
benchmarks/hybrid_optuna.py --seeds 0 1 2`` (~12 min per seed; ``--quick``: seconds).
"""

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
from hypergradient.integrations.optuna import Polisher, TrialReporter, add_refined_trial

NAME, TITLE = "hybrid_optuna", __doc__.splitlines()[0].rstrip(".")  # the first line
METHODS = ("tpe", "hypergradient", "hybrid")
LABELS = {"tpe": "Optuna TPE", "hypergradient": "hypergradient", "hybrid": "hybrid (TPE + HG)"}
COLORS = {"tpe": "tab:blue", "hypergradient": "tab:green", "hybrid": "tab:red"}
AUTO_FULL = 10  # --space auto: TPE samples every decay up to this many
COUNTS = ("trials", "polished", "accepted", "rejected", "hypergradients", "improved_by_polish")
NOTED = (*COUNTS[:2], COUNTS[-1], *COUNTS[2:-1], "study_trials", "best_trial", "best_refined_from")
TASKS = ("logreg", "mlp-layer")


class Hybrid:
    """TPE proposes starting points, ``integrations.optuna.Polisher`` polishes them, accept-only,
    in one of the ``--space`` modes of the module docstring (a method of ``V.race``)."""

    overhead = "sampler_seconds"  # besides the hypergradients, timed apart

    def __init__(self, task: V.Task, seed: int, polish: tuple, space: str = "auto"):
        optuna = H.import_peer("optuna")[0]
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        percentile, self.max_evals, rejects, memory = polish
        if space == "auto":  # TPE samples a few decays well, tens of them poorly
            space = "start" if task.n_hparams > AUTO_FULL else "full"
        self.optuna, self.task, self.space = optuna, task, space
        if space == "start":  # a trial: one shared starting decay, polished to the end
            pruner, self.names = optuna.pruners.NopPruner(), ["lam_start"]
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)
        else:
            pruner = optuna.pruners.PercentilePruner(percentile, n_startup_trials=2)
            sampler, self.names = optuna.samplers.TPESampler(seed=seed), task.names
        self.study = optuna.create_study(sampler=sampler, pruner=pruner)
        self.study.enqueue_trial(dict.fromkeys(self.names, task.lam0))  # the common start
        lo, hi = math.log(task.lo), math.log(task.hi)
        self.polisher = Polisher(lo, hi, max_rejects=rejects, memory=memory)
        self.run, self.source, self.state, self.x0 = V.Run("hybrid"), None, {}, None
        self.counts = dict.fromkeys(COUNTS, 0)

    def hypergradient(self, params: tuple, phi: torch.Tensor) -> torch.Tensor:
        t, c = self.task, time.perf_counter()
        args = (t.inner_loss, t.outer_loss, params, phi, t.solver())  # warnings: silenced
        hyper, info = hg.implicit(*args, x0=self.x0, return_info=True)
        self.x0, self.counts["hypergradients"] = info.solution, self.counts["hypergradients"] + 1
        self.run.hyper_seconds += time.perf_counter() - c
        return hyper

    def propose(self) -> torch.Tensor:
        """The polisher's next candidate, or (when it is done) a new trial's start."""
        if self.source is not None and self.evals < self.max_evals:
            x = self.polisher.ask()
            if x is not None:
                self.evals += 1
                return x
        self._end_polish()
        t, self.source, self.evals = self.task, None, 0
        self.trial = self.study.ask()
        lam = [self.trial.suggest_float(n, t.lo, t.hi, log=True) for n in self.names]
        self.counts["trials"] += 1
        return torch.tensor(lam, dtype=V.F64).log().expand(t.n_hparams).clone()

    def _end_polish(self) -> None:
        if self.source is not None:
            self.counts["improved_by_polish"] += self.polisher.accepted > self.accepted0
            if self.space == "start":  # the trial's value: its best polished loss
                self.study.tell(self.source, self.reporter.finish())

    def update(self, params: tuple, phi: torch.Tensor, val: float) -> None:
        """A polished candidate: accepted or not, told to the study; else a trial's start."""
        if self.source is None:
            self._start(params, phi, val)
            return
        accepted = self.polisher.tell(val, lambda: self.hypergradient(params, phi))
        self.counts["accepted" if accepted else "rejected"] += 1
        if math.isfinite(val) and self.space == "start":
            self.reporter.report(val, {"phi": phi})  # the trial's own refinement
        elif math.isfinite(val):  # a trial of its own
            lam = dict(zip(self.task.names, phi.exp().tolist()))
            add_refined_trial(self.study, lam, val, self.source)

    def _start(self, params: tuple, phi: torch.Tensor, val: float) -> None:
        """Tell the trial its start's loss; polish it if the pruner lets it through."""
        reporter, trial = TrialReporter(self.trial, prune_until=0), self.trial
        try:
            reporter.report(val, {"phi": phi}, 0)
        except self.optuna.TrialPruned:
            self.study.tell(trial, state=self.optuna.trial.TrialState.PRUNED)
            return
        if self.space == "start":
            self.reporter = reporter  # told when its polish ends
        else:
            self.study.tell(trial, reporter.finish())
        self.source, self.accepted0 = trial, self.polisher.accepted
        self.polisher.start(phi, val, self.hypergradient(params, phi))
        self.counts["polished"] += 1

    def finish(self) -> None:
        self._end_polish()  # a polish the budget ended
        best, x = self.study.best_trial, self.run.extras
        x |= self.counts | {"best_trial": best.number, "study_trials": len(self.study.trials)}
        x["best_refined_from"] = best.user_attrs.get("refined_from")


def run_task(task: V.Task, budget: float, seed: int, polish: tuple, space: str) -> dict:
    H.log(f"{task.title}, seed {seed}: budget {budget:.0f} s per method")
    hybrid = Hybrid(task, seed, polish, space)
    methods = [V.Optuna(task, "tpe", seed), V.Hypergradient(task), hybrid]
    res, runs, real0 = V.contest(task, methods, budget, "interleaved")
    reached = {o: {"value": min(runs[o].val)} for o in ("tpe", "hypergradient")}
    for t in reached.values():  # each method's wall time to each single method's best
        t |= {m: runs[m].time_to(t["value"]) for m in METHODS}
    res |= {"seed": seed, "space": hybrid.space}
    res |= dict(zip(("percentile", "polish_evals", "max_rejects", "memory"), polish))
    res["real_seconds"] = time.perf_counter() - real0  # with the retraining
    res["load"].append(os.getloadavg()[0])
    return res | {"reached": reached, "runs": {k: r.json() for k, r in runs.items()}}


def best_of(run: dict[str, Any]) -> str:
    """``best validation / retrained test`` of one method's run."""
    return f"{min(run['val']):.5f} / {run['final']['test_loss']:.4f}"


def render_task(res: dict[str, Any]) -> str:
    runs, h = res["runs"], res["runs"]["hybrid"]["extras"]
    counts = lambda r: {k: r["extras"].get(k) for k in COUNTS[:2]}  # noqa: E731
    rows = V.method_rows(res, METHODS, LABELS, counts)
    lams = [" / ".join(f"{v:.3g}" for v in V.lambdas(runs[m]).values()) for m in METHODS]
    space = (
        "hybrid: TPE samples one starting decay shared by all, every start polished "
        if res.get("space") == "start"
        else f"hybrid: TPE starts, the best {res['percentile']:g} % polished "
    )
    notes = [
        f"budget {res['budget']:.0f} s per method, interleaved; lambda in {res['box']}; "
        f"training: {res['training']}; hypergradient: Adam(lr={res['outer_lr']}) on log lambda "
        f"from lambda = {res['lam0']:g}, hg.implicit with {res['solver']}",
        f"{space}(Polisher, memory={res.get('memory', 5)}, max_rejects={res['max_rejects']}, up "
        f"to {res['polish_evals']} evaluations); " + H.facts({k: h[k] for k in NOTED}),
        f"{res['real_seconds']:.0f} s of real time; 1-min load average {res['load'][0]:.1f} "
        f"before, {res['load'][1]:.1f} after",
        "best lambdas (min / median / max): "
        + "; ".join(f"{LABELS[m]} {t}" for m, t in zip(METHODS, lams)),
    ]
    for o, t in res["reached"].items():
        at = [f"{LABELS[m]} {'never' if t[m] is None else f'{t[m][0]:.2f} s'}" for m in METHODS]
        notes.append(f"wall time to reach {LABELS[o]}'s best ({t['value']:.4f}): {', '.join(at)}")
    cols = "method|evaluations:d|trials:d|polished:d|best:.5f|found_at_s:.2f|val_loss:.4f"
    table = H.dict_table(rows, cols + "|test_loss:.4f|test_acc:.3f")
    return f"## {res['title']}, seed {res.get('seed', 0)}\n\n{H.bullets(notes)}\n\n{table}"


def render(d: dict[str, Any]) -> list[str]:
    if not d["tasks"]:
        return ["Optuna not importable: the comparison is SKIPPED."]
    rows = []
    for key in dict.fromkeys(r["key"] for r in d["tasks"]):
        group = [r for r in d["tasks"] if r["key"] == key]
        for res in group:
            row = {"task": key, "seed": str(res.get("seed", 0))}
            rows.append(row | {LABELS[m]: best_of(res["runs"][m]) for m in METHODS})
        if len(group) > 1:
            val = {m: H.median([min(r["runs"][m]["val"]) for r in group]) for m in METHODS}
            med = {"task": key, "seed": "**median**"}
            for m in METHODS:
                test = H.median([r["runs"][m]["final"]["test_loss"] for r in group])
                bold = "**" if val[m] == min(val.values()) else ""
                med[LABELS[m]] = f"{bold}{val[m]:.5f}{bold} / {test:.4f}"
            rows.append(med)
    cols = "task|seed|" + "|".join(LABELS[m] for m in METHODS)
    notes = (
        "Each cell: the best validation loss within the budget / the test loss after "
        "retraining with those decays (per seed: its own data split and initialization); "
        "median rows: the medians of each, the lowest median validation loss in bold."
    )
    summary = f"## Summary\n\n{notes}\n\n{H.dict_table(rows, cols)}"
    return [summary, *map(render_task, d["tasks"])]


def plot(data: dict[str, Any], out: Path) -> Path | None:
    """Best validation loss so far against each method's wall clock: a row per task, a
    column per seed."""
    if not data["tasks"]:
        return None
    keys = dict.fromkeys(r["key"] for r in data["tasks"])
    groups = [[r for r in data["tasks"] if r["key"] == k] for k in keys]
    fig, axes = H.subplots(len(groups), max(map(len, groups)), 4.6, 3.8)
    label = lambda m, r: f"{LABELS[m]}: {best_of(r).replace(' / ', ' (test ')})"  # noqa: E731
    for row, group in zip(axes, groups):
        for ax in row[len(group) :]:
            ax.set_visible(False)
        for ax, res in zip(row, group):
            V.race_axes(ax, res, COLORS, label)
            ax.set(title=f"{res['key']} ({res['n_hparams']:,} decays), seed {res['seed']}")
            ax.legend(fontsize=7, title="best val (retrained test)", title_fontsize=7)
    fig.suptitle("Same wall-clock budget per method, interleaved", fontsize=10)
    return H.save_figure(fig, out / f"{NAME}.png")


def run(args: Any, rep: H.Report) -> dict[str, Any]:
    warnings.filterwarnings("ignore", category=hg.HypergradientWarning)  # counted by vs_optuna
    optuna, version = H.import_peer("optuna")
    rep.machine["optuna"] = version if optuna else None
    args.seeds = args.seeds or [args.seed]
    budgets = {"logreg": args.budget_logreg, "mlp-layer": args.budget_mlp}
    polish = (args.percentile, args.polish_evals, args.max_rejects, args.memory)
    results = []
    for key in args.tasks * (optuna is not None):
        for seed in args.seeds:
            torch.manual_seed(seed)
            task = V.Task(key, seed, args.lbfgs_iters)
            results.append(run_task(task, budgets[key], seed, polish, args.space))
    return {"tasks": results}


SPACE = (
    "what TPE samples: one shared starting decay per trial, polished to the end (start), or "
    "every decay, the best --percentile %% of starts polished (full); auto: full up to "
    f"{AUTO_FULL} decays"
)
OPTIONS = [
    H.option("--budget-logreg", 1.0, 90.0, type=float, help="seconds per method (default 90)"),
    H.option("--budget-mlp", 1.5, 150.0, type=float, help="seconds per method (default 150)"),
    H.option("--lbfgs-iters", 20, 200, type=int, help="inner L-BFGS iterations (default 200)"),
    H.option("--tasks", nargs="+", choices=TASKS, default=list(TASKS)),
    H.option("--seeds", type=int, nargs="+", help="seeds (default: --seed's)"),
    H.option("--percentile", type=float, default=10.0, help="starts polished (%%)"),
    H.option("--polish-evals", 3, 1000, type=int, help="evaluations per polish (default 1000)"),
    H.option("--max-rejects", type=int, default=3, help="rejections ending a polish"),
    H.option("--memory", type=int, default=15, help="the polisher's L-BFGS memory"),
    H.option("--space", choices=("auto", "start", "full"), default="auto", help=SPACE),
]


def main(argv: Sequence[str] | None = None) -> int:
    H.bench_main(__doc__, NAME, TITLE, run, render, plot=plot, argv=argv, options=OPTIONS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
