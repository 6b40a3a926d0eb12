"""One writer of results: the JSON file, the Markdown tables rendered from it, the plots."""

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .runner import cli, defaults, log, machine_info, start

Render = Callable[[dict[str, Any]], Sequence[str]]
Plot = Callable[[dict[str, Any], Path], Any]


def bad(x: Any) -> bool:
    """Missing or non-finite (NaN/inf are written to the JSON as null)."""
    return x is None or (isinstance(x, float) and not math.isfinite(x))


def sci(x: float | None, digits: int = 2) -> str:
    """``1.23e-04``; ``—`` for a missing or non-finite value."""
    return "—" if bad(x) else f"{x:.{digits}e}"


def fix(x: float | None, digits: int = 4) -> str:
    return "—" if bad(x) else f"{x:.{digits}f}"


def ms(x: float | None) -> str:
    """Milliseconds with 3 significant-ish digits: ``0.123``, ``12.34``, ``1234``."""
    if bad(x):
        return "—"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    """``a / b`` or ``—``."""
    return "—" if bad(a) or bad(b) or b <= 0 else f"{a / b:.{digits}f}"


def num(x: Any) -> str:
    """A number with 4 significant digits (``—`` if missing); anything else as ``str``."""
    return "—" if bad(x) else f"{x:.4g}" if isinstance(x, float) else str(x)


def facts(d: dict[str, Any], skip: Sequence[str] = ()) -> str:
    """``key value; key value`` of a flat dict (numbers by :func:`num`)."""
    return "; ".join(f"{k} {num(v)}" for k, v in d.items() if k not in skip)


def dict_table(rows: Sequence[dict[str, Any]], columns: str) -> str:
    """A Markdown table of dicts: ``columns`` is ``key|key:format|...``; a column with a format
    is right-aligned and its numbers formatted (empty where missing, ``—`` where non-finite)."""
    cols = [(c.split(":", 1) + [""])[:2] for c in columns.split("|")]

    def cell(v: Any, spec: str) -> str:
        if v is None or not spec or isinstance(v, str):
            return "" if v is None else str(v)
        return "—" if bad(v) else format(v, spec)

    lines = ["| " + " | ".join(k for k, _ in cols) + " |"]
    lines.append("|" + "|".join("---:" if spec else "---" for _, spec in cols) + "|")
    lines += ["| " + " | ".join(cell(r.get(k), spec) for k, spec in cols) + " |" for r in rows]
    return "\n".join(lines)


def bullets(items: Sequence[str]) -> str:
    return "\n".join(f"- {x}" for x in items)


def section(title: str, *parts: str) -> str:
    """``## title`` and the non-empty ``parts``, separated by blank lines."""
    return "\n\n".join([f"## {title}", *(p for p in parts if p)])


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON data: dataclasses -> dicts, tensors -> lists, NaN/inf -> None."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Tensor):
        return jsonable(obj.tolist() if obj.numel() != 1 or obj.dim() else float(obj))
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    return jsonable(obj.tolist()) if hasattr(obj, "tolist") else obj  # numpy


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and ``os.replace``: no truncated file on interrupt."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
    os.replace(tmp, path)
    return path


def publish(name: str, title: str, data: dict, render: Render, plot: Plot | None, out: Path):
    """Print and write ``<name>.md``: title, machine, run mode, notes, the sections of
    ``render(data)``, wall time; then draw ``plot(data, out)`` (skipped without matplotlib)."""
    args, total = data["args"], data.get("total_seconds")
    machine = "; ".join(f"{k} {v}" for k, v in data["machine"].items())
    mode = f"{'quick' if args['quick'] else 'full'} run; seed {args['seed']}"
    head = [f"# {title}", "", f"- machine: {machine}", f"- {mode}"]
    head += [f"- {n}" for n in data.get("notes", [])]
    footer = f"Total wall time: {total:.0f} s" if total is not None else ""
    md = "\n\n".join(["\n".join(head), *render(data), footer]).rstrip() + "\n"
    print(md, flush=True)
    write_atomic(out / f"{name}.md", md)
    if plot is not None:
        try:
            log(f"wrote {plot(data, out)}")
        except ImportError as exc:  # no matplotlib
            log(f"plot skipped: {exc}")


class Report:
    """The JSON, Markdown and plots of one benchmark run (see the module docstring)."""

    def __init__(self, name: str, title: str, args: argparse.Namespace):
        self.name, self.title, self.args, self.started = name, title, args, time.perf_counter()
        self.machine = machine_info()

    def write(self, data: dict[str, Any], render: Render, plot: Plot | None = None) -> dict:
        out: Path = self.args.out
        out.mkdir(parents=True, exist_ok=True)
        payload = {"machine": self.machine, "args": vars(self.args), **data}
        payload = jsonable(payload | {"total_seconds": time.perf_counter() - self.started})
        write_atomic(out / f"{self.name}.json", json.dumps(payload, indent=1) + "\n")
        publish(self.name, self.title, payload, render, plot, out)
        return payload


def replot(
    args: argparse.Namespace, name: str, title: str, render: Render, plot: Plot | None = None
) -> bool:
    """With ``--replot``: rewrite ``name``'s Markdown and plots from its JSON; True if so."""
    if args.replot:
        data = json.loads((args.out / f"{name}.json").read_text())
        publish(name, title, data, render, plot, args.out)
    return bool(args.replot)


def option(flag: str, quick: Any = None, full: Any = None, **kw: Any) -> tuple:
    """An option of :func:`bench_main`: ``--flag`` whose unset value is ``quick`` or ``full``."""
    return flag, (quick, full), kw


def bench_main(doc: str | None, name: str, title: str, run: Callable, render: Render, **kw) -> dict:
    """The entry point of every benchmark: the shared options (:func:`cli`) and
    ``kw["options"]`` (:func:`option`), ``--replot``, then ``run(args, report)`` (which may add
    to ``report.machine``) written by :class:`Report` with ``kw["plot"]``. Returns the JSON."""
    p, plot, options = cli(doc), kw.get("plot"), kw.get("options", ())
    for flag, _, extra in options:
        p.add_argument(flag, **({"default": None} | extra))
    args = p.parse_args(kw.get("argv"))
    if replot(args, name, title, render, plot):
        return json.loads((args.out / f"{name}.json").read_text())
    start(args)
    defaults(args, **{flag[2:].replace("-", "_"): qf for flag, qf, _ in options})
    rep = Report(name, title, args)
    return rep.write(run(args, rep), render, plot)


def entry(doc: str | None, name: str, title: str, run: Callable, render: Render, **kw: Any):
    """The ``main(argv)`` of a benchmark: :func:`bench_main` with these arguments."""
    return lambda argv=None: bench_main(doc, name, title, run, render, argv=argv, **kw)


def subplots(rows: int, cols: int, width: float, height: float) -> tuple[Any, Any]:
    """A figure of ``rows x cols`` axes (a 2-d array), each ``width x height`` inches."""
    return pyplot().subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)


def figure(path: Path, panels: Sequence[dict], cols: int, size=(5.0, 4.0), title=None) -> Path:
    """Draw one axes per panel, row by row, and save it to ``path``. A panel holds ``lines``
    ``{label: [(x, y), ...]}`` (``fmt``: ``{label: "C0o-"}``, ``ms``: marker size), or
    ``bars`` ``{label: heights}`` side by side at ``ticks`` (horizontal if ``barh``), ``hlines``
    / ``vlines`` ``{label: at}``, and ``set``: keyword arguments of ``ax.set``."""
    fig, axes = subplots(-(-len(panels) // cols), cols, *size)
    for ax, p in zip(axes.flat, panels):
        for label, pts in p.get("lines", {}).items():
            xs, ys = zip(*pts) if pts else ((), ())
            ax.plot(xs, ys, p.get("fmt", {}).get(label, "-o"), ms=p.get("ms", 3), label=label)
        bars, width = p.get("bars", {}), 0.8 / max(len(p.get("bars", {})), 1)
        for i, (label, hs) in enumerate(bars.items()):
            at = [j + i * width for j in range(len(hs))]
            (ax.barh if p.get("barh") else ax.bar)(at, hs, width, label=label)
        if bars:
            at = [j + (len(bars) - 1) * width / 2 for j in range(len(p["ticks"]))]
            (ax.set_yticks if p.get("barh") else ax.set_xticks)(at, p["ticks"], fontsize=7)
        for i, (label, at) in enumerate(p.get("hlines", {}).items()):
            ax.axhline(at, color=f"C{i + 7}", ls=":", label=label)
        for i, (label, at) in enumerate(p.get("vlines", {}).items()):
            ax.axvline(at, color=f"C{i + 7}", ls="--", label=label)
        ax.set(**p.get("set", {}))
        ax.grid(True, which="both", alpha=0.3)
        if p.get("barh"):
            ax.invert_yaxis()
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.suptitle(title or "")
    return save_figure(fig, path)
