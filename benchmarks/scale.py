"""Seconds and peak memory of one hypergradient as the model and the hyperparameters grow."""

import gc
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import harness as H
import hypergradient as hg

NAME, TITLE = "scale", "Seconds and peak memory of one hypergradient"
IN, OUT, BATCH = 784, 10, 256
LR, MOMENTUM, LOG_DECAY = 0.05, 0.9, math.log(1e-3)
SOLVERS = {  # the implicit methods: their solver at a problem ``pb`` (T1T2: Identity)
    "CG": lambda pb: hg.CG(maxiter=20, tol=0.0),
    "Neumann": lambda pb: hg.Neumann(maxiter=20, alpha=1.0 / (pb["lam_max"] + pb["damping"])),
    "Nystrom": lambda pb: hg.Nystrom(rank=20, rho=0.1, chunk_size=5, seed=0),
    "NystromPCG": lambda pb: hg.NystromPCG(rank=10, maxiter=10, tol=0.0, chunk_size=5, seed=0),
    "T1T2": lambda pb: hg.Identity(LR),
}
TRAJ = {"unrolled": hg.unrolled, "unrolled ckpt": hg.unrolled, "DrMAD": hg.drmad}
TRAJ["forward"] = hg.forward_mode
IMPLICIT, TRAJECTORY = tuple(SOLVERS), tuple(TRAJ)
LONG_CALL = 15.0  # seconds: a slower first call is the only one (no warm-up)


def param_count(w: int) -> int:
    return IN * w + w + w * w + w + w * OUT + OUT


def width_for(target: float) -> int:
    """The width whose parameter count is closest to ``target``."""
    guess = int((-(IN + 2 + OUT) + math.sqrt((IN + 2 + OUT) ** 2 + 4 * (target - OUT))) / 2)
    near = [max(1, guess + d) for d in (-1, 0, 1, 2)]
    return min(near, key=lambda w: abs(param_count(w) - target))


@dataclass
class Config:
    """One measurement."""

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
    def num_hparams(self) -> int:
        if isinstance(self.hparams, int):
            return self.hparams
        extra = 0 if self.method in IMPLICIT + ("gradient",) else 2  # lr and momentum
        return (param_count(self.width) if self.hparams == "per-weight" else 6) + extra


@dataclass
class Result:
    config: Config
    ok: bool = True
    error: str = ""
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    first_call: float = math.nan
    peak_mb: float = math.nan
    first_peak_mb: float = math.nan
    info: dict[str, Any] = field(default_factory=dict)
    child_seconds: float = math.nan

    def row(self) -> dict[str, Any]:
        """The JSON row (with the derived numbers the tables use)."""
        c = self.config
        out = asdict(self) | {"params": param_count(c.width), "num_hparams": c.num_hparams}
        return out | {"seconds": H.median(self.wall), "cpu_seconds": H.median(self.cpu)}


def problem(cfg: Config, X: Tensor, y: Tensor, trained: dict | None) -> dict:
    """Losses, weights, hyperparameters and batches of one configuration."""
    n_train, P = len(y) - 1000, param_count(cfg.width)
    batch, val = (X[:BATCH], y[:BATCH]), (X[n_train:][:BATCH], y[n_train:][:BATCH])
    gen = torch.Generator().manual_seed(0)
    params = H.mlp_init((IN, cfg.width, cfg.width, OUT), gen, torch.float32)
    pb = {"lam_max": math.nan, "damping": 0.0, "params": params}
    if cfg.method in IMPLICIT and trained:
        pb |= trained
    if isinstance(cfg.hparams, int):  # contiguous blocks of weights share a decay
        h: dict[str, Any] = {"log_decay": torch.full((cfg.hparams,), LOG_DECAY)}
        group = torch.arange(P) * cfg.hparams // P
    else:
        shape = (lambda p: p.shape) if cfg.hparams == "per-weight" else (lambda p: ())
        h = {"log_decay": tuple(torch.full(shape(p), LOG_DECAY) for p in params)}
        if cfg.method in TRAJECTORY:
            h |= {"lr": torch.tensor(LR), "momentum": torch.tensor(MOMENTUM)}

    def inner_batch(p: tuple, h: dict, b: Any) -> Tensor:
        ld, ce = h["log_decay"], F.cross_entropy(H.mlp_forward(p, b[0]), b[1])
        if isinstance(ld, tuple):
            return ce + 0.5 * sum((d.exp() * q**2).sum() for d, q in zip(ld, p))
        return ce + 0.5 * (ld.exp()[group] * H.flat(p) ** 2).sum()

    starts = [(t * BATCH) % (n_train - BATCH) for t in range(cfg.steps)]
    pb |= {"hparams": h, "inner_batch": inner_batch, "inner": lambda p, h: inner_batch(p, h, batch)}
    pb["batches"] = [(X[s : s + BATCH], y[s : s + BATCH]) for s in starts]
    return pb | {"outer": lambda p, h: F.cross_entropy(H.mlp_forward(p, val[0]), val[1])}


def make_call(cfg: Config, pb: dict) -> Callable[[bool], Any]:
    """``call(info)`` computes one hypergradient (``info``: with diagnostics)."""
    f, g, w, h = pb["inner"], pb["outer"], pb["params"], pb["hparams"]
    if cfg.method == "gradient":
        leaves = H.leaves(w)
        return lambda info: torch.autograd.grad(f(leaves, h), leaves)
    if cfg.method in IMPLICIT:
        s, d = SOLVERS[cfg.method](pb), pb["damping"]
        return lambda info: hg.implicit(f, g, w, h, s, damping=d, return_info=info)
    kw = {"checkpoint_every": cfg.checkpoint_every} if cfg.method == "unrolled ckpt" else {}
    opt = lambda: hg.optim.sgd(lr=h.get("lr", LR), momentum=h.get("momentum", MOMENTUM))  # noqa: E731
    kw |= {"batches": pb["batches"], "return_info": True}
    return lambda info: TRAJ[cfg.method](pb["inner_batch"], g, w, h, cfg.steps, opt(), **kw)


def measure(cfg: Config, X: Tensor, y: Tensor, trained: dict | None, child: bool) -> Result:
    """A first call (diagnostics, first-call time and peak), the measured call (peak), then
    repeats within the time budget; in a fresh child process."""
    started, res = time.perf_counter(), Result(cfg)
    if child:
        gc.freeze()  # the imported modules' objects: gc.collect() need not walk them
    try:
        torch.manual_seed(0)
        if cfg.malloc == "mmap":
            H.mmap_every_block()
        call = make_call(cfg, problem(cfg, X, y, trained))
        out, wall, cpu, res.first_peak_mb = H.peak_memory(lambda: call(True), child)
        info, res.first_call = out[1] if isinstance(out, tuple) and len(out) == 2 else None, wall
        keys = ("stored_states", "recomputed_steps", "outer_loss")
        if isinstance(info, hg.HypergradInfo):
            keys = ("num_hvps", "status")
        res.info = {k: getattr(info, k) for k in keys} if info is not None else {}
        del out, info
        if wall > LONG_CALL:  # the first call is the measurement
            res.wall, res.cpu, res.peak_mb = [wall], [cpu], res.first_peak_mb
        else:
            _, wall, cpu, res.peak_mb = H.peak_memory(lambda: call(False), child)
            res.wall, res.cpu = [wall], [cpu]
            while len(res.wall) < cfg.repeats and sum(res.wall) + res.wall[-1] <= cfg.budget:
                _, wall, cpu = H.timed_call(lambda: call(False))
                res.wall.append(wall / 1e3)
                res.cpu.append(cpu / 1e3)
    except Exception as exc:  # reported, not raised: the sweep goes on
        res.ok, res.error = False, H.error_text(exc)
    res.child_seconds = time.perf_counter() - started
    return res


def pretrain(width: int, X: Tensor, y: Tensor, steps: int) -> dict[str, Any]:
    """Weights trained on the inner batch (Adam) for the implicit methods, lambda_max, and the
    smallest damping (1e-4, doubled) at which CG and NystromPCG meet no negative curvature."""
    t0 = time.perf_counter()
    pb = problem(Config("pretrain", "gradient", width, "per-weight"), X, y, None)
    f, g, h, opt = pb["inner"], pb["outer"], pb["hparams"], hg.optim.adam(lr=3e-3)
    leaves, state = list(pb["params"]), opt.init(list(pb["params"]))
    for t in range(steps):
        leaves = [v.detach().requires_grad_(True) for v in leaves]
        grads = torch.autograd.grad(f(tuple(leaves), h), leaves)
        with torch.no_grad():
            leaves, state = opt.update([v.detach() for v in leaves], list(grads), state, t)
    params = tuple(v.detach() for v in leaves)
    op = hg.HessianOperator(f, params, h)
    lam = hg.estimate_lambda_max(op, iters=30, generator=torch.Generator().manual_seed(0))
    grad_norm = float(torch.linalg.vector_norm(op.grad))
    op.release()
    pb |= {"params": params, "lam_max": float(lam), "damping": 1e-4}
    while pb["damping"] < lam:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hg.HypergradientWarning)
            kw = {"damping": pb["damping"], "return_info": True}
            call = lambda s, kw=kw: hg.implicit(f, g, params, h, SOLVERS[s](pb), **kw)[1]  # noqa: E731
            statuses = [call(s).status for s in ("CG", "NystromPCG")]
        if "negative_curvature" not in statuses:
            break
        pb["damping"] *= 2
    info = {"seconds": time.perf_counter() - t0, "grad_norm": grad_norm, "lambda_max": float(lam)}
    trained = {k: pb[k] for k in ("params", "lam_max", "damping")}
    return {"info": info | {"damping": pb["damping"]}, "trained": trained}


def sweep(run: Callable[[Config], Result], cfgs: list[Config], cap: float) -> tuple[list, str]:
    """Every configuration; forward mode over m stops once the line through its last two
    times predicts more than ``cap`` seconds (the rest are reported as skipped)."""
    rows, points, stopped = [], [(0, 0.0)], ""
    for cfg in cfgs:
        capped, m = cfg.method == "forward" and cfg.experiment == "hparams", cfg.num_hparams
        if capped and not stopped and len(points) > 1:
            (m1, t1), (m2, t2) = points[-2:]
            guess = t2 + max((t2 - t1) / (m2 - m1), 0.0) * (m - m2)
            stopped = f"forward mode stopped at m = {m:,}: predicted {guess:.0f} s"
            stopped = stopped if guess > cap else ""
        if capped and stopped:
            rows.append(Result(cfg, ok=False, error="skipped: " + stopped))
            continue
        cfg.timeout = 3 * cap + 30 if capped else cfg.timeout
        rows.append(r := run(cfg))
        t = H.median(r.wall)
        H.log(f"  {cfg.experiment} {cfg.method} m={m} T={cfg.steps}: {t:.3f} s {r.error}")
        if capped and not (r.ok and t <= cap):
            why = r.error or f"{t:.0f} s > cap {cap:.0f} s"
            stopped = f"forward mode stopped at m = {m:,} ({why})"
        elif capped:  # the line is drawn through forward mode's own times
            points.append((m, t))
    return rows, stopped


def cells(r: dict[str, Any], key: str, value: Any, unit: float | None = None) -> dict[str, Any]:
    """A table row: the time, peak and notes of one JSON row."""
    i, notes = r["info"], r["error"]
    if "num_hvps" in i:
        notes = f"{i['num_hvps']} hvps, {i['status']}"
    elif "stored_states" in i:
        more = f", {i['recomputed_steps']} recomputed" if i.get("recomputed_steps") else ""
        notes = f"{i['stored_states']} states{more}"
    out = r | {key: value, "method": r["config"]["method"], "notes": notes}
    out["in_grads"] = r["cpu_seconds"] / unit if unit and r["ok"] else None
    return out | {"xP": None if H.bad(r["peak_mb"]) else r["peak_mb"] * 2**20 / (4 * r["params"])}


def slopes(rows: list[dict], x: str, top: float) -> str:
    """Least-squares log-log slopes of time and memory against ``x`` (0 flat, 1 linear)."""
    out, parts = [], ("all", f">= {top:g}")
    for method in dict.fromkeys(r["config"]["method"] for r in rows):
        ok = [r for r in rows if r["ok"] and r["config"]["method"] == method]
        s = {"method": method}
        for part, sub in zip(parts, (ok, [r for r in ok if r[x] >= top])):
            for y in YS:
                pts = [(r[x], r[y]) for r in sub if not H.bad(r[y])]
                xs, ys = np.log([p[0] for p in pts]), np.log([max(p[1], 1e-9) for p in pts])
                s[f"{y}, {part}"] = np.polyfit(xs, ys, 1)[0] if len(pts) > 1 else None
        out.append(s)
    cols = "|".join(["method"] + [f"{y}, {p}:.2f" for p in parts for y in YS])
    return f"Log-log slopes against {x} (0 = flat, 1 = linear):\n\n" + H.dict_table(out, cols)


YS = ("seconds", "cpu_seconds", "peak_mb")
COLS = "{}|method|num_hparams:,|seconds:.4g|cpu_seconds:.4g|in_grads:.1f|peak_mb:.1f|xP:.1f|notes"


def render(d: dict[str, Any]) -> list[str]:
    res, pre = d["results"], [f"P = {int(p):,}: {H.facts(v)}" for p, v in d["pretrained"].items()]
    out = [
        "tanh MLP 784-h-h-10 on MNIST, batch 256; implicit methods: 20 products (T1T2: 0) at "
        "trained weights with the smallest damping without negative curvature:\n\n" + H.bullets(pre)
    ]
    ok = [r for r in res["params"] if r["config"]["method"] == "gradient" and r["ok"]]
    unit = {r["params"]: r["cpu_seconds"] for r in ok}
    rows = [cells(r, "P", f"{r['params']:,}", unit.get(r["params"])) for r in res["params"]]
    out.append(
        "## Time and memory vs number of parameters P (one decay per parameter)\n\n"
        "Trajectory: T = 20 SGD-momentum steps, decays + lr + momentum (forward mode: "
        "per-layer decays); in_grads = CPU time / one gradient's; xP = peak / (4 bytes x P)."
        f"\n\n{H.dict_table(rows, COLS.format('P'))}\n\n" + slopes(res["params"], "params", 1e5)
    )
    rows = [cells(r, "m", f"{r['num_hparams']:,}") for r in res["hparams"]]
    out.append(
        f"## Time and memory vs number of hyperparameters m (P = "
        f"{res['hparams'][0]['params']:,})\n\nm contiguous groups of weights share a decay; "
        f"forward-mode cap {d['cap_seconds']:.0f} s. {d['forward_stopped']}\n\n"
        + f"{H.dict_table(rows, COLS.format('m'))}\n\n"
        + slopes(res["hparams"], "num_hparams", 10)
    )
    for malloc in dict.fromkeys(r["config"]["malloc"] for r in res["steps"]):  # default, mmap
        rows = [r for r in res["steps"] if r["config"]["malloc"] == malloc]
        state_mb, fits = 8 * rows[0]["params"] / 2**20, []  # parameters + momentum, float32
        for m in ("unrolled", "unrolled ckpt", "DrMAD"):
            ok = [r for r in rows if r["ok"] and r["config"]["method"] == m]
            pts = [(r["config"]["steps"], r["peak_mb"]) for r in ok]
            if len(pts) > 1:
                s = float(np.polyfit(*zip(*pts), 1)[0])
                fits.append(f"{m} {s:.3f} MB/step ({s / state_mb:.2f} states)")
        table = H.dict_table([cells(r, "T", r["config"]["steps"]) for r in rows], COLS.format("T"))
        out.append(
            f"## Memory vs inner steps T, {malloc} malloc (P = {rows[0]['params']:,})\n\n"
            f"A stored state is 2P floats ({state_mb:.2f} MB); `mmap`: "
            f"mallopt(M_MMAP_THRESHOLD, 4096).\n\n{table}\n\nMB/step: {'; '.join(fits)}"
        )
    return out


PLOTS = {"params": ("params", "parameters P"), "hparams": ("num_hparams", "hyperparameters m")}
PLOTS["steps"] = (None, "inner steps T")


def plot(d: dict[str, Any], out: Path) -> Path:
    """Time and memory against P, m and T (one figure each)."""
    colors = {m: f"C{i}" for i, m in enumerate(("gradient",) + IMPLICIT + TRAJECTORY)}
    for exp, (x, label) in PLOTS.items():
        rows = [r for r in d["results"][exp] if r["ok"]]
        if not rows:  # every configuration failed
            continue
        time, mem, fmt = {}, {}, {"4P bytes (one vector)": "k:"}
        for r in rows:
            m, malloc = r["config"]["method"], r["config"]["malloc"]
            key, ls = f"{m} ({malloc})" if exp == "steps" else m, "--" if m in TRAJECTORY else "-"
            fmt[key] = colors[m] + "o" + (":" if malloc == "mmap" else ls)
            at = r[x] if x else r["config"]["steps"]
            time.setdefault(key, []).append((at, r["seconds"]))
            mem.setdefault(key, []).append((at, max(r["peak_mb"] or 0.0, 0.05)))
        if exp == "params":
            ps = sorted({r["params"] for r in rows})
            mem["4P bytes (one vector)"] = [(p, 4 * p / 2**20) for p in ps]
        scale = "linear" if exp == "steps" else "log"
        axes = {"xlabel": label, "xscale": scale, "yscale": scale}
        P = "" if exp == "params" else f" (P = {rows[0]['params']:,})"
        left = {"title": f"one hypergradient{P}", "ylabel": "seconds (median wall)"}
        cap = {"forward-mode cap": d["cap_seconds"]} if exp == "hparams" else {}
        left = {"lines": time, "fmt": fmt, "set": axes | left, "hlines": cap}
        right = {"title": "peak memory", "ylabel": "peak RSS increase (MB)"}
        right = {"lines": mem, "fmt": fmt, "set": axes | right}
        H.figure(out / f"scale_{exp}.png", [left, right], 2, (5.75, 4.4))
    return out / "scale_params.png"


def configs(q: bool, sizes: list[float], common: dict[str, Any]) -> dict[str, list[Config]]:
    mid, c20 = width_for(3e3 if q else 1e5), round(math.sqrt(20))
    cfgs: dict[str, list[Config]] = {"params": [], "hparams": [], "steps": []}
    for w in [width_for(t) for t in sizes]:
        for m in ("gradient",) + IMPLICIT + TRAJECTORY:
            hp = "per-layer" if m == "forward" else "per-weight"
            cfgs["params"].append(Config("params", m, w, hp, checkpoint_every=c20, **common))
    methods = ("CG", "forward") if q else IMPLICIT + ("unrolled", "DrMAD", "forward")
    for m in [4] if q else [1, 10, 100, 1000, 10_000, param_count(mid)]:
        cfgs["hparams"] += [Config("hparams", k, mid, m, **common) for k in methods]
    for malloc in ("default",) if q else ("default", "mmap"):
        for T in [2] if q else [10, 20, 40, 80, 160]:
            c, kw = max(1, round(math.sqrt(T))), {"malloc": malloc, **common}
            for k in ("unrolled", "unrolled ckpt", "DrMAD"):
                cfgs["steps"].append(Config("steps", k, mid, "per-weight", T, c, **kw))
    return cfgs


def run(args: Any, rep: H.Report) -> dict[str, Any]:
    q, cap, (X, y), first = args.quick, args.cap, H.mnist(), []
    rep.machine["threads_in_children"] = 1
    cfgs = configs(q, args.sizes, {"repeats": args.repeats, "budget": 0.2 if q else 3.0})
    widths = {c.width for cs in cfgs.values() for c in cs if c.method in IMPLICIT}
    pre = {w: pretrain(w, X, y, 20 if q else 300) for w in sorted(widths)}

    def one(cfg: Config) -> Result:
        cfg.steps = min(cfg.steps, 4) if q else cfg.steps
        trained = pre[cfg.width]["trained"] if cfg.width in pre else None
        if q and first:  # quick: one child process, the rest in this one
            return measure(cfg, X, y, trained, False)
        first.append(cfg)
        try:
            return H.isolated(measure, cfg, X, y, trained, True, timeout=cfg.timeout)
        except RuntimeError as exc:
            return Result(cfg, ok=False, error=str(exc))

    results, stopped = {}, ""
    for e in cfgs:
        rows, why = sweep(one, cfgs[e], cap)
        results[e], stopped = [r.row() for r in rows], stopped or why
    pretrained = {str(param_count(w)): v["info"] for w, v in pre.items()}
    data = {"mode": "quick" if q else "full", "cap_seconds": cap, "forward_stopped": stopped}
    return data | {"pretrained": pretrained, "results": results}


OPTIONS = [
    H.option("--cap", 2.0, 60.0, type=float, help="forward-mode time cap (s)"),
    H.option("--repeats", 1, 5, type=int, help="timed calls per configuration"),
    H.option("--sizes", [3e3], [1e4, 3e4, 1e5, 3e5, 1e6], nargs="+", type=float, help="P values"),
]
main = H.entry(__doc__, NAME, TITLE, run, render, plot=plot, options=OPTIONS)

if __name__ == "__main__":
    main()
