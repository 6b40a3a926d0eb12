"""Against black-box search: Optuna (TPE, random) versus hypergradient descent, by wall clock."""

import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import harness as H
import hypergradient as hg

F64, NAME = torch.float64, "vs_optuna"
TITLE = "Against black-box search: Optuna (TPE, random) vs hypergradient descent"
METHODS, TASKS = ("tpe", "random", "hypergradient"), ("logreg", "mlp", "mlp-layer")
OWNERS = METHODS[:2]  # the methods whose best is a target
STATS, SPLIT = ("min", "median", "max"), ("train_seconds", "sampler_seconds", "hyper_seconds")
SPLIT += ("dropped",)
LABELS = dict(zip(METHODS, ("Optuna TPE", "Optuna random", "hypergradient")))
COLORS = dict(zip(METHODS, ("tab:blue", "tab:orange", "tab:green")))
TITLES = {
    "logreg": "Task 1: per-feature L2 logistic regression, breast cancer (30 decays)",
    "mlp": "Task 2: tanh MLP 64-32-10 on digits, one decay per parameter ({:,} decays)",
    "mlp-layer": "Task 2b: tanh MLP 64-32-10 on digits, one decay per tensor (4 decays)",
}
# by logistic regression or not: the box (lo, hi), the common start lam0, the outer lr; the CG
SETTINGS = {True: (1e-5, 10.0, 1e-2, 0.05), False: (1e-6, 1.0, 1e-3, 0.1)}
CG = {True: ("maxiter=100, tol=1e-8", 100, 1e-8), False: ("maxiter=50, tol=1e-4", 50, 1e-4)}
TRAINING = {
    True: "damped Newton to ||grad f|| <= 1e-10, warm-started from the previous evaluation",
    False: "torch.optim.LBFGS, {} iterations (strong Wolfe, history 20)",
}


class Task:
    """A bilevel problem: one training routine shared by every method. Hyperparameters are a
    flat float64 vector ``phi = log lambda``, confined to ``[log lo, log hi]``."""

    def __init__(self, key: str, seed: int, lbfgs_iters: int):
        from sklearn.datasets import load_breast_cancer, load_digits
        from sklearn.model_selection import train_test_split as split

        self.key, self.iters, logreg = key, lbfgs_iters, key == "logreg"
        X, y = (load_breast_cancer if logreg else load_digits)(return_X_y=True)
        n_train, n_val = (100, 300) if logreg else (500, 400)
        X_t, X_r, y_t, y_r = split(X, y, train_size=n_train, stratify=y, random_state=seed)
        X_v, X_s, y_v, y_s = split(X_r, y_r, train_size=n_val, stratify=y_r, random_state=seed + 1)
        mean, std, ydt = X_t.mean(0), X_t.std(0), F64 if logreg else torch.long
        std[std == 0] = 1.0
        sets = {"train": (X_t, y_t), "val": (X_v, y_v), "test": (X_s, y_s)}
        scaled = lambda a: torch.tensor((a - mean) / std).to(F64)  # noqa: E731
        self.data = {k: (scaled(a), torch.tensor(b).to(ydt)) for k, (a, b) in sets.items()}
        zeros = (torch.zeros(30, dtype=F64), torch.zeros(1, dtype=F64))
        gen = torch.Generator().manual_seed(seed)
        self.init = zeros if logreg else H.mlp_init((64, 32, 10), gen)
        self.forward = (lambda p, x: x @ p[0] + p[1]) if logreg else H.mlp_forward
        self.criterion = F.binary_cross_entropy_with_logits if logreg else F.cross_entropy
        n = 30 if logreg else 4 if key == "mlp-layer" else sum(t.numel() for t in self.init)
        self.n_hparams, self.names = n, [f"lam_{i:04d}" for i in range(n)]
        self.lo, self.hi, self.lam0, self.outer_lr = SETTINGS[logreg]
        text, maxiter, tol = CG[logreg]
        self.solver, self.solver_text = lambda: hg.CG(maxiter=maxiter, tol=tol), f"hg.CG({text})"
        self.training_text, self.title = TRAINING[logreg].format(lbfgs_iters), TITLES[key].format(n)

    def loss(self, params: tuple, split: str) -> Tensor:
        return self.criterion(self.forward(params, self.data[split][0]), self.data[split][1])

    def decays(self, phi: Tensor) -> list[Tensor]:
        """The log decay of every parameter, one tensor per parameter tensor (bias of the
        logistic regression not penalized)."""
        if self.key == "logreg":
            return [phi, torch.full((1,), -math.inf, dtype=F64)]
        if self.key == "mlp-layer":
            return [phi[i].expand(t.shape) for i, t in enumerate(self.init)]
        return list(H.unflat(phi, self.init))

    def inner_loss(self, params: tuple, phi: Tensor) -> Tensor:
        pen = sum((d.exp() * p**2).sum() for p, d in zip(params, self.decays(phi)))
        return self.loss(params, "train") + 0.5 * pen

    def outer_loss(self, params: tuple, phi: Tensor) -> Tensor:
        return self.loss(params, "val")

    def start(self) -> Tensor:
        return torch.full((self.n_hparams,), math.log(self.lam0), dtype=F64)

    def train(self, phi: Tensor, state: dict[str, Any]) -> tuple:
        """The inner training: the same code for an Optuna trial and an outer step."""
        phi, like = phi.detach(), self.init
        f = lambda t: self.inner_loss(H.unflat(t, like), phi)  # noqa: E731
        if self.key != "logreg":  # always from the same initialization
            return H.unflat(H.lbfgs(f, H.flat(like), self.iters, 20), like)
        theta = H.newton(f, H.flat(state.get("params", like)), 1e-10, damped=True)[0]
        state["params"] = tuple(t.clone() for t in H.unflat(theta, like))
        return state["params"]

    def evaluate(self, params: tuple, splits=("train", "val", "test")) -> dict[str, float]:
        """The loss on each of ``splits`` and the test accuracy."""
        with torch.no_grad():
            (x, y), logreg = self.data["test"], self.key == "logreg"
            z = self.forward(params, x)
            hit = (z > 0).to(F64) == y if logreg else z.argmax(1) == y
            out = {f"{s}_loss": float(self.loss(params, s)) for s in splits}
            return out | {"test_acc": float(hit.to(F64).mean())}


@dataclass
class Run:
    """One method on one task: every evaluation that finished within the budget. Times are
    the method's own clock: the sum of the durations of its own steps."""

    method: str
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    clock_wall: float = 0.0
    clock_cpu: float = 0.0
    dropped: int = 0  # evaluations that finished after the budget
    failed: int = 0  # non-finite validation losses (Optuna: told as failed)
    sampler_seconds: float = 0.0  # Optuna: ask + suggest_float + tell
    train_seconds: float = 0.0  # Task.train + validation loss
    hyper_seconds: float = 0.0  # hypergradients + Adam steps
    extras: dict[str, Any] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)
    phis: list[Tensor] = field(default_factory=list, repr=False)

    def record(self, wall: float, cpu: float, val: float, phi: Tensor, budget: float) -> None:
        if wall > budget and self.val:  # the first evaluation (the common start) is kept
            self.dropped += 1
        elif not math.isfinite(val):
            self.failed += 1
        else:
            self.wall, self.cpu, self.val = self.wall + [wall], self.cpu + [cpu], self.val + [val]
            self.phis.append(phi.detach().clone())

    def best(self) -> Tensor:
        return self.phis[self.val.index(min(self.val))]

    def time_to(self, target: float) -> list[float] | None:
        i = next((i for i, v in enumerate(self.val) if v <= target), None)
        return None if i is None else [self.wall[i], self.cpu[i]]

    def json(self) -> dict[str, Any]:
        """Its best-so-far curve and best lambdas, not every phi."""
        best = [min(self.val[: i + 1]) for i in range(len(self.val))]
        out = {k: v for k, v in vars(self).items() if k != "phis"} | {"best_so_far": best}
        return out | {"best_lambda": self.best().exp()}


class Optuna:
    """Optuna ask/tell; each trial is one ``task.train`` with the trial's lambdas."""

    overhead = "sampler_seconds"

    def __init__(self, task: Task, kind: str, seed: int):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        cls = optuna.samplers.TPESampler if kind == "tpe" else optuna.samplers.RandomSampler
        self.study = optuna.create_study(direction="minimize", sampler=cls(seed=seed))
        self.study.enqueue_trial({n: task.lam0 for n in task.names})  # the hypergradient's start
        self.task, self.state, self.run = task, {}, Run(kind)
        self.fail = optuna.trial.TrialState.FAIL

    def propose(self) -> Tensor:
        self.trial, t = self.study.ask(), self.task
        lam = [self.trial.suggest_float(n, t.lo, t.hi, log=True) for n in t.names]
        return torch.tensor(lam, dtype=F64).log()

    def update(self, params: tuple, phi: Tensor, val: float) -> None:
        ok = math.isfinite(val)  # a non-finite loss: a failed trial
        self.study.tell(self.trial, val if ok else None, state=None if ok else self.fail)

    def finish(self) -> None:
        self.run.extras["trials_told"] = len(self.study.trials)


class Hypergradient:
    """Adam on phi = log lambda with implicit hypergradients after each ``task.train``."""

    overhead = "hyper_seconds"

    def __init__(self, task: Task):
        self.task, self.state, self.run, self.diag = task, {}, Run("hypergradient"), []
        self.phi = task.start().requires_grad_(True)
        self.opt, self.stopped = torch.optim.Adam([self.phi], lr=task.outer_lr), False

    def propose(self) -> Tensor:
        return self.phi.detach().clone()

    def update(self, params: tuple, phi: Tensor, val: float) -> None:
        t, self.stopped = self.task, not math.isfinite(val)
        if self.stopped:
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", hg.HypergradientWarning)
            args = (t.inner_loss, t.outer_loss, params, phi, t.solver())
            hyper, info = hg.implicit(*args, x0=self.state.get("x0"), return_info=True)
        self.state["x0"], self.phi.grad = info.solution, hyper
        self.opt.step()
        with torch.no_grad():
            self.phi.clamp_(math.log(t.lo), math.log(t.hi))
        self.diag.append((info.iterations, str(info.status), len(caught), info.inner_grad_norm))

    def finish(self) -> None:
        its, status, warned, norms = zip(*self.diag) if self.diag else ((),) * 4
        counts = {s: status.count(s) for s in sorted(set(status))}
        e = {"outer_steps": len(its), "cg_iterations_mean": sum(its) / max(len(its), 1)}
        e |= {"cg_status_counts": counts, "hypergradient_warnings": sum(warned)}
        e["inner_grad_norm_median"] = H.median(norms)
        e["inner_grad_norm_max"] = max(norms, default=None)
        self.run.extras |= e


def race(methods: list[Any], budget: float, schedule: str) -> None:
    """Step the method whose clock is furthest behind (``interleaved``) or each method's whole
    budget in turn (``sequential``) until every clock reaches ``budget``. A step: the method
    proposes ``phi``, ``task.train`` trains there (the same code for every method), the
    validation loss is stamped and the method updates on it; the step's time besides the
    training (and the hypergradients the method timed itself) goes to ``method.overhead``."""
    pending = list(methods)
    while pending:
        clock = (lambda m: m.run.clock_wall) if schedule == "interleaved" else pending.index
        m = min(pending, key=clock)
        r, w, c = m.run, time.perf_counter(), time.process_time()
        hyper0, phi = r.hyper_seconds, m.propose()
        b = time.perf_counter()
        params = m.task.train(phi, m.state)
        with torch.no_grad():
            val = float(m.task.outer_loss(params, phi))
        w1, c1 = time.perf_counter(), time.process_time()
        m.update(params, phi, val)
        spent = (b - w) + (time.perf_counter() - w1) - (r.hyper_seconds - hyper0)
        setattr(r, m.overhead, getattr(r, m.overhead) + spent)
        r.train_seconds += w1 - b
        r.record(r.clock_wall + w1 - w, r.clock_cpu + c1 - c, val, phi, budget)
        r.clock_wall += time.perf_counter() - w
        r.clock_cpu += time.process_time() - c
        if r.clock_wall >= budget or getattr(m, "stopped", False):
            pending.remove(m)
    for m in methods:
        m.finish()


def contest(task: Task, methods: list, budget: float, schedule: str) -> tuple[dict, dict, float]:
    """The common start scored, the race of ``methods``, then every method's best lambdas
    retrained from a fresh state and scored: the fields every task's result has (``load``: the
    load average before), the runs by method, when the race started."""
    start = task.evaluate(task.train(task.start(), {}))
    load0, real0 = os.getloadavg()[0], time.perf_counter()
    race(methods, budget, schedule)
    res = {"key": task.key, "title": task.title, "n_hparams": task.n_hparams}
    res |= {"box": [task.lo, task.hi], "lam0": task.lam0, "outer_lr": task.outer_lr}
    res |= {"solver": task.solver_text, "training": task.training_text, "budget": budget}
    res |= {"real_seconds": time.perf_counter() - real0, "load": [load0], "start": start}
    runs = {m.run.method: m.run for m in methods}
    for r in runs.values():
        best = r.best()
        r.final = task.evaluate(task.train(best, {}))
        r.extras |= {f"best_lambda_{k}": float(getattr(best.exp(), k)()) for k in STATS}
    return res, runs, real0


def run_task(task: Task, budget: float, seed: int, schedule: str) -> dict[str, Any]:
    H.log(f"{task.title}: budget {budget:.0f} s per method, {schedule}")
    methods = [Optuna(task, "tpe", seed), Optuna(task, "random", seed), Hypergradient(task)]
    res, runs, _ = contest(task, methods, budget, schedule)
    targets, hyper = {}, runs["hypergradient"]
    for owner in OWNERS:
        target = min(runs[owner].val)
        i = next((i for i, v in enumerate(hyper.val) if v <= target), None)
        t = {"value": target, "reached": {k: runs[k].time_to(target) for k in METHODS}}
        t["is_start"] = runs[owner].val.index(target) == 0
        at = None if i is None else task.evaluate(task.train(hyper.phis[i], {}))
        targets[owner] = t | {"hypergradient_at_target": at}
    res["load"].append(os.getloadavg()[0])
    res |= {"schedule": schedule, "runs": {m: r.json() for m, r in runs.items()}}
    return res | {"targets": targets}


def ratio(t: dict, owner: str, i: int, start: str) -> str:
    """Optuna's time to its best over the hypergradient's (wall: ``i = 0``, CPU: 1)."""
    a, b = t["reached"][owner], t["reached"]["hypergradient"]
    if t["is_start"] or a is None or b is None:
        return start if t["is_start"] else "-" if a is None else "hypergradient did not reach it"
    return f"{a[i] / max(b[i], 1e-9):.1f}x"


def method_rows(res: dict, methods: Any, labels: dict, extra: Callable[[dict], dict]) -> list:
    """The common start and each method's row: evaluations, best, when found, final scores."""
    s, start = res["start"], f"start (lambda = {res['lam0']:g})"
    rows = [{"method": start, "evaluations": 1, "best": s["val_loss"]} | s]
    for m, r in ((m, res["runs"][m]) for m in methods):
        x = {"method": labels[m], "evaluations": len(r["val"]), "best": min(r["val"])}
        x["found_at_s"] = r["wall"][r["val"].index(x["best"])]
        rows.append(x | r["final"] | extra(r))
    return rows


def lambdas(r: dict) -> dict[str, float]:
    return {f"best_lambda_{k}": r["extras"][f"best_lambda_{k}"] for k in STATS}


def evaluation_share(r: dict) -> dict[str, Any]:
    """Seconds per evaluation, the sampler's share of the clock (Optuna), CPU over wall."""
    n, wall = len(r["val"]) + r["dropped"] + r["failed"], r["clock_wall"]
    share = r["sampler_seconds"] / wall if r["method"] != "hypergradient" else None
    x = {"s_per_evaluation": wall / max(n, 1), "sampler_share": share}
    return x | {"cpu/wall": r["clock_cpu"] / wall}


def render_task(res: dict[str, Any]) -> str:
    runs, targets = res["runs"], []
    pair = lambda x: f"{x['test_loss']:.4f} / {x['test_acc']:.3f}"  # noqa: E731
    for owner, t in res["targets"].items():
        reach, ht = t["reached"], t["hypergradient_at_target"]
        x = {"target": f"{LABELS[owner]}'s best", "value": t["value"]}
        for m in METHODS:
            x[LABELS[m]] = "not reached" if reach[m] is None else f"{reach[m][0]:.2f} s"
        x |= {"ratio (wall)": ratio(t, owner, 0, "n/a: no improvement on the start")}
        x |= {"ratio (CPU)": ratio(t, owner, 1, "n/a")}
        x["Optuna's best (test loss / acc)"] = pair(runs[owner]["final"])
        targets.append(x | {"hypergradient at the target": pair(ht) if ht else "-"})
    split = [f"{LABELS[m]} {H.facts({k: runs[m][k] for k in SPLIT})}" for m in METHODS]
    refit = lambda r: f"{r['final']['val_loss']:.6f} ({min(r['val']):.6f})"  # noqa: E731
    best = [f"{LABELS[m]} {H.facts(lambdas(runs[m]))}, {refit(runs[m])}" for m in METHODS]
    notes = [
        f"budget {res['budget']:.0f} s per method; lambda in {res['box']}; "
        f"training: {res['training']}; hypergradient: Adam(lr={res['outer_lr']}) on log lambda, "
        f"hg.implicit with {res['solver']}, x0 = previous solution",
        f"schedule {res['schedule']}; {res['real_seconds']:.0f} s of real time; 1-min load "
        f"average {res['load'][0]:.1f} before, {res['load'][1]:.1f} after",
        f"hypergradient: {H.facts(runs['hypergradient']['extras'])}",
        "time split: " + "; ".join(split),
        "best lambdas (min / median / max), refit val loss (recorded): " + "; ".join(best),
    ]
    cols = "method|evaluations:d|s_per_evaluation:.3f|sampler_share:.0%|best:.4f|found_at_s:.2f"
    cols += "|test_loss:.4f|test_acc:.3f|cpu/wall:.2f"
    tcols = "target|value:.4f|Optuna TPE|Optuna random|hypergradient|ratio (wall)|ratio (CPU)"
    tcols += "|Optuna's best (test loss / acc)|hypergradient at the target"
    rows = method_rows(res, METHODS, LABELS, evaluation_share)
    tables = [H.dict_table(rows, cols), H.dict_table(targets, tcols)]
    return H.section(res["title"], H.bullets(notes), *tables)


def render(d: dict[str, Any]) -> list[str]:
    if not d["tasks"]:
        return ["Optuna not importable: the comparison is SKIPPED."]
    rows = []
    for res in d["tasks"]:
        r = {"task": res["key"], "hyperparameters": res["n_hparams"]}
        for owner, (i, clock) in ((o, c) for o in OWNERS for c in enumerate(("wall", "CPU"))):
            r[f"vs {owner} ({clock})"] = ratio(res["targets"][owner], owner, i, "n/a (start)")
        best = " / ".join(f"{min(res['runs'][m]['val']):.4f}" for m in METHODS)
        rows.append(r | {"best val (TPE / random / hypergradient)": best})
    cols = "task|hyperparameters:,|vs tpe (wall)|vs tpe (CPU)|vs random (wall)|vs random (CPU)"
    cols += "|best val (TPE / random / hypergradient)"
    title = "Summary: Optuna's time to its best / hypergradient's time to the same value"
    return [*map(render_task, d["tasks"]), H.section(title, H.dict_table(rows, cols))]


def race_axes(ax: Any, res: dict, colors: dict, label: Callable[[str, dict], str]) -> None:
    """Best validation loss so far against each method's wall clock (a step per evaluation)."""
    for m, r in ((m, res["runs"][m]) for m in colors):
        x, y = [*r["wall"], res["budget"]], [*r["best_so_far"], min(r["val"])]
        ax.step(x, y, where="post", color=colors[m], label=label(m, r))
    left = min(min(res["runs"][m]["wall"]) for m in colors) * 0.8
    ax.set(xscale="log", xlim=(left, res["budget"]), xlabel="wall time (s)")
    ax.set(ylabel="best validation loss so far")
    ax.grid(True, which="both", alpha=0.3)


def plot(data: dict[str, Any], out: Path) -> Path | None:
    """Best validation loss so far against each method's wall clock, per task."""
    if not data["tasks"]:
        return None
    fig, axes = H.subplots(1, len(data["tasks"]), 5.2, 4.2)
    for ax, res in zip(axes[0], data["tasks"]):
        race_axes(ax, res, COLORS, lambda m, r: f"{LABELS[m]} ({len(r['val'])})")
        for m, r in res["runs"].items():
            best = min(r["val"])
            ax.plot([r["wall"][r["val"].index(best)]], [best], "o", ms=4, color=COLORS[m])
        for owner in OWNERS:
            ax.axhline(res["targets"][owner]["value"], color=COLORS[owner], ls=":", lw=0.8)
        ax.set(title=f"{res['key']}: {res['n_hparams']:,} hyperparameters")
        ax.legend(fontsize=8, title="method (evaluations)", title_fontsize=8)
    title = "Best validation loss so far against wall time, same budget per method"
    fig.suptitle(title, fontsize=10)
    return H.save_figure(fig, out / f"{NAME}.png")


def run(args: Any, rep: H.Report) -> dict[str, Any]:
    optuna, version = H.import_peer("optuna")
    rep.machine["optuna"] = version if optuna else None
    budgets = {"logreg": args.budget_logreg, "mlp": args.budget_mlp}
    tasks = [Task(k, args.seed, args.lbfgs_iters) for k in args.tasks * (optuna is not None)]
    run = [run_task(t, budgets[t.key.split("-")[0]], args.seed, args.schedule) for t in tasks]
    return {"budgets": budgets, "tasks": run}


OPTIONS = [
    H.option("--budget-logreg", 1.0, 90.0, type=float, help="seconds per method, task 1"),
    H.option("--budget-mlp", 1.0, 150.0, type=float, help="seconds per method, task 2"),
    H.option("--tasks", ["logreg"], list(TASKS), nargs="+", choices=TASKS),
    H.option("--schedule", choices=("interleaved", "sequential"), default="interleaved"),
    H.option("--lbfgs-iters", type=int, default=200, help="inner L-BFGS iterations (MLP)"),
]
main = H.entry(__doc__, NAME, TITLE, run, render, plot=plot, options=OPTIONS)

if __name__ == "__main__":
    main()
