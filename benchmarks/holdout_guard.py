"""The validation-overfit guard on 2,410 per-weight decays: test loss with and without it."""

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import harness as H
import hypergradient as hg
import vs_optuna as V

NAME = "holdout_guard"
TITLE = "Validation-overfit guard: 2,410 per-weight decays, test loss with and without it"
RUNS, SPLITS = ("no guard", "guard", "merged"), ("val", "holdout", "test")


def run_one(task: V.Task, run: str, steps: int, iters: int, patience: int) -> dict[str, Any]:
    """The documented ``HyperOptimizer`` loop (L-BFGS inner steps, IFT/CG hyper-steps) on the
    flat MLP weights; ``guard``: guarded by the holdout rows; ``merged``: they join validation."""
    theta = H.flat(task.init).clone().requires_grad_(True)
    kw = {"max_iter": iters, "history_size": 20, "line_search_fn": "strong_wolfe"}
    inner = torch.optim.LBFGS([theta], tolerance_grad=1e-12, tolerance_change=0.0, **kw)

    def val_loss(model: dict, h: dict, batch: Any) -> Tensor:
        logits = H.mlp_forward(H.unflat(model["theta"], task.init), batch[0])
        return F.cross_entropy(logits, batch[1])

    def train_loss(model: dict, h: dict, batch: Any) -> Tensor:
        return val_loss(model, h, batch) + 0.5 * (h["decay"] * model["theta"] ** 2).sum()

    train, val, hold = (task.data[k] for k in ("train", "val", "holdout"))
    if run == "merged":
        val = tuple(torch.cat([a, b]) for a, b in zip(val, hold))
    kw = {"inner_optimizer": inner, "train_loss": train_loss, "val_loss": val_loss}
    kw |= {"outer_optimizer": lambda hp: torch.optim.Adam(hp, lr=task.outer_lr), "val_data": val}
    kw |= {"method": hg.IFT(hg.CG(maxiter=50, tol=1e-4)), "inner_steps": 1, "history_size": None}
    kw |= {"holdout_data": hold, "patience": patience} if run == "guard" else {}
    decay = {"decay": hg.Positive(torch.full_like(theta.detach(), task.lam0))}
    hopt = hg.HyperOptimizer({"theta": theta}, decay, **kw)

    def closure() -> Tensor:
        hopt.zero_grad()
        loss = hopt.train_loss(train)
        loss.backward()
        return loss

    curve, started = [], time.perf_counter()
    while len(curve) < steps and not hopt.stopped:
        hopt.step(train, closure)
        live = {"hyper_step": hopt.hyper_steps, "val_batch": hopt.history[-1].val_loss}
        curve.append(task.evaluate(H.unflat(theta.detach(), task.init), SPLITS) | live)
    seconds, decay = time.perf_counter() - started, hopt.hparams["decay"]
    refit = task.evaluate(task.train(decay.log(), {}), SPLITS)
    H.log(f"{run}: {hopt.hyper_steps} hyper-steps, refit {refit}")
    out = {"run": run, "hyper_steps": hopt.hyper_steps, "stopped": hopt.stopped}
    out |= {"seconds": seconds, "live_end": curve[-1], "refit": refit, "curve": curve}
    out |= {"best_hyper_step": None if hopt.guard is None else hopt.guard.state.best_hyper_step}
    return out | {"lambda": {k: float(getattr(decay, k)()) for k in ("min", "median", "max")}}


def render(d: dict[str, Any]) -> list[str]:
    rows = [{"run": "start (lambda = 1e-3)", "hyper-steps": 0} | d["start"]]
    for r in d["runs"]:
        x = {"run": r["run"], "hyper-steps": r["hyper_steps"], "best_at": r["best_hyper_step"]}
        rows.append(x | r["refit"] | {"live test_loss": r["live_end"]["test_loss"]})
    cols = "run|hyper-steps:d|best_at:d|val_loss:.4f|holdout_loss:.4f|test_loss:.4f"
    cols += "|test_acc:.3f|live test_loss:.4f"
    a, lam = d["args"], [" / ".join(f"{v:.3g}" for v in r["lambda"].values()) for r in d["runs"]]
    notes = [
        f"split: {d['sizes']}; at most {a['steps']} hyper-steps, patience {a['patience']}, "
        f"L-BFGS {a['lbfgs_iters']} iterations per step",
        "columns: the decays each run ends with (guard: the best by holdout loss, restored "
        "at the stop), retrained from the seeded initialization and scored; `best_at`: the "
        "hyper-step whose decays the guard kept; `live test_loss`: the run's own model at its "
        "last hyper-step",
        "decays (min / median / max): "
        + "; ".join(f"{r['run']} {x}" for r, x in zip(d["runs"], lam)),
    ]
    return [H.bullets(notes), H.dict_table(rows, cols)]


def plot(data: dict[str, Any], out: Path) -> Path:
    panels = []
    for r in data["runs"]:
        lines = {k: [(c["hyper_step"], c[f"{k}_loss"]) for c in r["curve"]] for k in SPLITS}
        best = {"kept (best holdout)": r["best_hyper_step"]} if r["best_hyper_step"] else {}
        axes = {"title": r["run"], "xlabel": "hyper-step", "yscale": "log"}
        fmt = dict.fromkeys(lines, "-")
        panels.append({"lines": lines, "fmt": fmt, "vlines": best, "set": axes})
    title = "2,410 per-weight decays: the live model's losses along the hyper-steps"
    return H.figure(out / f"{NAME}.png", panels, 3, (4.7, 4), title)


def run(args: Any, rep: H.Report) -> dict[str, Any]:
    """The MLP task of ``vs_optuna`` with ``--holdout`` stratified test rows moved to a holdout."""
    from sklearn.model_selection import train_test_split

    task = V.Task("mlp", args.seed, args.lbfgs_iters)
    (x, y), idx = task.data["test"], torch.arange(len(task.data["test"][1])).numpy()
    kw = {"train_size": args.holdout, "stratify": y.numpy(), "random_state": args.seed}
    hold, test = train_test_split(idx, **kw)
    task.data |= {"holdout": (x[hold], y[hold]), "test": (x[test], y[test])}
    out = {"sizes": {k: len(v[1]) for k, v in task.data.items()}}
    out["start"] = task.evaluate(task.train(task.start(), {}), SPLITS)
    out["runs"] = [run_one(task, r, args.steps, args.lbfgs_iters, args.patience) for r in RUNS]
    return out


OPTIONS = [
    H.option("--steps", 4, 150, type=int, help="hyper-steps at most (default 150)"),
    H.option("--patience", 2, 10, type=int, help="holdout scores without improvement (10)"),
    H.option("--lbfgs-iters", 10, 200, type=int, help="L-BFGS iterations per step (200)"),
    H.option("--holdout", type=int, default=300, help="test rows moved to the holdout"),
]
main = H.entry(__doc__, NAME, TITLE, run, render, plot=plot, options=OPTIONS)

if __name__ == "__main__":
    main()
