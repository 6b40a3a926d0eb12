"""Helpers shared by the benchmark scripts in this folder.

The scripts are run as ``python benchmarks/<name>.py``; Python puts the script's folder first
on ``sys.path``, so they import these helpers with ``from _common import ...`` (ruff counts
``_common`` as first-party because ``benchmarks`` is one of its ``src`` folders).

Only code that was the same logic in several scripts lives here. Where the scripts used to
differ in a detail that changes a number (a Hessian symmetrized or not, a chunk size), the
detail is a parameter and each script passes what it used before, so that the committed
results in ``benchmarks/results`` still describe what the scripts compute and print.

Contents, by section:

- run scaffolding: :func:`log`, :func:`add_common_arguments` (``--seed``, ``--threads``,
  ``--out``), :func:`start_run`, :func:`set_threads`, :func:`machine_info`,
  :func:`machine_line`, :func:`wall_footer`, :func:`write_results`, :func:`write_atomic`,
  :func:`jsonable`;
- errors, warnings and optional libraries: :func:`error_text`, :func:`warning_texts`,
  :func:`recorded_warnings`, :func:`import_seed_library`, :func:`pyplot`,
  :func:`save_figure`;
- data: :func:`load_sklearn`, :func:`standardize`, :class:`Data`,
  :func:`breast_cancer_data`;
- numerics: :func:`flat`, :func:`unflat`, :func:`relative_error`, :func:`cosine`,
  :func:`median`, :func:`newton`, :func:`damped_newton` (:class:`NotPositiveDefinite`),
  :func:`lbfgs`;
- timing: :func:`rotation` (the order of one round of interleaved timing) and
  :func:`timed_call` (wall and CPU milliseconds of a call).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import torch
from torch import Tensor

import hypergradient as hg

F64 = torch.float64
RESULTS = Path(__file__).resolve().parent / "results"
"""The default ``--out`` folder: ``benchmarks/results``, where the curated results live."""

T = TypeVar("T")
Batch = tuple[Tensor, Tensor]

# ============================================================================ run scaffolding


def log(msg: str) -> None:
    """Progress message on stderr (stdout carries the Markdown report)."""
    print(msg, file=sys.stderr, flush=True)


def add_common_arguments(
    parser: argparse.ArgumentParser,
    *,
    seed: bool = True,
    threads: bool = True,
    seed_help: str = "seed of torch's global generator and of the data (default 0)",
) -> None:
    """Add ``--seed`` and ``--threads`` (unless turned off) and ``--out`` to ``parser``.

    ``--seed`` defaults to 0 and ``--threads`` to 1, for steadier timings on a shared
    machine; apply both with :func:`start_run`. ``--out`` is the folder the results are
    written to, ``benchmarks/results`` by default (pass a temporary folder for trial runs,
    so that the committed results stay as they are).
    """
    if seed:
        parser.add_argument("--seed", type=int, default=0, help=seed_help)
    if threads:
        parser.add_argument(
            "--threads",
            type=int,
            default=1,
            help="torch.set_num_threads (default 1: steadier timings on a shared machine; "
            "0 keeps torch's default)",
        )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help="folder for the results (default benchmarks/results)",
    )


def set_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)``; ``threads <= 0`` keeps torch's default."""
    if threads > 0:
        torch.set_num_threads(threads)


def start_run(seed: int, threads: int) -> float:
    """Seed torch's global generator, set the intra-op threads; returns the start time.

    The returned ``time.perf_counter()`` is what :func:`wall_footer` measures from.
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    set_threads(threads)
    return started


def machine_info(**extra: Any) -> dict[str, Any]:
    """The machine and library versions a result was measured with.

    Keys: ``platform``, ``processor``, ``python``, ``cpu_count``, ``torch``,
    ``torch_threads``, ``torch_interop_threads``, then ``extra`` (e.g. another library's
    version), and ``hypergradient`` last. Call it after the thread count is set.
    """
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        **extra,
        "hypergradient": hg.__version__,
    }


def machine_line(machine: dict[str, Any]) -> str:
    """The Markdown header's bullet describing :func:`machine_info`'s machine."""
    return (
        f"- machine: {machine['platform']} ({machine['processor']}), {machine['cpu_count']} "
        f"CPUs; python {machine['python']}; torch {machine['torch']} with "
        f"{machine['torch_threads']} intra-op / {machine['torch_interop_threads']} "
        "inter-op threads"
    )


def wall_footer(started: float) -> tuple[float, str]:
    """Seconds since ``started`` and the report's footer line, which is also printed."""
    total = time.perf_counter() - started
    footer = f"\nTotal wall time: {total:.0f} s"
    print(footer, flush=True)
    return total, footer


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``.

    An interrupted run leaves the previous file whole instead of a truncated one.
    """
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(
    out: Path,
    stem: str,
    header: Sequence[str],
    sections: Sequence[str],
    footer: str,
    data: Any,
    indent: int = 1,
) -> None:
    """Write ``out/stem.md`` and ``out/stem.json`` (atomically; ``out`` is created).

    The Markdown is the header lines, a blank line, the sections separated by blank lines,
    and the footer (from :func:`wall_footer`): what the script printed on stdout. ``data``
    must already be JSON-ready (see :func:`jsonable`); it is dumped with ``indent``.
    """
    out.mkdir(parents=True, exist_ok=True)
    markdown = "\n".join(header) + "\n\n" + "\n\n".join(sections) + "\n" + footer + "\n"
    write_atomic(out / f"{stem}.md", markdown)
    write_atomic(out / f"{stem}.json", json.dumps(data, indent=indent) + "\n")
    log(f"wrote {out / stem}.md and .json")
    draw_plot(stem, out)


def draw_plot(stem: str, out: Path) -> None:
    """Draw ``out/stem.png`` from ``out/stem.json`` if :mod:`_plots` knows the benchmark."""
    from _plots import PLOTS, plot

    if stem in PLOTS:
        log(f"wrote {plot(stem, out=out)}")


def jsonable(obj: Any, custom: Callable[[Any], Any] | None = None) -> Any:
    """``obj`` as plain JSON data.

    Dataclass instances become dicts of their fields, tensors lists, dict keys strings,
    tuples lists, non-finite floats ``None`` (JSON has no NaN or infinity) and paths
    strings; containers are converted recursively. ``custom(obj)``, if given, is asked
    first at every level and takes over by returning anything but ``NotImplemented``
    (it may call ``jsonable(..., custom)`` for the parts).
    """
    if custom is not None:
        out = custom(obj)
        if out is not NotImplemented:
            return out
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name), custom) for f in fields(obj)}
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {str(k): jsonable(v, custom) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, custom) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ============================================================================ errors, libraries


def error_text(exc: BaseException, limit: int | None = None) -> str:
    """``"TypeName: message"``; with ``limit``, its first line cut to ``limit`` characters."""
    text = f"{type(exc).__name__}: {exc}"
    return text if limit is None else text.splitlines()[0][:limit]


def warning_texts(caught: Sequence[warnings.WarningMessage], limit: int | None = None) -> list[str]:
    """The distinct ``"Category: message"`` of recorded warnings, sorted; messages cut to
    ``limit`` characters if given."""
    return sorted({f"{w.category.__name__}: {str(w.message)[:limit]}" for w in caught})


@contextmanager
def recorded_warnings(ignore_deprecations: bool = False) -> Iterator[list[warnings.WarningMessage]]:
    """Record every warning raised inside the block (each one, not once per location).

    With ``ignore_deprecations``, ``FutureWarning`` and ``DeprecationWarning`` (torch's
    and functorch's own notices, noise in a benchmark) are dropped instead.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if ignore_deprecations:
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield caught


def import_seed_library(
    module: str, distribution: str, quiet: bool = False
) -> tuple[ModuleType | None, str]:
    """Import a library compared against; ``(module, version text)`` or ``(None, error)``.

    Any import failure means "skip the comparison", so it is returned, not raised. The
    version text is the installed ``distribution``'s version and the module's folder.
    ``quiet`` silences warnings raised while importing.
    """
    try:
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
            mod = importlib.import_module(module)
    except Exception as exc:  # any import failure means "skip"
        return None, error_text(exc)
    try:
        from importlib.metadata import version

        return mod, f"{version(distribution)} ({Path(mod.__file__ or '?').parent})"
    except Exception:
        return mod, f"unknown version ({mod.__file__})"


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (raises if not installed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Save ``fig`` to ``path`` atomically (temporary file, then ``os.replace``); close it."""
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
    os.replace(tmp, path)


# ============================================================================ data


def load_sklearn(
    name: str,
    dtype: torch.dtype = F64,
    y_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """``X, y`` of scikit-learn's bundled ``"breast_cancer"`` or ``"digits"`` as tensors.

    ``y`` has ``y_dtype`` (default: ``dtype``). With ``generator``, the rows are shuffled by
    ``torch.randperm(n, generator=generator)``, which advances that generator.
    """
    from sklearn.datasets import load_breast_cancer, load_digits

    loaders = {"breast_cancer": load_breast_cancer, "digits": load_digits}
    X_np, y_np = loaders[name](return_X_y=True)
    X = torch.as_tensor(X_np, dtype=dtype)
    y = torch.as_tensor(y_np, dtype=y_dtype or dtype)
    if generator is not None:
        perm = torch.randperm(len(y_np), generator=generator)
        X, y = X[perm], y[perm]
    return X, y


def standardize(X: Tensor, n: int | None = None) -> Tensor:
    """Columns centred and scaled with the mean and standard deviation of the first ``n``
    rows (the training rows; all rows if ``n`` is None); constant columns are only
    centred."""
    mu, sd = X[:n].mean(0), X[:n].std(0)
    return (X - mu) / torch.where(sd > 0, sd, torch.ones_like(sd))


@dataclass
class Data:
    """Full-batch train / validation / test splits, each ``(X, y)``."""

    train: Batch
    val: Batch
    test: Batch

    @property
    def dim(self) -> int:
        return self.train[0].shape[1]


def breast_cancer_data(seed: int, y_column: bool = False) -> Data:
    """Breast cancer in float64, shuffled with ``seed``, standardized with the training
    statistics, 100 train / 200 validation / 269 test; ``y`` of shape ``(n,)``, or
    ``(n, 1)`` with ``y_column`` (the shape of an ``nn.Linear(D, 1)`` output)."""
    X, y = load_sklearn("breast_cancer", generator=torch.Generator().manual_seed(seed))
    if y_column:
        y = y.unsqueeze(1)
    X = standardize(X, 100)
    return Data((X[:100], y[:100]), (X[100:300], y[100:300]), (X[300:], y[300:]))


# ============================================================================ numerics


def flat(tree: Sequence[Tensor]) -> Tensor:
    """The tensors of ``tree`` flattened and concatenated into one vector."""
    return torch.cat([t.reshape(-1) for t in tree])


def unflat(vec: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Inverse of :func:`flat`: ``vec`` cut into views shaped like the tensors of ``like``."""
    out, i = [], 0
    for t in like:
        out.append(vec[i : i + t.numel()].reshape(t.shape))
        i += t.numel()
    return tuple(out)


def relative_error(h: Tensor, ref: Tensor) -> float:
    """``||h - ref|| / ||ref||``, with ``h`` cast to float64 (the references are float64)."""
    return float(torch.linalg.vector_norm(h.to(F64) - ref) / torch.linalg.vector_norm(ref))


def cosine(h: Tensor, ref: Tensor) -> float:
    """Cosine of the angle between ``h`` (cast to float64) and ``ref``, both flattened;
    NaN if either is zero."""
    h = h.to(F64).reshape(-1)
    den = torch.linalg.vector_norm(h) * torch.linalg.vector_norm(ref)
    return float(torch.dot(h, ref.reshape(-1)) / den) if float(den) > 0 else math.nan


def median(xs: Sequence[float]) -> float:
    """Median of ``xs``; NaN if there is none."""
    return float(statistics.median(xs)) if xs else math.nan


def newton(
    f: Callable[[Tensor], Tensor], theta: Tensor, tol: float = 1e-12, maxiter: int = 50
) -> Tensor:
    """Plain Newton's method on a flat vector with the dense Hessian (``torch.func``).

    Full steps, no line search: for small strongly convex problems started near enough
    (logistic regression from zero). Stops at ``||grad f|| < tol`` or after ``maxiter``
    steps.
    """
    grad, hess = torch.func.grad(f), torch.func.hessian(f)
    for _ in range(maxiter):
        gr = grad(theta)
        if float(gr.norm()) < tol:
            break
        theta = theta - torch.linalg.solve(hess(theta), gr)
    return theta.detach()


class NotPositiveDefinite(RuntimeError):
    """The dense Hessian met by :func:`damped_newton` is not positive definite."""


def damped_newton(
    f: Callable[[Tensor], Tensor],
    theta: Tensor,
    tol: float,
    maxiter: int = 50,
    *,
    chunk_size: int = 64,
    symmetrize: bool = True,
) -> tuple[Tensor, int, float]:
    """Damped Newton on a flat vector with the dense Hessian and Armijo backtracking.

    The Hessian is ``torch.func.jacrev(grad f, chunk_size=chunk_size)``, symmetrized as
    ``(H + H') / 2`` if ``symmetrize`` (its Cholesky factor reads the lower triangle only,
    so the two choices differ at round-off), and factored by Cholesky. Stops at
    ``||grad f|| <= tol``; returns ``(theta, Newton steps taken, final gradient norm)``.
    Raises :class:`NotPositiveDefinite` if a Hessian on the way is not positive definite.
    """
    grad_f = torch.func.grad(f)
    hess_f = torch.func.jacrev(grad_f, chunk_size=chunk_size)
    value = f(theta)
    it = 0
    for it in range(1, maxiter + 1):  # noqa: B007 (reported)
        g = grad_f(theta)
        if float(torch.linalg.vector_norm(g)) <= tol:
            it -= 1
            break
        H = hess_f(theta)
        if symmetrize:
            H = 0.5 * (H + H.T)
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) != 0:
            raise NotPositiveDefinite(f"Newton iteration {it}: Cholesky failed")
        step = torch.cholesky_solve(g.unsqueeze(1), L).squeeze(1)
        slope = float(g @ step)
        t = 1.0
        while True:  # Armijo backtracking; full steps near the minimum
            candidate = theta - t * step
            new_value = f(candidate)
            if float(new_value) <= float(value) - 1e-4 * t * slope or t < 1e-8:
                break
            t *= 0.5
        theta, value = candidate.detach(), new_value
    gnorm = float(torch.linalg.vector_norm(grad_f(theta)))
    return theta, it, gnorm


def lbfgs(f: Callable[[Tensor], Tensor], theta: Tensor, iters: int) -> Tensor:
    """``iters`` iterations of ``torch.optim.LBFGS`` (strong Wolfe, history 50) from
    ``theta`` on a flat vector; returns the detached result."""
    x = theta.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [x],
        lr=1.0,
        max_iter=iters,
        max_eval=2 * iters,
        tolerance_grad=1e-12,
        tolerance_change=0.0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = f(x)
        loss.backward()
        return loss

    opt.step(closure)
    return x.detach()


# ============================================================================ timing


def rotation(items: Sequence[T], k: int) -> list[T]:
    """``items`` rotated left by ``k`` (modulo their number).

    The order of round ``k`` of interleaved timing: every item is called once per round
    and the order rotates from round to round, so slow drifts of a shared machine spread
    over all items instead of favouring the first.
    """
    shift = k % max(1, len(items))
    return [*items[shift:], *items[:shift]]


def timed_call(fn: Callable[[], T], times: int = 1) -> tuple[T, float, float]:
    """Call ``fn`` ``times`` times in a row; ``(last result, wall ms, CPU ms)`` per call.

    Wall time is ``time.perf_counter``; CPU time is ``time.process_time`` (the process's
    own, which excludes time slices lost to other jobs on a shared machine).
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(times):
        out = fn()
    cpu = time.process_time() - cpu_started
    wall = time.perf_counter() - started
    return out, 1e3 * wall / times, 1e3 * cpu / times
