"""Plots of the benchmark results, drawn from their JSON files.

Each benchmark script calls the function for its own results at the end of a run; running
this file redraws every plot from the committed JSON without rerunning anything::

    .venv/bin/python benchmarks/_plots.py            # all of them
    .venv/bin/python benchmarks/_plots.py hvp_cost   # one
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FLOOR = 1e-17  # errors below this are drawn at it (log scale)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _err(x: float | None) -> float:
    return float("nan") if x is None else max(float(x), FLOOR)


def implicit_solvers(data: dict[str, Any], out: Path) -> Path:
    """Relative error vs products and vs milliseconds, per problem; ours solid, seed dashed."""
    problems = data["problems"]
    fig, axes = plt.subplots(2, len(problems), figsize=(5.2 * len(problems), 8), squeeze=False)
    for col, (name, prob) in enumerate(problems.items()):
        series: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        for row in prob["rows"]:
            for side in ("ours", "theirs"):
                r = row.get(side)
                if not r or r.get("error") or r.get("rel_err") is None:
                    continue
                hvps = r.get("num_hvps") or row["k"]
                series.setdefault((side, r["key"]), []).append(
                    (float(max(hvps, 1)), float(r["ms"]), _err(r["rel_err"]))
                )
        for (side, key), pts in sorted(series.items()):
            pts.sort()
            style = "-o" if side == "ours" else "--x"
            label = key if side == "ours" else f"hypergrad 0.0.1 {key}"
            for ax, j in ((axes[0][col], 0), (axes[1][col], 1)):
                ax.plot([p[j] for p in pts], [p[2] for p in pts], style, ms=3, label=label)
        axes[0][col].set(title=name, xlabel="Hessian-vector products", xscale="log")
        axes[1][col].set(xlabel="ms per hypergradient", xscale="log")
        for ax in (axes[0][col], axes[1][col]):
            ax.set(yscale="log", ylabel="relative error vs exact")
            ax.grid(True, which="major", alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="lower left")
    return _save(fig, out / "implicit_solvers.png")


def hvp_cost(data: dict[str, Any], out: Path) -> Path:
    """Cost of one product and of whole hypergradients, in gradients of f."""
    results = data["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results):
        rows = [r for r in res["rows"] if r["what"] != "grad"]
        names = [r["what"] for r in rows]
        vals = [r["gradients"] for r in rows]
        ax.barh(range(len(rows)), vals, color="C0")
        floors = [(i, r["floor"]) for i, r in enumerate(rows) if r.get("floor")]
        if floors:
            ax.plot([f for _, f in floors], [i for i, _ in floors], "k|", ms=14, label="k + 3")
            ax.legend(fontsize=8)
        ax.set_yticks(range(len(rows)), names, fontsize=8)
        ax.set_xscale("log")
        ax.set(title=res["problem"].replace(" (", "\n("), xlabel="cost in gradients of f")
        ax.invert_yaxis()
    return _save(fig, out / "hvp_cost.png")


def hyperoptimizer_methods(data: dict[str, Any], out: Path) -> Path:
    """Per method: hyper-step cost in training steps, and validation loss reached."""
    summary = data["hyperoptimizer"]["summary"]
    names = [n for n, r in summary.items() if r.get("hyper_step_ms")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ratio = [summary[n]["hyper_step_ms"] / summary[n]["train_step_ms"] for n in names]
    ax1.barh(range(len(names)), ratio, color="C0")
    ax1.set_yticks(range(len(names)), names, fontsize=8)
    ax1.set(xscale="log", xlabel="seconds per hyper-step / per training step")
    ax1.invert_yaxis()
    vals = [summary[n]["val"] for n in names]
    ax2.barh(range(len(names)), vals, color="C2")
    ax2.set_yticks(range(len(names)), [""] * len(names))
    ax2.invert_yaxis()
    for n, r in summary.items():
        if not r.get("hyper_step_ms"):
            ax2.axvline(r["val"], ls="--", lw=1, color="k" if "untuned" in n else "C3", label=n)
    lo = min(vals + [r["val"] for r in summary.values()])
    ax2.set(xlabel="validation loss after the run", xlim=(0.9 * lo, None))
    ax2.legend(fontsize=7, loc="lower right")
    return _save(fig, out / "hyperoptimizer_methods.png")


def mixed_precision(data: dict[str, Any], out: Path) -> Path:
    """Relative error vs float64, per solver and precision mode, per problem."""
    problems = data["problems"]
    fig, axes = plt.subplots(1, len(problems), figsize=(5.5 * len(problems), 4.5), squeeze=False)
    for ax, (name, prob) in zip(axes[0], problems.items()):
        rows = [r for r in prob["implicit"] + prob["unrolled"] if r.get("rel_err") is not None]
        solvers = list(dict.fromkeys(r["solver"] for r in rows))
        modes = list(dict.fromkeys(r["mode"] for r in rows))
        width = 0.8 / max(len(modes), 1)
        for j, mode in enumerate(modes):
            xs, ys = [], []
            for i, s in enumerate(solvers):
                hit = [r for r in rows if r["solver"] == s and r["mode"] == mode]
                if hit:
                    xs.append(i + j * width)
                    ys.append(_err(hit[0]["rel_err"]))
            ax.bar(xs, ys, width, label=mode)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(solvers))], solvers, fontsize=7)
        cond = prob.get("cond")
        title = name if cond is None else f"{name} (condition number {cond:.3g})"
        ax.set(yscale="log", ylabel="relative error vs float64 exact", title=title)
        ax.axhline(2.0**-8, color="k", ls=":", lw=1)
    axes[0][0].legend(fontsize=7)
    return _save(fig, out / "mixed_precision.png")


PLOTS: dict[str, Callable[[dict[str, Any], Path], Path]] = {
    "implicit_solvers": implicit_solvers,
    "hvp_cost": hvp_cost,
    "hyperoptimizer_methods": hyperoptimizer_methods,
    "mixed_precision": mixed_precision,
}


def plot(name: str, data: dict[str, Any] | None = None, out: Path = RESULTS) -> Path:
    """Draw ``name``'s plot from ``data`` (default: its JSON in ``out``)."""
    if data is None:
        data = json.loads((out / f"{name}.json").read_text())
    return PLOTS[name](data, out)


def main(argv: list[str]) -> None:
    for name in argv or list(PLOTS):
        if name not in PLOTS:
            raise SystemExit(f"unknown plot {name!r}; choose from {', '.join(PLOTS)}")
        print(f"wrote {plot(name)}")


if __name__ == "__main__":
    main(sys.argv[1:])
