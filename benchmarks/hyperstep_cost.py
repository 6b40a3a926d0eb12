"""What a hyper-step costs in training steps, for every method of the HyperOptimizer."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

import harness as H
import hypergradient as hg

NAME, TITLE = "hyperstep_cost", "Hyper-step cost in training steps, every HyperOptimizer method"
K = 10  # inner_steps
METHODS: dict[str, tuple[Callable[[], hg.Method], Callable[[int, int], float]]] = {
    # name: (factory, goal in training steps as a function of (products k, hyperparameters m))
    "T1T2()": (hg.T1T2, lambda k, m: 2.0),
    "IFT() (Neumann, 10 products)": (hg.IFT, lambda k, m: k + 3.0),
    "IFT(CG(maxiter=10, tol=0))": (
        lambda: hg.IFT(hg.CG(maxiter=10, tol=0.0)),
        lambda k, m: k + 3.0,
    ),
    "HOAG(maxiter=10)": (lambda: hg.HOAG(maxiter=10), lambda k, m: k + 3.0),
    "Unrolled()": (hg.Unrolled, lambda k, m: 4.0 * K),
    "DrMAD()": (hg.DrMAD, lambda k, m: 4.0 * K),
    "ForwardMode()": (hg.ForwardMode, lambda k, m: (2.0 + m) * K),
}


def problems(seed: int, quick: bool) -> dict[str, dict[str, Any]]:
    """``{name: {model factory, data, decay shape, penalty}}``."""
    bc = H.breast_cancer_data(seed)
    X, y = H.load_sklearn("digits", torch.float32, torch.long, torch.Generator().manual_seed(seed))
    X = H.standardize(X, 1000)
    hidden = 2 if quick else 32
    g = torch.Generator().manual_seed(seed)
    width, rows = (8, 64) if quick else (256, 128)
    Xm = torch.randn(rows + 2 * rows, 784, generator=g)
    ym = (Xm @ torch.randn(784, 10, generator=g)).argmax(1)
    return {
        "logreg": {
            "model": lambda: H.linear_model(bc.dim).float(),
            "train": (bc.train[0].float(), bc.train[1].float()),
            "val": (bc.val[0].float(), bc.val[1].float()),
            "loss": lambda out, y: F.binary_cross_entropy_with_logits(out.reshape(-1), y),
            "decay": (1, bc.dim),
        },
        "mlp": {
            "model": lambda: torch.nn.Sequential(
                torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10)
            ),
            "train": (X[:1000], y[:1000]),
            "val": (X[1000:], y[1000:]),
            "loss": F.cross_entropy,
            "decay": (hidden, 1),  # one decay per hidden unit (its incoming weights)
        },
        "mnist-mlp": {
            "model": lambda: torch.nn.Sequential(
                torch.nn.Linear(784, width), torch.nn.ReLU(), torch.nn.Linear(width, 10)
            ),
            "train": (Xm[:rows], ym[:rows]),
            "val": (Xm[rows:], ym[rows:]),
            "loss": F.cross_entropy,
            "decay": (1, 1),  # one decay for the first layer
        },
    }


def runs(pb: dict[str, Any], lr: float) -> list[H.Run]:
    """A bare SGD loop, then one HyperOptimizer run per method (same start, same data)."""
    torch.manual_seed(0)
    first = pb["model"]()
    state, loss = first.state_dict(), pb["loss"]
    decay0 = torch.full(pb["decay"], 1e-2)

    def penalty(m: torch.nn.Module, d: torch.Tensor) -> torch.Tensor:
        return 0.5 * (d * next(m.parameters()) ** 2).sum()

    sgd = torch.optim.SGD(first.parameters(), lr=lr)

    def plain_step() -> None:
        sgd.zero_grad()
        (loss(first(pb["train"][0]), pb["train"][1]) + penalty(first, decay0)).backward()
        sgd.step()

    out = [H.Run("bare torch.optim.SGD step", plain_step)]
    for name, (make, _) in METHODS.items():
        model = pb["model"]()
        model.load_state_dict(state)
        hopt = hg.HyperOptimizer(
            model,
            {"decay": hg.Positive(decay0.clone())},
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=lr),
            outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.05),
            train_loss=lambda m, h, b: loss(m(b[0]), b[1]) + penalty(m, h["decay"]),
            val_loss=lambda m, h, b: loss(m(b[0]), b[1]),
            val_data=pb["val"],
            method=make(),
            inner_steps=K,
            history_size=None,
        )
        step = lambda hopt=hopt: H.hopt_step(hopt, pb["train"])  # noqa: E731
        out.append(H.Run(name, step, K, {"hopt": hopt}))
    return out


def measure(name: str, pb: dict[str, Any], steps: int, lr: float) -> list[dict[str, Any]]:
    H.log(f"[{name}] {len(METHODS)} methods x {steps} steps in lockstep ...")
    rs = runs(pb, lr)
    warned = H.lockstep(rs, steps)
    plain = H.median(rs[0].step_s)
    m = int(torch.Size(pb["decay"]).numel())
    rows = []
    for r in rs[1:]:
        hist = r.meta["hopt"].history
        k = H.median([x.diagnostics.get("num_hvps") for x in hist[1:] or hist])
        cost = H.median([x.seconds for x in hist[1:] or hist]) / plain
        goal = METHODS[r.label][1](int(k) if k == k else 0, m)
        rows.append(
            {"problem": name, "method": r.label, "hyper_steps": len(hist), "products": k}
            | {"cost": cost, "goal": goal, "met": "yes" if cost <= goal else "no"}
            | {"e2e": 1.0 + cost / K}
            | {"plain_step_ms": 1e3 * plain, "hopt_step_ms": 1e3 * H.median(r.step_s)}
            | {"hyper_step_ms": 1e3 * H.median([x.seconds for x in hist]), "error": r.error}
        )
    return rows + [{"problem": name, "warnings": warned}]


def render(d: dict[str, Any]) -> list[str]:
    s = d["settings"]
    rows = [r for r in d["rows"] if "method" in r]
    kinds: dict[str, int] = {}  # distinct warnings, told apart by their first words
    for w in (w for r in d["rows"] for w in r.get("warnings", [])):
        tail = re.sub(r"[0-9]+", "#", w.split(" met ")[-1])[:70]
        key = " ".join(w.replace("(", " ").split()[:2]) + " ... " + tail
        kinds[key] = kinds.get(key, 0) + 1
    notes = [
        f"{s['steps']} training steps per run (a hyper-step every {K}), SGD lr {s['lr']}; "
        f"load average at the start {d['machine']['load_average']}",
        "cost = median seconds of a hyper-step (history[i].seconds, the first one left out: "
        "it builds caches) / median bare torch.optim.SGD step; goal: issue 11, goal 5 "
        "(products k = median num_hvps of the hyper-steps; m hyperparameters)",
        "hopt_step_ms: median HyperOptimizer step without a hyper-step (its overhead over the "
        "bare step)",
        *[f"warning ({n} distinct texts): {k}" for k, n in kinds.items()],
    ]
    cols = "problem|method|hyper_steps:d|products:g|cost:.2f|goal:g|met|e2e:.2f|plain_step_ms:.3f"
    return [H.bullets(notes), H.dict_table(rows, cols + "|hopt_step_ms:.3f|hyper_step_ms:.2f")]


def main(argv: Sequence[str] | None = None) -> int:
    p = H.cli(__doc__)
    p.add_argument("--steps", type=int, help="training steps per run (default 300, quick 20)")
    p.add_argument("--lr", type=float, default=0.1, help="inner SGD learning rate")
    args = p.parse_args(argv)
    if H.replot(args, NAME, TITLE, render):
        return 0
    H.start(args)
    H.defaults(args, steps=(20, 300))
    rep = H.Report(NAME, TITLE, args)
    rows = []
    for name, pb in problems(args.seed, args.quick).items():
        rows += measure(name, pb, args.steps, args.lr)
    rep.write({"settings": {"steps": args.steps, "lr": args.lr}, "rows": rows}, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
