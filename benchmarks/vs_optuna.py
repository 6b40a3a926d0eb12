"""Against black-box search: Optuna (TPE, random) versus hypergradient descent, by wall clock.

Each method tunes the same hyperparameters for the same wall-clock budget in this process,
interleaved (the method whose own clock is furthest behind steps next), with the same training
code; time to reach each Optuna sampler's best validation loss, and the retrained test loss of
the best hyperparameters. Tasks, timing rules and settings: benchmarks/README.md. Optuna is a
bench-only dependency; without it the benchmark is skipped with a message.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor

import hypergradient as hg
from harness import Report, cli, log, start
from harness import report as rp
from harness.report import pyplot, save_figure
from harness.runner import import_peer

F64 = torch.float64
Params = tuple[Tensor, ...]
Split = tuple[Tensor, Tensor]
METHODS = ("tpe", "random", "hypergradient")
LABELS = {"tpe": "Optuna TPE", "random": "Optuna random", "hypergradient": "hypergradient"}


def stratified_splits(
    X: Any, y: Any, n_train: int, n_val: int, seed: int, y_dtype: torch.dtype
) -> dict[str, Split]:
    """Stratified, seeded train / validation / test split, standardized with train stats."""
    X_train, X_rest, y_train, y_rest = train_test_split(
        X, y, train_size=n_train, stratify=y, random_state=seed
    )
    X_val, X_test, y_val, y_test = train_test_split(
        X_rest, y_rest, train_size=n_val, stratify=y_rest, random_state=seed + 1
    )
    mean, std = X_train.mean(axis=0), X_train.std(axis=0)
    std[std == 0] = 1.0
    splits = {"train": (X_train, y_train), "val": (X_val, y_val), "test": (X_test, y_test)}
    return {
        k: (torch.tensor((a - mean) / std, dtype=F64), torch.tensor(b, dtype=y_dtype))
        for k, (a, b) in splits.items()
    }


# ============================================================================ tasks


class Task:
    """A bilevel problem: one training routine shared by every method.

    Hyperparameters are a flat float64 vector ``phi = log lambda`` of ``n_hparams``
    entries, confined to ``[log lo, log hi]``.
    """

    key: str
    title: str
    names: list[str]
    lo: float
    hi: float
    lam0: float
    outer_lr: float
    solver_text: str
    training_text: str

    @property
    def n_hparams(self) -> int:
        return len(self.names)

    def new_state(self) -> dict[str, Any]:
        """Per-run memory (warm starts); a fresh one for every method and the final refit."""
        return {}

    def inner_loss(self, params: Params, phi: Tensor) -> Tensor:
        raise NotImplementedError

    def outer_loss(self, params: Params, phi: Tensor) -> Tensor:
        raise NotImplementedError

    def train(self, phi: Tensor, state: dict[str, Any]) -> Params:
        """The inner training: the same code for an Optuna trial and an outer step."""
        raise NotImplementedError

    def solver(self) -> hg.Solver:
        raise NotImplementedError

    def damping(self) -> float:
        return 0.0

    def val_loss(self, params: Params) -> float:
        with torch.no_grad():
            return float(self.outer_loss(params, torch.zeros(0, dtype=F64)))

    def evaluate(self, params: Params) -> dict[str, float]:
        raise NotImplementedError

    def hypergradient(
        self, params: Params, phi: Tensor, state: dict[str, Any]
    ) -> tuple[Tensor, dict[str, Any]]:
        """``d val_loss / d phi`` at the trained ``params`` by ``hg.implicit`` + CG."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", hg.HypergradientWarning)
            hyper, info = hg.implicit(
                self.inner_loss,
                self.outer_loss,
                params,
                phi,
                solver=self.solver(),
                damping=self.damping(),
                x0=state.get("x0"),
                return_info=True,
            )
        state["x0"] = info.solution
        diag = {
            "cg_iterations": info.iterations,
            "status": info.status,
            "relative_residual": info.relative_residual,
            "inner_grad_norm": info.inner_grad_norm,
            "warnings": len(caught),
        }
        return hyper, diag


# ---------------------------------------------------------------------------- task 1


class LogRegTask(Task):
    """Per-feature L2 logistic regression on breast cancer (as examples/logreg_...)."""

    def __init__(self, seed: int):
        X, y = load_breast_cancer(return_X_y=True)
        self.splits = stratified_splits(X, y, 100, 300, seed, F64)
        d = self.splits["train"][0].shape[1]
        self.key = "logreg"
        self.title = "Task 1: per-feature L2 logistic regression, breast cancer (30 decays)"
        self.names = [f"lam_{i:02d}" for i in range(d)]
        self.lo, self.hi, self.lam0, self.outer_lr = 1e-5, 10.0, 1e-2, 0.05
        self.solver_text = "hg.CG(maxiter=100, tol=1e-8), x0 = previous solution"
        self.training_text = (
            "damped Newton (dense Hessian) to ||grad f|| <= 1e-10, warm-started from the "
            "previous evaluation of the same method"
        )

    def _bce(self, params: Params, split: str) -> Tensor:
        w, b = params
        X, y = self.splits[split]
        return F.binary_cross_entropy_with_logits(X @ w + b, y)

    def inner_loss(self, params: Params, phi: Tensor) -> Tensor:
        return self._bce(params, "train") + 0.5 * torch.sum(torch.exp(phi) * params[0] ** 2)

    def outer_loss(self, params: Params, phi: Tensor) -> Tensor:
        return self._bce(params, "val")

    def solver(self) -> hg.Solver:
        return hg.CG(maxiter=100, tol=1e-8)

    def train(self, phi: Tensor, state: dict[str, Any]) -> Params:
        d = self.n_hparams
        # The bias is a (1,)-vector, not a 0-d tensor (see examples/logreg_weight_decay.py).
        start = state.get("params")
        if start is None:
            start = (torch.zeros(d, dtype=F64), torch.zeros(1, dtype=F64))
        params, iters, gnorm = newton_solve(self.inner_loss, phi.detach(), start)
        state["params"] = params
        state["newton_iterations"] = state.get("newton_iterations", 0) + iters
        state["max_inner_grad_norm"] = max(state.get("max_inner_grad_norm", 0.0), gnorm)
        return params

    def evaluate(self, params: Params) -> dict[str, float]:
        w, b = params
        X, y = self.splits["test"]
        with torch.no_grad():
            acc = float(((X @ w + b > 0).to(F64) == y).to(F64).mean())
            return {
                "train_loss": float(self._bce(params, "train")),
                "val_loss": float(self._bce(params, "val")),
                "test_loss": float(self._bce(params, "test")),
                "test_acc": acc,
            }


def newton_solve(
    inner_loss: Callable[[Params, Tensor], Tensor],
    phi: Tensor,
    params0: Params,
    tol: float = 1e-10,
    maxiter: int = 50,
) -> tuple[Params, int, float]:
    """Damped Newton from ``params0`` (the routine of examples/logreg_weight_decay.py)."""
    d = params0[0].numel()

    def f(theta: Tensor) -> Tensor:
        return inner_loss((theta[:d], theta[d:]), phi)

    grad_f, hess_f = torch.func.grad(f), torch.func.hessian(f)
    theta = torch.cat([params0[0].reshape(-1), params0[1].reshape(-1)]).detach()
    value = f(theta)
    iters = 0
    for iters in range(1, maxiter + 1):  # noqa: B007 (reported)
        g = grad_f(theta)
        if float(torch.linalg.vector_norm(g)) <= tol:
            iters -= 1
            break
        step = torch.linalg.solve(hess_f(theta), g)
        slope = float(g @ step)
        if slope < 1e-12:  # quadratic-convergence region: below round-off of f, full step
            theta = theta - step
            value = f(theta)
            continue
        t = 1.0
        while True:  # backtracking (Armijo) line search
            candidate = theta - t * step
            new_value = f(candidate)
            if float(new_value) <= float(value) - 1e-4 * t * slope or t < 1e-8:
                break
            t *= 0.5
        theta, value = candidate, new_value
    gnorm = float(torch.linalg.vector_norm(grad_f(theta)))
    return (theta[:d].clone(), theta[d:].clone()), iters, gnorm


# ---------------------------------------------------------------------------- task 2


class MLPTask(Task):
    """Tanh MLP 64-32-10 on digits; one decay per parameter or one per tensor."""

    SHAPES = ((32, 64), (32,), (10, 32), (10,))
    TENSORS = ("W1", "b1", "W2", "b2")

    def __init__(self, seed: int, per_tensor: bool, lbfgs_iters: int):
        X, y = load_digits(return_X_y=True)
        self.splits = stratified_splits(X, y, 500, 400, seed, torch.long)
        g = torch.Generator().manual_seed(seed)
        self.init: Params = (
            torch.randn(32, 64, generator=g, dtype=F64) / 8.0,
            torch.zeros(32, dtype=F64),
            torch.randn(10, 32, generator=g, dtype=F64) / math.sqrt(32.0),
            torch.zeros(10, dtype=F64),
        )
        self.sizes = [math.prod(s) for s in self.SHAPES]
        self.per_tensor = per_tensor
        self.lbfgs_iters = lbfgs_iters
        if per_tensor:
            self.key = "mlp-layer"
            self.title = "Task 2b: tanh MLP 64-32-10 on digits, one decay per tensor (4 decays)"
            self.names = [f"lam_{t}" for t in self.TENSORS]
        else:
            self.key = "mlp"
            n = sum(self.sizes)
            self.title = (
                f"Task 2: tanh MLP 64-32-10 on digits, one decay per parameter ({n:,} decays)"
            )
            self.names = [f"lam_{i:04d}" for i in range(n)]
        self.lo, self.hi, self.lam0, self.outer_lr = 1e-6, 1.0, 1e-3, 0.1
        self.solver_text = "hg.CG(maxiter=50, tol=1e-4), x0 = previous solution"
        self.training_text = (
            f"torch.optim.LBFGS, {lbfgs_iters} iterations (strong Wolfe, history 20), full "
            "batch, from the same seeded initialization every time"
        )

    def expand(self, phi: Tensor) -> list[Tensor]:
        """The per-parameter log decays, one tensor per parameter tensor."""
        if self.per_tensor:
            return [phi[i].expand(s) for i, s in enumerate(self.SHAPES)]
        return [p.reshape(s) for p, s in zip(torch.split(phi, self.sizes), self.SHAPES)]

    @staticmethod
    def forward(params: Params, x: Tensor) -> Tensor:
        W1, b1, W2, b2 = params
        return torch.tanh(x @ W1.T + b1) @ W2.T + b2

    def _ce(self, params: Params, split: str) -> Tensor:
        x, y = self.splits[split]
        return F.cross_entropy(self.forward(params, x), y)

    def inner_loss(self, params: Params, phi: Tensor) -> Tensor:
        penalty = sum(torch.sum(torch.exp(ll) * p**2) for p, ll in zip(params, self.expand(phi)))
        return self._ce(params, "train") + 0.5 * penalty

    def outer_loss(self, params: Params, phi: Tensor) -> Tensor:
        return self._ce(params, "val")

    def solver(self) -> hg.Solver:
        return hg.CG(maxiter=50, tol=1e-4)

    def train(self, phi: Tensor, state: dict[str, Any]) -> Params:
        phi = phi.detach()
        ps = [p.clone().requires_grad_(True) for p in self.init]
        opt = torch.optim.LBFGS(
            ps,
            lr=1.0,
            max_iter=self.lbfgs_iters,
            max_eval=2 * self.lbfgs_iters,
            tolerance_grad=1e-12,
            tolerance_change=0.0,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            opt.zero_grad()
            loss = self.inner_loss(tuple(ps), phi)
            loss.backward()
            return loss

        opt.step(closure)
        return tuple(p.detach() for p in ps)

    def evaluate(self, params: Params) -> dict[str, float]:
        x, y = self.splits["test"]
        with torch.no_grad():
            acc = float((self.forward(params, x).argmax(1) == y).to(F64).mean())
            return {
                "train_loss": float(self._ce(params, "train")),
                "val_loss": float(self._ce(params, "val")),
                "test_loss": float(self._ce(params, "test")),
                "test_acc": acc,
            }


# ============================================================================ runs


@dataclass
class Run:
    """One method on one task: every evaluation that finished within the budget.

    Times are the method's own clock: the sum of the durations of its own steps (an
    evaluation, plus Optuna's ``tell`` or the hypergradient and Adam step), so that other
    methods' steps run in between do not count.
    """

    method: str
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    clock_wall: float = 0.0
    clock_cpu: float = 0.0
    dropped: int = 0  # evaluations that finished after the budget
    failed: int = 0  # non-finite validation losses (Optuna: told as failed)
    sampler_seconds: float = 0.0  # Optuna: ask + suggest_float + tell
    train_seconds: float = 0.0  # Task.train + Task.val_loss
    hyper_seconds: float = 0.0  # hypergradient + Adam step
    best_phi: Tensor | None = None
    phis: list[Tensor] = field(default_factory=list, repr=False)  # not written to the JSON
    extras: dict[str, Any] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)

    def record(self, wall: float, cpu: float, val: float, phi: Tensor, budget: float) -> None:
        if wall > budget and self.val:  # the first evaluation (the common start) is kept
            self.dropped += 1
            return
        if not math.isfinite(val):
            self.failed += 1
            return
        if not self.val or val < min(self.val):
            self.best_phi = phi.detach().clone()
        self.wall.append(wall)
        self.cpu.append(cpu)
        self.val.append(val)
        self.phis.append(phi.detach().clone())

    @property
    def best(self) -> float:
        return min(self.val) if self.val else float("inf")

    def first_below(self, target: float) -> int | None:
        """Index of the first evaluation with validation loss <= target."""
        for i, v in enumerate(self.val):
            if v <= target:
                return i
        return None

    def time_to(self, target: float) -> tuple[float, float] | None:
        """(wall, cpu) seconds of the first evaluation with validation loss <= target."""
        i = self.first_below(target)
        return None if i is None else (self.wall[i], self.cpu[i])

    def best_so_far(self) -> list[float]:
        out, b = [], float("inf")
        for v in self.val:
            b = min(b, v)
            out.append(b)
        return out


@dataclass
class Evaluation:
    """What a step reports: the value, its hyperparameters and when the value was known."""

    val: float
    phi: Tensor
    wall: float  # time.perf_counter() when the validation loss was known
    cpu: float  # time.process_time() at the same moment


class Method:
    """A tuner that advances by one evaluation per :meth:`step`."""

    def __init__(self, key: str):
        self.run = Run(key)
        self.stopped = False

    def step(self) -> Evaluation:
        raise NotImplementedError

    def finish(self) -> None:
        pass


class OptunaMethod(Method):
    """Optuna ask/tell; each trial is one ``task.train`` with the trial's lambdas."""

    def __init__(self, task: Task, kind: str, seed: int):
        super().__init__(kind)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        sampler: optuna.samplers.BaseSampler
        if kind == "tpe":
            sampler = optuna.samplers.TPESampler(seed=seed)
        else:
            sampler = optuna.samplers.RandomSampler(seed=seed)
        self.study = optuna.create_study(direction="minimize", sampler=sampler)
        self.study.enqueue_trial({n: task.lam0 for n in task.names})  # the hypergradient's start
        self.task = task
        self.state = task.new_state()

    def step(self) -> Evaluation:
        task, run = self.task, self.run
        a = time.perf_counter()
        trial = self.study.ask()
        lam = [trial.suggest_float(n, task.lo, task.hi, log=True) for n in task.names]
        b = time.perf_counter()
        phi = torch.tensor(lam, dtype=F64).log()
        params = task.train(phi, self.state)
        val = task.val_loss(params)
        known = Evaluation(val, phi, time.perf_counter(), time.process_time())
        if math.isfinite(val):
            self.study.tell(trial, val)
        else:
            self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
        d = time.perf_counter()
        run.sampler_seconds += (b - a) + (d - known.wall)
        run.train_seconds += known.wall - b
        return known

    def finish(self) -> None:
        self.run.extras["trials_told"] = len(self.study.trials)


class HypergradientMethod(Method):
    """Adam on phi = log lambda with implicit hypergradients after each ``task.train``."""

    def __init__(self, task: Task):
        super().__init__("hypergradient")
        self.task = task
        self.phi = torch.full((task.n_hparams,), math.log(task.lam0), dtype=F64)
        self.phi.requires_grad_(True)
        self.opt = torch.optim.Adam([self.phi], lr=task.outer_lr)
        self.bounds = (math.log(task.lo), math.log(task.hi))
        self.state = task.new_state()
        self.cg_iters: list[int] = []
        self.statuses: dict[str, int] = {}
        self.n_warnings = 0
        self.grad_norms: list[float] = []

    def step(self) -> Evaluation:
        task, run = self.task, self.run
        a = time.perf_counter()
        phi = self.phi.detach().clone()
        params = task.train(phi, self.state)
        val = task.val_loss(params)
        known = Evaluation(val, phi, time.perf_counter(), time.process_time())
        run.train_seconds += known.wall - a
        if not math.isfinite(val):
            self.stopped = True
            return known
        hyper, diag = task.hypergradient(params, phi, self.state)
        self.opt.zero_grad()
        self.phi.grad = hyper
        self.opt.step()
        with torch.no_grad():
            self.phi.clamp_(*self.bounds)
        run.hyper_seconds += time.perf_counter() - known.wall
        self.cg_iters.append(diag["cg_iterations"])
        self.statuses[diag["status"]] = self.statuses.get(diag["status"], 0) + 1
        self.n_warnings += diag["warnings"]
        self.grad_norms.append(diag["inner_grad_norm"])
        return known

    def finish(self) -> None:
        norms = sorted(self.grad_norms)
        self.run.extras.update(
            outer_steps=len(self.cg_iters),
            cg_iterations_mean=sum(self.cg_iters) / max(len(self.cg_iters), 1),
            cg_status_counts=self.statuses,
            hypergradient_warnings=self.n_warnings,
            inner_grad_norm_median=norms[len(norms) // 2] if norms else float("nan"),
            inner_grad_norm_max=norms[-1] if norms else float("nan"),
        )


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on every platform
        return float("nan")


def advance(method: Method, budget: float) -> None:
    """One step of ``method``, timed on its own clock."""
    run = method.run
    w, c = time.perf_counter(), time.process_time()
    ev = method.step()
    w_end, c_end = time.perf_counter(), time.process_time()
    run.record(run.clock_wall + ev.wall - w, run.clock_cpu + ev.cpu - c, ev.val, ev.phi, budget)
    run.clock_wall += w_end - w
    run.clock_cpu += c_end - c
    if run.clock_wall >= budget:
        method.stopped = True


def race(methods: list[Method], budget: float, schedule: str) -> None:
    """Run every method until its own clock reaches ``budget``.

    ``interleaved``: always step the method whose clock is furthest behind, so that all
    clocks advance together and a change of the machine's load hits every method alike.
    ``sequential``: each method runs its whole budget, one after the other.
    """
    real0 = time.perf_counter()
    next_log = 10.0
    pending = list(methods)
    while pending:
        if schedule == "interleaved":
            current = min(pending, key=lambda m: m.run.clock_wall)
        else:
            current = pending[0]
        advance(current, budget)
        if current.stopped:
            pending.remove(current)
        if time.perf_counter() - real0 > next_log:
            next_log += 10.0
            log(
                "  "
                + "; ".join(
                    f"{LABELS[m.run.method]} {m.run.clock_wall:5.1f} s, {len(m.run.val)} evals, "
                    f"best {m.run.best:.4f}"
                    for m in methods
                )
            )
    for m in methods:
        m.finish()


def refit(task: Task, run: Run) -> None:
    """Retrain with the run's best hyperparameters (fresh state) and evaluate."""
    assert run.best_phi is not None
    params = task.train(run.best_phi, task.new_state())
    run.final = task.evaluate(params)
    lam = run.best_phi.exp()
    run.extras["best_lambda_min"] = float(lam.min())
    run.extras["best_lambda_median"] = float(lam.median())
    run.extras["best_lambda_max"] = float(lam.max())


def run_task(task: Task, budget: float, seed: int, schedule: str) -> dict[str, Any]:
    log(f"{task.title}: budget {budget:.0f} s per method, {schedule}")
    phi0 = torch.full((task.n_hparams,), math.log(task.lam0), dtype=F64)
    start = task.evaluate(task.train(phi0, task.new_state()))
    methods: list[Method] = [
        OptunaMethod(task, "tpe", seed),
        OptunaMethod(task, "random", seed),
        HypergradientMethod(task),
    ]
    load0, real0 = _loadavg(), time.perf_counter()
    race(methods, budget, schedule)
    real = time.perf_counter() - real0
    load1 = _loadavg()
    runs = {m.run.method: m.run for m in methods}
    for key, r in runs.items():
        refit(task, r)
        log(
            f"  {LABELS[key]:<14} {len(r.val)} evaluations, best val {r.best:.5f}, "
            f"test loss {r.final['test_loss']:.4f}"
        )
    targets = {}
    for owner in ("tpe", "random"):
        target = runs[owner].best
        reach = {k: runs[k].time_to(target) for k in METHODS}
        # Optuna's first trial is the start: if nothing beat it, there is no race to report.
        is_start = runs[owner].val.index(target) == 0
        # Same validation loss, different hyperparameters: which generalize better? The
        # hypergradient's hyperparameters at the moment it reached the target, retrained.
        i = runs["hypergradient"].first_below(target)
        at_target = None
        if i is not None:
            at_target = task.evaluate(task.train(runs["hypergradient"].phis[i], task.new_state()))
        targets[owner] = {
            "value": target,
            "reached": reach,
            "is_start": is_start,
            "hypergradient_at_target": at_target,
        }
    return {
        "key": task.key,
        "title": task.title,
        "n_hparams": task.n_hparams,
        "box": [task.lo, task.hi],
        "lam0": task.lam0,
        "outer_lr": task.outer_lr,
        "solver": task.solver_text,
        "training": task.training_text,
        "budget": budget,
        "schedule": schedule,
        "real_seconds": real,
        "load": [load0, load1],
        "start": start,
        "runs": runs,
        "targets": targets,
    }


# ============================================================================ reporting


def _fmt_time(t: tuple[float, float] | None) -> str:
    return "not reached" if t is None else f"{t[0]:.2f} s"


def _fmt_ratio(num: tuple[float, float] | None, den: tuple[float, float] | None, i: int) -> str:
    if num is None:
        return "-"
    if den is None:
        return "hypergradient did not reach it"
    return f"{num[i] / max(den[i], 1e-9):.1f}x"


def markdown_task(res: dict[str, Any]) -> str:
    runs: dict[str, Run] = res["runs"]
    lines = [
        f"## {res['title']}",
        "",
        f"- budget {res['budget']:.0f} s per method; search box lambda in "
        f"[{res['box'][0]:g}, {res['box'][1]:g}] (log-uniform for Optuna, clipped log-lambda "
        f"for the hypergradient); start lambda = {res['lam0']:g} everywhere (Optuna's "
        "first, enqueued trial)",
        f"- training (every evaluation, all methods): {res['training']}",
        f"- hypergradient: Adam(lr={res['outer_lr']}) on log lambda, hg.implicit with "
        f"{res['solver']}",
        f"- schedule: {res['schedule']}; {res['real_seconds']:.0f} s of real time for the "
        f"three methods; 1-min load average {res['load'][0]:.1f} before, "
        f"{res['load'][1]:.1f} after",
        "",
        "| method | evaluations | s / evaluation | sampler share | best val loss | found at "
        "| test loss | test acc | CPU / wall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    s = res["start"]
    lines.append(
        f"| start (lambda = {res['lam0']:g}) | 1 | | | {s['val_loss']:.4f} | | "
        f"{s['test_loss']:.4f} | {s['test_acc']:.3f} | |"
    )
    for m in METHODS:
        r = runs[m]
        n = len(r.val)
        per = r.clock_wall / max(n + r.dropped + r.failed, 1)
        share = r.sampler_seconds / r.clock_wall if m != "hypergradient" else None
        found = r.time_to(r.best)
        cpu_wall = r.clock_cpu / r.clock_wall
        lines.append(
            f"| {LABELS[m]} | {n} | {per:.3f} | "
            f"{'-' if share is None else f'{100 * share:.0f} %'} | {r.best:.4f} | "
            f"{_fmt_time(found)} | {r.final['test_loss']:.4f} | {r.final['test_acc']:.3f} | "
            f"{cpu_wall:.2f} |"
        )
    lines += [
        "",
        "Time to reach each Optuna sampler's best validation loss (its value at the end of "
        "its budget); ratio = that sampler's time to its best / the hypergradient method's "
        "time to the same value; last columns: test loss / accuracy, retrained, of the "
        "sampler's best hyperparameters and of the hypergradient's hyperparameters at the "
        "evaluation where it first reached the target (same validation loss or lower):",
        "",
        "| target | value | Optuna TPE | Optuna random | hypergradient | ratio (wall) "
        "| ratio (CPU) | test loss / acc: Optuna's best | hypergradient at the target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for owner, t in res["targets"].items():
        reach = t["reached"]
        if t["is_start"]:
            ratios = "n/a: no improvement on the start | n/a"
        else:
            ratios = (
                f"{_fmt_ratio(reach[owner], reach['hypergradient'], 0)} "
                f"| {_fmt_ratio(reach[owner], reach['hypergradient'], 1)}"
            )
        fo, ht = runs[owner].final, t["hypergradient_at_target"]
        tests = f"{fo['test_loss']:.4f} / {fo['test_acc']:.3f} | " + (
            "-" if ht is None else f"{ht['test_loss']:.4f} / {ht['test_acc']:.3f}"
        )
        lines.append(
            f"| {LABELS[owner]}'s best | {t['value']:.4f} | "
            + " | ".join(_fmt_time(reach[m]) for m in METHODS)
            + f" | {ratios} | {tests} |"
        )
    h = runs["hypergradient"]
    hb = h.best
    opt_reach = ", ".join(
        f"{LABELS[m]} {_fmt_time(runs[m].time_to(hb))}" for m in ("tpe", "random")
    )
    e = h.extras
    start_val = runs["tpe"].val[0]  # every method's first evaluation is the start

    below_start = math.nextafter(start_val, 0.0)

    def first_gain(r: Run) -> str:
        i = r.first_below(below_start)
        return "never" if i is None else f"at {r.wall[i]:.2f} s (evaluation {i + 1})"

    others = [
        f"{LABELS[m]} {min(runs[m].val[1:]):.4f}" if len(runs[m].val) > 1 else f"{LABELS[m]} -"
        for m in METHODS
    ]
    lines += [
        "",
        f"- first evaluation better than the start ({start_val:.4f}): "
        + ", ".join(f"{LABELS[m]} {first_gain(runs[m])}" for m in METHODS)
        + "; best evaluation other than the start: "
        + ", ".join(others)
        + ".",
        f"- hypergradient's own best, {hb:.4f}, reached by: {opt_reach}.",
        f"- hypergradient: {e['outer_steps']} outer steps, CG {e['cg_iterations_mean']:.1f} "
        f"iterations per step on average, CG status counts {e['cg_status_counts']}, "
        f"{e['hypergradient_warnings']} HypergradientWarning(s) (negative curvature: partial "
        f"CG solution used), inner gradient norm median {e['inner_grad_norm_median']:.1e} "
        f"(max {e['inner_grad_norm_max']:.1e}).",
        "- time split: "
        + "; ".join(
            f"{LABELS[m]} training {runs[m].train_seconds:.1f} s, "
            + (
                f"sampler {runs[m].sampler_seconds:.1f} s"
                if m != "hypergradient"
                else f"hypergradient + Adam {runs[m].hyper_seconds:.1f} s"
            )
            for m in METHODS
        )
        + " (evaluations finishing after the budget dropped: "
        + ", ".join(f"{LABELS[m]} {runs[m].dropped}" for m in METHODS)
        + ").",
        "- best lambdas (min / median / max): "
        + "; ".join(
            f"{LABELS[m]} {runs[m].extras['best_lambda_min']:.1e} / "
            f"{runs[m].extras['best_lambda_median']:.1e} / "
            f"{runs[m].extras['best_lambda_max']:.1e}"
            for m in METHODS
        )
        + ".",
        "- refit check: the best hyperparameters retrained from a fresh state give validation "
        "loss "
        + ", ".join(
            f"{LABELS[m]} {runs[m].final['val_loss']:.6f} (recorded {runs[m].best:.6f})"
            for m in METHODS
        )
        + ".",
    ]
    return "\n".join(lines)


def markdown_summary(results: list[dict[str, Any]]) -> str:
    lines = [
        "## Summary: time-to-target ratios (Optuna's time to its best / hypergradient's time "
        "to the same validation loss)",
        "",
        "| task | hyperparameters | vs TPE (wall) | vs TPE (CPU) | vs random (wall) "
        "| vs random (CPU) | best val: TPE / random / hypergradient |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        runs = res["runs"]
        cells = []
        for owner in ("tpe", "random"):
            t = res["targets"][owner]
            if t["is_start"]:
                cells += ["n/a (no improvement on the start)", "n/a"]
                continue
            reach = t["reached"]
            cells += [_fmt_ratio(reach[owner], reach["hypergradient"], i) for i in (0, 1)]
        bests = " / ".join(f"{runs[m].best:.4f}" for m in METHODS)
        lines.append(
            f"| {res['key']} | {res['n_hparams']:,} | " + " | ".join(cells) + f" | {bests} |"
        )
    return "\n".join(lines)


def run_json(run: Run) -> dict[str, Any]:
    """A :class:`Run` as JSON data: its best-so-far curve and best lambdas, not every phi."""
    d = {k: v for k, v in vars(run).items() if k not in ("best_phi", "phis")}
    d["best_so_far"] = run.best_so_far()
    d["best_lambda"] = None if run.best_phi is None else run.best_phi.exp().tolist()
    return d


def plot(data: dict[str, Any], out: Path) -> Path:
    """Best validation loss so far against each method's wall clock, per task."""
    colors = {"tpe": "tab:blue", "random": "tab:orange", "hypergradient": "tab:green"}
    tasks = data["tasks"]
    fig, axes = pyplot().subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.2), squeeze=False)
    for ax, res in zip(axes[0], tasks):
        for m in METHODS:
            r = res["runs"][m]
            best = min(r["val"])
            ax.step(
                [*r["wall"], res["budget"]],
                [*r["best_so_far"], best],
                where="post",
                color=colors[m],
                label=f"{LABELS[m]} ({len(r['val'])})",
            )
            ax.plot(
                [next(w for w, v in zip(r["wall"], r["val"]) if v <= best)],
                [best],
                "o",
                ms=4,
                color=colors[m],
            )
        for owner in ("tpe", "random"):
            ax.axhline(res["targets"][owner]["value"], color=colors[owner], ls=":", lw=0.8)
        left = min(min(res["runs"][m]["wall"]) for m in METHODS) * 0.8
        ax.set(
            xscale="log",
            xlim=(left, res["budget"]),
            xlabel="wall time (s)",
            ylabel="best validation loss so far",
            title=f"{res['key']}: {res['n_hparams']:,} hyperparameters",
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, title="method (evaluations)", title_fontsize=8)
    fig.suptitle(
        "Best validation loss so far against wall time, same budget per method "
        "(dot: best found; dotted: Optuna's final bests)",
        fontsize=10,
    )
    return save_figure(fig, out / "vs_optuna.png")


def main(argv: Sequence[str] | None = None) -> int:
    p = cli(__doc__)
    p.add_argument("--budget-logreg", type=float, help="seconds per method, task 1 (default 90)")
    p.add_argument("--budget-mlp", type=float, help="seconds per method, task 2 (default 150)")
    p.add_argument("--tasks", nargs="+", choices=("logreg", "mlp", "mlp-layer"))
    p.add_argument("--schedule", choices=("interleaved", "sequential"), default="interleaved")
    p.add_argument("--lbfgs-iters", type=int, default=200, help="inner L-BFGS iterations (MLP)")
    args = p.parse_args(argv)
    if rp.replot(args, "vs_optuna", plot):
        return 0
    start(args)
    optuna, version = import_peer("optuna")
    budget_logreg = args.budget_logreg or (1.0 if args.quick else 90.0)
    budget_mlp = args.budget_mlp or (1.0 if args.quick else 150.0)
    tasks = args.tasks or (["logreg"] if args.quick else ["logreg", "mlp", "mlp-layer"])
    rep = Report(
        "vs_optuna",
        "Against black-box search: Optuna (TPE, random) vs hypergradient descent",
        args,
        optuna=version if optuna else None,
    )
    if optuna is None:
        rep.note(f"**Optuna is not importable ({version}): the comparison is SKIPPED.**")
        rep.section("Nothing run.")
        rep.write({"budgets": {}, "tasks": []})
        return 0
    rep.note(
        "budgets per method: "
        + ", ".join(f"{t} {budget_logreg if t == 'logreg' else budget_mlp:g} s" for t in tasks),
        f"the three methods run in this one process, {args.schedule}: "
        + (
            "one evaluation at a time, always the method whose own clock is furthest behind, so "
            "load changes hit all three alike; each method's time is the sum of its own steps"
            if args.schedule == "interleaved"
            else "each method's whole budget, one after the other (TPE, random, hypergradient)"
        )
        + "; wall times on a shared machine are noisy, so CPU-time ratios are given too",
        "every evaluation (Optuna trial or outer step) = one full training with the same code, "
        "value = validation loss; best hyperparameters retrained and tested",
    )
    results = []
    for key in tasks:
        if key == "logreg":
            task: Task = LogRegTask(args.seed)
        else:
            task = MLPTask(args.seed, per_tensor=key == "mlp-layer", lbfgs_iters=args.lbfgs_iters)
        results.append(
            run_task(
                task, budget_logreg if key == "logreg" else budget_mlp, args.seed, args.schedule
            )
        )
        rep.section(markdown_task(results[-1]))
    rep.section(markdown_summary(results))
    for res in results:
        res["runs"] = {k: run_json(r) for k, r in res["runs"].items()}
    rep.write({"budgets": {"logreg": budget_logreg, "mlp": budget_mlp}, "tasks": results}, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
