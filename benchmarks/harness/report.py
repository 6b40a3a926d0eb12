"""One writer of results: Markdown tables, the JSON file and the plots of a benchmark.

``Report(name, title, args)`` collects header bullets and sections (printed as they come),
then ``write(data, plot)`` writes ``<out>/<name>.md`` (what was printed), ``<name>.json``
(``{"machine", "args", **data, "total_seconds"}``, atomically) and the plots drawn from that
JSON by ``plot(data, out)``; ``--replot`` redraws them from the committed JSON alone.
"""

from __future__ import annotations

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

from .runner import log, machine_info, machine_line

Plot = Callable[[dict[str, Any], Path], Any]

# ============================================================================ numbers


def _bad(x: Any) -> bool:
    return x is None or (isinstance(x, float) and not math.isfinite(x))


def sci(x: float | None, digits: int = 2) -> str:
    """``1.23e-04``; ``—`` for a missing or non-finite value."""
    return "—" if _bad(x) else f"{x:.{digits}e}"


def fix(x: float | None, digits: int = 4) -> str:
    return "—" if _bad(x) else f"{x:.{digits}f}"


def ms(x: float | None) -> str:
    """Milliseconds with 3 significant-ish digits: ``0.123``, ``12.34``, ``1234``."""
    if _bad(x):
        return "—"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    """``a / b`` or ``—``."""
    return "—" if _bad(a) or _bad(b) or b <= 0 else f"{a / b:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; a header ending in ``:`` is right-aligned (the ``:`` dropped)."""
    names = [h[:-1] if h.endswith(":") else h for h in header]
    rule = ["---:" if h.endswith(":") else "---" for h in header]
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def bullets(items: Sequence[str]) -> str:
    return "\n".join(f"- {x}" for x in items)


# ============================================================================ files


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON data: dataclasses -> dicts, tensors -> lists, NaN/inf -> None."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Tensor):
        return obj.tolist() if obj.numel() != 1 or obj.dim() else float(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    return obj


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


def load(out: Path, name: str) -> dict[str, Any]:
    return json.loads((out / f"{name}.json").read_text())


class Report:
    """The Markdown and JSON results of one benchmark run (see the module docstring)."""

    def __init__(self, name: str, title: str, args: argparse.Namespace, **machine: Any):
        self.name, self.args, self.started = name, args, time.perf_counter()
        self.machine = machine_info(**machine)
        self.header = [f"# {title}", "", machine_line(self.machine)]
        self.header.append(f"- {'quick' if args.quick else 'full'} run; seed {args.seed}")
        self.sections: list[str] = []
        self.printed = False

    def note(self, *lines: str) -> None:
        """Header bullets (before the first section)."""
        self.header += [f"- {x}" for x in lines]

    def section(self, text: str) -> None:
        if not self.printed:
            print("\n".join(self.header), flush=True)
            self.printed = True
        self.sections.append(text)
        print("\n" + text, flush=True)

    def write(self, data: dict[str, Any], plot: Plot | None = None) -> dict[str, Any]:
        out: Path = self.args.out
        out.mkdir(parents=True, exist_ok=True)
        total = time.perf_counter() - self.started
        footer = f"\nTotal wall time: {total:.0f} s"
        print(footer, flush=True)
        md = "\n".join(self.header) + "\n\n" + "\n\n".join(self.sections) + "\n" + footer + "\n"
        payload = jsonable(
            {"machine": self.machine, "args": vars(self.args), **data, "total_seconds": total}
        )
        write_atomic(out / f"{self.name}.md", md)
        write_atomic(out / f"{self.name}.json", json.dumps(payload, indent=1) + "\n")
        log(f"wrote {out / self.name}.md and .json")
        if plot is not None:
            draw(plot, payload, out)
        return payload


def draw(plot: Plot, data: dict[str, Any], out: Path) -> None:
    """Draw a benchmark's plots; a missing matplotlib is reported, not raised."""
    try:
        log(f"wrote {plot(data, out)}")
    except ImportError as exc:
        log(f"plot skipped: {exc}")


def replot(args: argparse.Namespace, name: str, plot: Plot) -> bool:
    """With ``--replot``: redraw ``name``'s plots from its JSON and return True."""
    if args.replot:
        draw(plot, load(args.out, name), args.out)
    return bool(args.replot)
