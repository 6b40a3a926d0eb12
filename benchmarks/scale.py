"""Seconds and peak memory of one hypergradient as the model and the hyperparameters grow.

A tanh MLP 784-h-h-10 on MNIST: (1) P from ~1e4 to ~1e6 parameters with one decay each, (2) m
hyperparameters from 1 to P at ~1e5 parameters, (3) memory vs inner steps T (with glibc's default
malloc and with every block mmapped). Every configuration runs alone in a fresh child process
(harness.runner.isolated) and its peak is harness.runner.peak_memory. Settings: README.md.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
import statistics
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import hypergradient as hg
from harness import Report, cli, log, problems, runner, start
from harness import report as rp
from harness.report import pyplot, save_figure
from harness.runner import error_text

F = torch.nn.functional

IN, OUT, BATCH = 784, 10, 256
LR, MOMENTUM, LOG_DECAY = 0.05, 0.9, math.log(1e-3)
IMPLICIT = ("CG", "Neumann", "Nystrom", "NystromPCG", "T1T2")
TRAJECTORY = ("unrolled", "unrolled ckpt", "DrMAD", "forward")
LONG_CALL = 15.0  # seconds: a slower first call is the only one (no warm-up)
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def param_count(width: int) -> int:
    """Parameters of the MLP 784-width-width-10."""
    return IN * width + width + width * width + width + width * OUT + OUT


def width_for(target: float) -> int:
    """The width whose parameter count is closest to ``target``."""
    guess = (-(IN + 1 + 1 + OUT) + math.sqrt((IN + 2 + OUT) ** 2 + 4 * (target - OUT))) / 2
    return min(
        (max(1, int(guess) + d) for d in (-1, 0, 1, 2)), key=lambda w: abs(param_count(w) - target)
    )


@dataclass
class Config:
    """One measurement: a method on one problem.

    ``hparams``: "per-weight" (one decay per parameter, plus lr and momentum for the
    trajectory methods), "per-layer" (one decay per layer tensor, plus lr and momentum) or
    an int m (m groups of weights sharing a decay; lr and momentum fixed).
    """

    experiment: str
    method: str
    width: int
    hparams: str | int
    steps: int = 20
    checkpoint_every: int | None = None
    repeats: int = 5
    budget: float = 3.0  # seconds of timed calls after the measured one
    timeout: float = 600.0
    malloc: str = "default"  # "mmap": every allocation >= 4 kB gets its own mapping

    @property
    def params(self) -> int:
        return param_count(self.width)

    @property
    def num_hparams(self) -> int:
        extra = 0 if self.method in IMPLICIT or self.method == "gradient" else 2
        if self.hparams == "per-weight":
            return self.params + extra
        if self.hparams == "per-layer":
            return 6 + extra
        return int(self.hparams)


@dataclass
class Result:
    config: Config
    ok: bool = True
    error: str = ""
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    first_call: float = float("nan")
    peak_mb: float = float("nan")
    first_peak_mb: float = float("nan")
    rss_before_mb: float = float("nan")
    peak_reset: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    child_seconds: float = float("nan")

    @property
    def seconds(self) -> float:
        return statistics.median(self.wall) if self.wall else float("nan")

    @property
    def cpu_seconds(self) -> float:
        return statistics.median(self.cpu) if self.cpu else float("nan")


# ------------------------------------------------------------------ the problem (child)


def _init_params(width: int, gen: torch.Generator) -> dict[str, Tensor]:
    shapes = {
        "W1": (IN, width),
        "b1": (width,),
        "W2": (width, width),
        "b2": (width,),
        "W3": (width, OUT),
        "b3": (OUT,),
    }
    out = {}
    for k, s in shapes.items():
        if k.startswith("W"):
            out[k] = torch.randn(s, generator=gen) / math.sqrt(s[0])
        else:
            out[k] = torch.zeros(s)
    return out


def _logits(p: dict[str, Tensor], x: Tensor) -> Tensor:
    h = torch.tanh(x @ p["W1"] + p["b1"])
    h = torch.tanh(h @ p["W2"] + p["b2"])
    return h @ p["W3"] + p["b3"]


class Problem:
    """Data, initial weights, hyperparameters and losses for one configuration."""

    def __init__(self, cfg: Config, data_dir: str):
        data = np.load(os.path.join(data_dir, "mnist.npz"))
        X = torch.from_numpy(data["X"])
        y = torch.from_numpy(data["y"])
        n_train = X.shape[0] - 1000
        self.x_train, self.y_train = X[:n_train], y[:n_train]
        self.x_in, self.y_in = X[:BATCH], y[:BATCH]
        self.x_val, self.y_val = X[n_train : n_train + BATCH], y[n_train : n_train + BATCH]
        gen = torch.Generator().manual_seed(0)
        self.params = _init_params(cfg.width, gen)
        self.lam_max = float("nan")
        self.damping = 0.0
        trained = os.path.join(data_dir, f"trained_{cfg.width}.npz")
        if cfg.method in IMPLICIT and os.path.exists(trained):
            saved = np.load(trained)
            self.params = {k: torch.from_numpy(saved[k]) for k in self.params}
            self.lam_max = float(saved["lam_max"])
            self.damping = float(saved["damping"])
        self.keys = list(self.params)
        self.cfg = cfg
        P = cfg.params
        self.group: Tensor | None = None
        trajectory = cfg.method in TRAJECTORY
        if cfg.hparams == "per-weight":
            h: dict[str, Any] = {
                "log_decay": {k: torch.full_like(v, LOG_DECAY) for k, v in self.params.items()}
            }
        elif cfg.hparams == "per-layer":
            h = {"log_decay": {k: torch.tensor(LOG_DECAY) for k in self.params}}
        else:
            m = int(cfg.hparams)
            h = {"log_decay": torch.full((m,), LOG_DECAY)}
            # contiguous blocks of weights share a decay (m = P: one each)
            self.group = torch.arange(P) * m // P
        if trajectory and not isinstance(cfg.hparams, int):
            h["lr"] = torch.tensor(LR)
            h["momentum"] = torch.tensor(MOMENTUM)
        self.hparams = h
        # the batches of the trajectory: views into the training pool, one per step
        starts = [(t * BATCH) % (n_train - BATCH) for t in range(cfg.steps)]
        self.batches = [(self.x_train[s : s + BATCH], self.y_train[s : s + BATCH]) for s in starts]

    def penalty(self, p: dict[str, Tensor], h: dict[str, Any]) -> Tensor:
        ld = h["log_decay"]
        if isinstance(ld, dict):
            return 0.5 * sum((ld[k].exp() * p[k] ** 2).sum() for k in self.keys)
        flat = torch.cat([p[k].reshape(-1) for k in self.keys])
        return 0.5 * (ld.exp()[self.group] * flat**2).sum()

    def inner(self, p: dict[str, Tensor], h: dict[str, Any]) -> Tensor:
        return F.cross_entropy(_logits(p, self.x_in), self.y_in) + self.penalty(p, h)

    def inner_batch(self, p: dict[str, Tensor], h: dict[str, Any], batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(_logits(p, x), y) + self.penalty(p, h)

    def outer(self, p: dict[str, Tensor], h: dict[str, Any]) -> Tensor:
        return F.cross_entropy(_logits(p, self.x_val), self.y_val)

    def optimizer(self) -> hg.optim.SGD:
        h = self.hparams
        return hg.optim.sgd(lr=h.get("lr", LR), momentum=h.get("momentum", MOMENTUM))


def _implicit_solver(name: str, prob: Problem) -> hg.Solver:
    if name == "CG":
        return hg.CG(maxiter=20, tol=0.0)
    if name == "Neumann":
        return hg.Neumann(iters=20, alpha=1.0 / (prob.lam_max + prob.damping))
    if name == "Nystrom":
        return hg.Nystrom(rank=20, rho=0.1, chunk_size=5, seed=0)
    if name == "NystromPCG":
        return hg.NystromPCG(rank=10, maxiter=10, tol=0.0, chunk_size=5, seed=0)
    if name == "T1T2":
        return hg.Identity(LR)
    raise ValueError(name)


def _make_call(cfg: Config, prob: Problem) -> Callable[[bool], Any]:
    """``call(info)`` computes one hypergradient (``info``: with diagnostics)."""
    if cfg.method == "gradient":
        leaves = {k: v.detach().requires_grad_(True) for k, v in prob.params.items()}

        def grad(info: bool) -> Any:
            return torch.autograd.grad(prob.inner(leaves, prob.hparams), list(leaves.values()))

        return grad
    if cfg.method in IMPLICIT:
        solver = _implicit_solver(cfg.method, prob)

        def implicit(info: bool) -> Any:
            return hg.implicit(
                prob.inner,
                prob.outer,
                prob.params,
                prob.hparams,
                solver,
                damping=prob.damping,
                return_info=info,
            )

        return implicit
    fn = {"unrolled": hg.unrolled, "unrolled ckpt": hg.unrolled, "DrMAD": hg.drmad}.get(
        cfg.method, hg.forward_mode
    )
    kwargs: dict[str, Any] = {}
    if cfg.method == "unrolled ckpt":
        kwargs["checkpoint_every"] = cfg.checkpoint_every

    def trajectory(info: bool) -> Any:
        return fn(
            prob.inner_batch,
            prob.outer,
            prob.params,
            prob.hparams,
            steps=cfg.steps,
            optimizer=prob.optimizer(),
            batches=prob.batches,
            return_info=True,  # free for trajectory methods: the info holds theta_T anyway
            **kwargs,
        )

    return trajectory


def _summary(out: Any) -> dict[str, Any]:
    if not isinstance(out, tuple) or len(out) != 2:
        return {}
    info = out[1]
    if isinstance(info, hg.HypergradInfo):
        return {"num_hvps": info.num_hvps, "status": info.status}
    if isinstance(info, hg.TrajectoryInfo):
        return {
            "stored_states": info.stored_states,
            "recomputed_steps": info.recomputed_steps,
            "outer_loss": info.outer_loss,
        }
    return {}


def _timed(call: Callable[[bool], Any], info: bool) -> tuple[Any, float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    out = call(info)
    return out, time.perf_counter() - t0, time.process_time() - c0


def measure(cfg: Config, data_dir: str) -> Result:
    """In a fresh child: a first call (diagnostics, first-call time and peak), then the
    measured call (peak), then repeats within the time budget."""
    started, res = time.perf_counter(), Result(cfg)
    gc.freeze()  # the imported modules' objects: gc.collect() need not walk them (~0.3 s)
    try:
        torch.manual_seed(0)
        if cfg.malloc == "mmap":
            runner.mmap_every_block()
        prob = Problem(cfg, data_dir)
        call = _make_call(cfg, prob)
        out, wall, cpu, res.first_peak_mb = runner.peak_memory(lambda: call(True))
        res.first_call, res.info, res.peak_reset = wall, _summary(out), True
        del out
        if wall > LONG_CALL:  # the first call is the measurement
            res.wall, res.cpu, res.peak_mb = [wall], [cpu], res.first_peak_mb
        else:
            _, wall, cpu, res.peak_mb = runner.peak_memory(lambda: call(False))
            res.wall, res.cpu = [wall], [cpu]
            while len(res.wall) < cfg.repeats and sum(res.wall) + res.wall[-1] <= cfg.budget:
                _, wall, cpu = runner.timed_call(lambda: call(False))
                res.wall.append(wall / 1e3)
                res.cpu.append(cpu / 1e3)
    except Exception as exc:  # reported, not raised: the sweep goes on
        res.ok, res.error = False, error_text(exc)
    res.child_seconds = time.perf_counter() - started
    return res


def run_one(cfg: Config, data_dir: str) -> Result:
    try:
        return runner.isolated(measure, cfg, data_dir, timeout=cfg.timeout)
    except RuntimeError as exc:
        return Result(cfg, ok=False, error=str(exc))


def _progress(res: Result) -> None:
    c = res.config
    what = f"{c.experiment:8s} {c.method:14s} P={c.params:>9,} m={c.num_hparams:>9,} T={c.steps:>3}"
    if res.ok:
        msg = (
            f"{res.seconds:8.3f} s  peak {res.peak_mb:8.1f} MB  "
            f"({res.child_seconds:.1f} s in child)"
        )
    else:
        msg = f"FAILED: {res.error}"
    log(f"  {what}  {msg}")


def _predict(points: list[tuple[int, float]], m: int) -> float:
    """Straight-line extrapolation in m of the last two (m, seconds) points."""
    if len(points) == 1:
        return points[0][1] * m / points[0][0]
    (m1, t1), (m2, t2) = points[-2:]
    slope = max((t2 - t1) / (m2 - m1), 0.0)
    return t2 + slope * (m - m2)


def pretrain(width: int, data_dir: str, steps: int) -> dict[str, float]:
    """Train the MLP on the inner batch (Adam) for the implicit methods; save it with lambda_max.

    Implicit differentiation assumes an inner minimum: at the random initial weights the
    Hessian has eigenvalues near -17 and CG stops at the first negative curvature instead
    of spending its budget. After training some negative curvature may remain (the inner
    problem is not convex); the implicit methods get the smallest damping that hides it.
    """
    t0 = time.perf_counter()
    prob = Problem(Config("pretrain", "gradient", width, "per-weight"), data_dir)
    # hg.optim.adam is torch.optim.Adam's rule without torch.optim's import of torch._dynamo
    opt = hg.optim.adam(lr=3e-3)
    leaves = list(prob.params.values())
    state = opt.init(leaves)
    for t in range(steps):
        leaves = [v.detach().requires_grad_(True) for v in leaves]
        loss = prob.inner(dict(zip(prob.keys, leaves)), prob.hparams)
        grads = torch.autograd.grad(loss, leaves)
        with torch.no_grad():
            leaves, state = opt.update([v.detach() for v in leaves], list(grads), state, t)
    params = dict(zip(prob.keys, leaves))
    op = hg.HessianOperator(prob.inner, params, prob.hparams)
    lam_max = hg.estimate_lambda_max(op, iters=30, generator=torch.Generator().manual_seed(0))
    grad_norm = float(torch.linalg.vector_norm(op.grad))
    op.release()
    # The smallest damping (1e-4, doubled as needed) at which the CG-type solvers meet no
    # negative curvature within their budget at these weights.
    damping = 1e-4
    while damping < lam_max:
        statuses = []
        for name in ("CG", "NystromPCG"):  # fresh solvers: the children's seeded sketch
            solver = _implicit_solver(name, prob)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", hg.HypergradientWarning)
                _, info = hg.implicit(
                    prob.inner,
                    prob.outer,
                    params,
                    prob.hparams,
                    solver,
                    damping=damping,
                    return_info=True,
                )
            statuses.append(info.status)
        if "negative_curvature" not in statuses:
            break
        damping *= 2
    saved = {k: v.numpy() for k, v in params.items()}
    np.savez(
        os.path.join(data_dir, f"trained_{width}.npz"),
        lam_max=np.float64(lam_max),
        damping=np.float64(damping),
        **saved,
    )
    return {
        "seconds": time.perf_counter() - t0,
        "grad_norm": grad_norm,
        "lambda_max": lam_max,
        "damping": damping,
    }


def sweep_params(
    run: Callable[[Config], Result], targets: list[float], common: dict
) -> list[Result]:
    rows = []
    for target in targets:
        w = width_for(target)
        for method in ("gradient",) + IMPLICIT + TRAJECTORY:
            hparams = "per-layer" if method == "forward" else "per-weight"
            cfg = Config(
                "params", method, w, hparams, checkpoint_every=round(math.sqrt(20)), **common
            )
            rows.append(run(cfg))
    return rows


def sweep_hparams(
    run: Callable[[Config], Result],
    width: int,
    counts: list[int],
    methods: tuple[str, ...],
    cap: float,
    common: dict,
) -> tuple[list[Result], str]:
    rows: list[Result] = []
    forward_points: list[tuple[int, float]] = []
    stopped = ""
    for m in counts:
        for method in methods:
            cfg = Config("hparams", method, width, m, **common)
            if method == "forward":
                cfg.timeout = 3 * cap + 30
                if not stopped and forward_points:
                    guess = _predict(forward_points, m)
                    if guess > cap:
                        stopped = (
                            f"forward mode stopped at m = {m:,}: the line through the last "
                            f"measurements predicts {guess:.0f} s > cap {cap:.0f} s"
                        )
                if stopped:
                    rows.append(Result(cfg, ok=False, error="skipped: " + stopped))
                    continue
            rows.append(run(cfg))
            res = rows[-1]
            if method == "forward":
                if not res.ok:
                    stopped = f"forward mode stopped at m = {m:,} ({res.error})"
                elif res.seconds > cap:
                    stopped = (
                        f"forward mode stopped after m = {m:,}: "
                        f"{res.seconds:.0f} s > cap {cap:.0f} s"
                    )
                else:
                    forward_points.append((m, res.seconds))
    return rows, stopped


def sweep_steps(
    run: Callable[[Config], Result],
    width: int,
    steps: list[int],
    mallocs: tuple[str, ...],
    common: dict,
) -> list[Result]:
    rows = []
    for malloc in mallocs:
        for T in steps:
            for method in ("unrolled", "unrolled ckpt", "DrMAD"):
                c = max(1, round(math.sqrt(T)))
                cfg = Config(
                    "steps",
                    method,
                    width,
                    "per-weight",
                    steps=T,
                    checkpoint_every=c,
                    malloc=malloc,
                    **common,
                )
                rows.append(run(cfg))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = cli(__doc__)
    p.add_argument("--cap", type=float, default=None, help="forward-mode time cap (s)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per configuration")
    p.add_argument(
        "--experiments",
        nargs="+",
        choices=["params", "hparams", "steps"],
        default=["params", "hparams", "steps"],
    )
    p.add_argument("--sizes", nargs="+", type=float, default=None, help="target P values")
    args = p.parse_args(argv)
    if rp.replot(args, "scale", plot_json):
        return 0
    start(args)
    quick = args.quick
    cap = args.cap if args.cap is not None else (2.0 if quick else 60.0)
    common = {"repeats": args.repeats or (1 if quick else 5), "budget": 0.2 if quick else 3.0}
    targets = args.sizes or ([3e3] if quick else [1e4, 3e4, 1e5, 3e5, 1e6])
    mid_width = width_for(3e3 if quick else 1e5)
    mid_P = param_count(mid_width)
    counts = [m for m in ([] if quick else [1, 10, 100, 1000, 10_000]) if m < mid_P] + [mid_P]
    hp_methods = ("CG", "forward") if quick else IMPLICIT + ("unrolled", "DrMAD", "forward")
    step_list = [2] if quick else [10, 20, 40, 80, 160]
    rep = Report(
        "scale", "Seconds and peak memory of one hypergradient", args, threads_in_children=1
    )
    tmp = tempfile.mkdtemp(prefix="hg_scale_")
    X, y = problems.mnist()
    np.savez(os.path.join(tmp, "mnist.npz"), X=X.numpy(), y=y.numpy())
    pretrained: dict[int, dict[str, float]] = {}
    widths = {width_for(t) for t in targets} if "params" in args.experiments else set()
    if "hparams" in args.experiments:
        widths.add(mid_width)
    for w in sorted(widths):
        pretrained[w] = pre = pretrain(w, tmp, 20 if quick else 300)
        log(
            f"  pretrained P={param_count(w):,} in {pre['seconds']:.1f} s: ||grad f|| = "
            f"{pre['grad_norm']:.2g}, lambda_max = {pre['lambda_max']:.3g}, damping "
            f"{pre['damping']:.2g}"
        )

    def run(cfg: Config) -> Result:
        if quick:
            cfg.steps = min(cfg.steps, 4)
        res = run_one(cfg, tmp)
        _progress(res)
        return res

    results: dict[str, list[Result]] = {}
    stopped = ""
    try:
        if "params" in args.experiments:
            results["params"] = sweep_params(run, targets, common)
        if "hparams" in args.experiments:
            results["hparams"], stopped = sweep_hparams(
                run, mid_width, counts, hp_methods, cap, common
            )
        if "steps" in args.experiments:
            mallocs = ("default",) if quick else ("default", "mmap")
            results["steps"] = sweep_steps(run, mid_width, step_list, mallocs, common)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    md = report(
        results, rep.machine, quick, cap, time.perf_counter() - rep.started, stopped, pretrained
    )
    rep.section(md.split("\n", 2)[2])
    payload = {
        "mode": "quick" if quick else "full",
        "cap_seconds": cap,
        "forward_stopped": stopped,
        "pretrained": {str(param_count(w)): v for w, v in pretrained.items()},
        "results": {
            k: [
                {
                    **asdict(r),
                    "params": r.config.params,
                    "num_hparams": r.config.num_hparams,
                    "seconds": r.seconds,
                    "cpu_seconds": r.cpu_seconds,
                }
                for r in v
            ]
            for k, v in results.items()
        },
    }
    rep.write(payload, plot_json)
    return 0


def plot_json(data: dict[str, Any], out: Path) -> Path:
    """The three figures, from the JSON results."""
    fields = set(Result.__dataclass_fields__) - {"config"}
    results = {
        k: [Result(Config(**r["config"]), **{f: r[f] for f in fields if f in r}) for r in rows]
        for k, rows in data["results"].items()
    }
    for rows in results.values():
        for r in rows:
            r.peak_mb = float("nan") if r.peak_mb is None else r.peak_mb
    plot(results, out, data["cap_seconds"], data["forward_stopped"])
    return out / "scale_params.png"


# ------------------------------------------------------------------ reporting


def _table_row(r: Result, unit: float | None, key: str) -> str:
    c = r.config
    if not r.ok:
        return f"| {key} | {c.method} | {c.num_hparams:,} | {r.error} |  |  |  |  |  |"
    extra = ""
    if "num_hvps" in r.info:
        extra = f"{r.info['num_hvps']} hvps, {r.info['status']}"
    elif "stored_states" in r.info:
        extra = f"{r.info['stored_states']} states"
        if r.info.get("recomputed_steps"):
            extra += f", {r.info['recomputed_steps']} recomputed"
    grads = f"{r.cpu_seconds / unit:.1f}" if unit else ""
    xp = r.peak_mb * 2**20 / (4 * c.params)
    return (
        f"| {key} | {c.method} | {c.num_hparams:,} | {r.seconds:.4g} | {r.cpu_seconds:.4g} | "
        f"{grads} | {r.peak_mb:.1f} | {xp:.1f} | {extra} |"
    )


def _loglog_slope(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return float("nan")
    x = np.log([p[0] for p in points])
    y = np.log([max(p[1], 1e-9) for p in points])
    return float(np.polyfit(x, y, 1)[0])


def _slopes(rows: list[Result], x: Callable[[Result], float], name: str, top: float) -> list[str]:
    """Log-log slopes of time and memory against ``x``: 0 flat, 1 linear."""
    out = [
        f"Log-log slopes (least squares; 0 = flat, 1 = linear in {name}), over all points and "
        f"over {name} >= {top:g}:",
        "",
        f"| method | wall, all | CPU, all | memory, all | wall, {name} >= {top:g} | "
        f"CPU, {name} >= {top:g} | memory, {name} >= {top:g} |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    methods = list(dict.fromkeys(r.config.method for r in rows))
    for method in methods:
        ok = [r for r in rows if r.ok and r.config.method == method]
        cells = []
        for part in (ok, [r for r in ok if x(r) >= top]):
            for y in (
                lambda r: r.seconds,
                lambda r: r.cpu_seconds,
                lambda r: r.peak_mb,
            ):
                cells.append(_loglog_slope([(x(r), y(r)) for r in part]))
        out.append(f"| {method} | " + " | ".join(_fmt_slope(c) for c in cells) + " |")
    return out + [""]


def _fmt_slope(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{x:.2f}"


def report(
    results: dict[str, list[Result]],
    machine: dict[str, Any],
    quick: bool,
    cap: float,
    wall: float,
    stopped: str = "",
    pretrained: dict[int, dict[str, float]] | None = None,
) -> str:
    head = "| {} | method | hparams | wall s | CPU s | in grads | peak MB | xP | notes |"
    rule = "|---:|---|---:|---:|---:|---:|---:|---:|---|"
    lines = [
        "# Seconds and peak memory of one hypergradient",
        "",
        "machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()),
        f"mode: {'quick' if quick else 'full'}; wall time {wall:.0f} s; "
        "tanh MLP 784-h-h-10 on MNIST, batch 256; median of the timed calls; "
        "peak MB = peak RSS during the call minus RSS before it (fresh process each); "
        "xP = peak / (4 bytes x P).",
        "",
    ]
    if "params" in results:
        lines += [
            "## Time and memory vs number of parameters P (one decay per parameter)",
            "",
            "Implicit: 20 products (T1T2: 0). Trajectory: T = 20 SGD-momentum steps, "
            "hyperparameters = per-weight decay + lr + momentum (forward mode: per-layer "
            "decay + lr + momentum). `in grads`: CPU time / CPU time of one gradient at that P.",
            "",
            "Implicit methods run at weights trained on the inner batch, with the smallest "
            "damping (1e-4, doubled as needed) at which CG and NystromPCG meet no negative "
            "curvature there:",
            "",
            *[
                f"- P = {param_count(w):,}: ||grad f|| = {v['grad_norm']:.2g}, lambda_max = "
                f"{v['lambda_max']:.3g}, damping {v['damping']:.2g}"
                for w, v in sorted((pretrained or {}).items())
            ],
            "",
            head.format("P"),
            rule,
        ]
        unit: dict[int, float] = {}
        for r in results["params"]:
            if r.config.method == "gradient" and r.ok:
                unit[r.config.params] = r.cpu_seconds
        for r in results["params"]:
            lines.append(_table_row(r, unit.get(r.config.params), f"{r.config.params:,}"))
        lines += ["", *_slopes(results["params"], lambda r: r.config.params, "P", 1e5)]
    if "hparams" in results:
        rs = results["hparams"]
        P = rs[0].config.params if rs else 0
        lines += [
            f"## Time and memory vs number of hyperparameters m (P = {P:,})",
            "",
            "m contiguous groups of weights share a decay; T = 20 for the trajectory "
            f"methods (lr, momentum fixed). Forward-mode time cap: {cap:.0f} s.",
            "",
            head.format("m"),
            rule,
        ]
        for r in rs:
            lines.append(_table_row(r, None, f"{r.config.num_hparams:,}"))
        lines += ["", *_slopes(rs, lambda r: r.config.num_hparams, "m", 10)]
        if stopped:
            lines += [stopped + ".", ""]
    if "steps" in results:
        rs = results["steps"]
        P = rs[0].config.params if rs else 0
        state_mb = 2 * 4 * P / 2**20
        lines += [
            f"## Memory vs number of inner steps T (P = {P:,}, per-weight decay)",
            "",
            "`unrolled ckpt`: checkpoint_every = round(sqrt(T)). A stored state is 2P floats "
            f"(parameters + momentum, {state_mb:.2f} MB), so unrolled should grow by about 2 xP "
            "per step. `MB/step`: slope of a least-squares line through (T, peak MB).",
        ]
        for malloc in ("default", "mmap"):
            part = [r for r in rs if r.config.malloc == malloc]
            if not part:
                continue
            title = (
                "glibc malloc as configured by default"
                if malloc == "default"
                else "mallopt(M_MMAP_THRESHOLD, 4096): every block >= 4 kB is its own mapping, "
                "returned to the kernel when freed, so RSS follows the live tensors"
            )
            lines += ["", f"### {malloc}: {title}", "", head.format("T"), rule]
            for r in part:
                lines.append(_table_row(r, None, str(r.config.steps)))
            slopes = []
            for method in ("unrolled", "unrolled ckpt", "DrMAD"):
                pts = [
                    (r.config.steps, r.peak_mb) for r in part if r.ok and r.config.method == method
                ]
                if len(pts) >= 2:
                    slope = float(np.polyfit([t for t, _ in pts], [m for _, m in pts], 1)[0])
                    slopes.append(f"{method} {slope:.3f} MB/step ({slope / state_mb:.2f} states)")
            lines += ["", "MB/step: " + "; ".join(slopes)]
        lines.append("")
    return "\n".join(lines)


METHOD_COLORS = {m: f"C{i}" for i, m in enumerate(("gradient",) + IMPLICIT + TRAJECTORY)}


def plot(results: dict[str, list[Result]], out: Path, cap: float, stopped: str) -> None:
    plt = pyplot()

    def series(rows: list[Result], x: Callable[[Result], float]) -> dict[str, tuple[list, ...]]:
        by: dict[str, tuple[list, ...]] = {}
        for r in rows:
            if r.ok:
                xs, ts, ms = by.setdefault(r.config.method, ([], [], []))
                xs.append(x(r))
                ts.append(r.seconds)
                ms.append(max(r.peak_mb, 0.05))
        return by

    def style(method: str, ls: str | None = None) -> dict[str, Any]:
        dashed = "--" if method in TRAJECTORY else "-"
        return {"marker": "o", "ms": 3, "ls": ls or dashed, "color": METHOD_COLORS[method]}

    def two_panels() -> tuple[Any, Any]:
        fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4))
        return fig, axes

    def finish(fig: Any, axes: Any, name: str) -> None:
        for ax in axes:
            ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        save_figure(fig, out / name, dpi=120)

    if results.get("params"):
        by = series(results["params"], lambda r: r.config.params)
        fig, axes = two_panels()
        for method, (xs, ts, ms) in by.items():
            axes[0].loglog(xs, ts, label=method, **style(method))
            axes[1].loglog(xs, ms, label=method, **style(method))
        xs = sorted({r.config.params for r in results["params"]})
        if "gradient" in by:
            t0 = by["gradient"][1][0] * 3
            axes[0].loglog(xs, [t0 * x / xs[0] for x in xs], "k:", lw=1, label="slope 1 (∝ P)")
        axes[1].loglog(xs, [4 * x / 2**20 for x in xs], "k:", lw=1, label="4P bytes (one vector)")
        axes[0].set(
            xlabel="parameters P", ylabel="seconds (median wall)", title="one hypergradient"
        )
        axes[1].set(xlabel="parameters P", ylabel="peak RSS increase (MB)", title="peak memory")
        axes[0].legend(fontsize=7, ncol=2)
        finish(fig, axes, "scale_params.png")
    if results.get("hparams"):
        rows = results["hparams"]
        by = series(rows, lambda r: r.config.num_hparams)
        fig, axes = two_panels()
        for method, (xs, ts, ms) in by.items():
            axes[0].loglog(xs, ts, label=method, **style(method))
            axes[1].loglog(xs, ms, label=method, **style(method))
        ms_all = sorted({r.config.num_hparams for r in rows})
        axes[0].axhline(cap, color="k", lw=0.8, ls="-.", label=f"forward-mode cap {cap:.0f} s")
        if "forward" in by and by["forward"][0]:
            m1, t1 = by["forward"][0][-1], by["forward"][1][-1]
            guide = [m for m in ms_all if m <= 10 * m1]  # one decade past the last measurement
            axes[0].loglog(guide, [t1 * m / m1 for m in guide], "k:", lw=1, label="slope 1 (∝ m)")
        P = rows[0].config.params
        axes[0].set(
            xlabel="hyperparameters m" + ("\n" + textwrap.fill(stopped, 60) if stopped else ""),
            ylabel="seconds (median wall)",
            title=f"time vs number of hyperparameters (P = {P:,})",
        )
        axes[1].set(
            xlabel="hyperparameters m", ylabel="peak RSS increase (MB)", title="peak memory"
        )
        axes[0].legend(fontsize=7, ncol=2, loc="center right")
        finish(fig, axes, "scale_hparams.png")
    if results.get("steps"):
        rows = results["steps"]
        fig, axes = two_panels()
        for malloc, ls in (("default", "-"), ("mmap", ":")):
            by = series([r for r in rows if r.config.malloc == malloc], lambda r: r.config.steps)
            for method, (xs, ts, ms) in by.items():
                label = f"{method} ({malloc} malloc)"
                axes[0].plot(xs, ms, label=label, **style(method, ls))
                axes[1].plot(xs, ts, label=label, **style(method, ls))
        P = rows[0].config.params
        base = [r for r in rows if r.ok and r.config.method == "DrMAD"]
        if base:
            b0 = min(base, key=lambda r: (r.config.malloc != "mmap", r.config.steps))
            Ts = sorted({r.config.steps for r in rows})
            state = 8 * P / 2**20
            axes[0].plot(
                Ts,
                [b0.peak_mb + state * T for T in Ts],
                "k-.",
                lw=0.8,
                label="DrMAD (mmap, first T) + T states of 2P floats",
            )
        axes[0].set(
            xlabel="inner steps T",
            ylabel="peak RSS increase (MB)",
            title=f"memory vs T (P = {P:,})",
        )
        axes[1].set(xlabel="inner steps T", ylabel="seconds (median wall)", title="time vs T")
        axes[0].legend(fontsize=7)
        finish(fig, axes, "scale_steps.png")


if __name__ == "__main__":
    main()
