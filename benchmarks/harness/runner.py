"""One way to time things: interleaved rounds, runs in lockstep, peak memory in a child process,
cold starts in a new interpreter; the shared options."""

import argparse
import contextlib
import ctypes
import functools
import gc
import importlib.metadata
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

import hypergradient as hg

T = TypeVar("T")
BENCHMARKS = Path(__file__).resolve().parent.parent
RESULTS = BENCHMARKS / "results"


def log(msg: str) -> None:
    """Progress on stderr (stdout carries the Markdown report)."""
    print(msg, file=sys.stderr, flush=True)


def cli(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with ``--quick``, ``--out``, ``--seed``, ``--threads``, ``--replot``."""
    p = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, a few seconds")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default results/)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and generators")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    p.add_argument("--replot", action="store_true", help="redraw tables and plots from the JSON")
    return p


def defaults(args: argparse.Namespace, **values: tuple[Any, Any]) -> None:
    """``args.<name> = (quick, full)[not args.quick]`` for every option the user left unset."""
    for name, (quick, full) in values.items():
        if getattr(args, name, None) is None:
            setattr(args, name, quick if args.quick else full)


def start(args: argparse.Namespace) -> None:
    """Seed torch's global generator and set the intra-op thread count."""
    torch.manual_seed(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)


def machine_info() -> dict[str, Any]:
    """Platform, CPUs, RAM, versions and thread counts (call after :func:`start`)."""
    ram = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    m = {"platform": platform.platform(), "processor": platform.processor() or platform.machine()}
    m |= {"python": platform.python_version(), "cpu_count": os.cpu_count(), "ram_gib": ram}
    m |= {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    m |= {"torch_interop_threads": torch.get_num_interop_threads(), "load_average": os.getloadavg()}
    return m | {"hypergradient": hg.__version__}


def error_text(exc: BaseException, limit: int = 300) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:limit]


def warning_texts(caught: Sequence[warnings.WarningMessage], limit: int = 300) -> list[str]:
    return sorted({f"{w.category.__name__}: {str(w.message)[:limit]}" for w in caught})


@contextlib.contextmanager
def recorded_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record every warning raised inside the block (deprecation notices dropped)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield caught


@functools.cache
def import_peer(module: str, distribution: str | None = None) -> tuple[Any, str]:
    """``(module, "version (path)")`` of a compared library, or ``(None, why it is skipped)``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = importlib.import_module(module)
    except Exception as exc:  # any import failure means "skip"
        log(f"{distribution or module} not importable, skipped: {error_text(exc)}")
        return None, error_text(exc)
    with contextlib.suppress(Exception):  # no distribution metadata
        version = importlib.metadata.version(distribution or module)
        return mod, f"{version} ({Path(mod.__file__ or '?').parent})"
    return mod, "unknown version"


def median(xs: Sequence[float | None]) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(statistics.median(xs)) if xs else math.nan


def pooled_ms(samples: Iterable[Sequence[float]]) -> float:
    """The median, in milliseconds, of every sample in seconds of every list."""
    return 1e3 * median([x for xs in samples for x in xs])


def rotation(items: Sequence[T], k: int) -> list[T]:
    """``items`` rotated left by ``k``: the order of round ``k`` of interleaved timing."""
    shift = k % max(1, len(items))
    return [*items[shift:], *items[:shift]]


def timed_call(fn: Callable[[], T], times: int = 1) -> tuple[T, float, float]:
    """``(last output, wall ms, CPU ms)`` per call of ``times`` calls in a row."""
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(times):
        out = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return out, 1e3 * wall / times, 1e3 * cpu / times


def calls_per_sample(fn: Callable[[], Any], seconds: float = 0.005) -> int:
    """How many calls of ``fn`` make one timing sample of at least ``seconds`` (max 2000)."""
    _, ms, _ = timed_call(fn, 5)
    return max(1, min(2000, math.ceil(1e3 * seconds / max(ms, 1e-4))))


@dataclass
class Case:
    """A callable timed in a group: ``call(i)`` with ``i`` the round (a seed)."""

    key: str
    call: Callable[[int], Any]
    info: Callable[[], Any] | None = None  # warm-up with diagnostics (default call(10_000))
    prepare: Callable[[], None] = lambda: None  # untimed, before every call
    inner: int = 1  # calls per timing sample (sub-millisecond callables)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Timing:
    """What :func:`interleave` recorded for one case (times in milliseconds)."""

    key: str
    meta: dict[str, Any] = field(default_factory=dict)
    warm: Any = None
    warm_ms: float = math.nan
    ms: float | None = None
    cpu_ms: float | None = None
    ms_all: list[float] = field(default_factory=list)
    cpu_ms_all: list[float] = field(default_factory=list)
    kept: list[Any] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    warned_calls: int = 0
    error: str | None = None
    traceback: str | None = None

    def row(self, **extra: Any) -> dict[str, Any]:
        """``extra``, the times, warnings and error: a row of a benchmark's JSON."""
        keys = ("ms", "cpu_ms", "ms_all", "cpu_ms_all", "warnings", "error")
        return extra | {k: getattr(self, k) for k in keys}


def interleave(
    cases: Sequence[Case],
    repeats: int | Callable[[float], int],
    keep: Callable[[Any], Any] | None = None,
) -> list[Timing]:
    """Warm up each case (output in ``warm``), then ``repeats`` rounds, one call of every case per
    round in an order rotated each round (slow drifts of a shared machine spread over all cases)."""
    res, live = [Timing(c.key, dict(c.meta)) for c in cases], []
    for c, r in zip(cases, res):
        with recorded_warnings() as caught:
            try:
                c.prepare()
                r.warm, r.warm_ms, _ = timed_call(c.info or (lambda c=c: c.call(10_000)))
                live.append((c, r))
            except Exception as exc:  # reported in the table
                r.error, r.traceback = error_text(exc), traceback.format_exc(limit=4)[-1500:]
        r.warnings = warning_texts(caught)
    n = repeats(max((r.warm_ms for _, r in live), default=0.0)) if callable(repeats) else repeats
    with recorded_warnings() as caught:
        for k in range(n):
            for c, r in rotation(live, k):
                seen = len(caught)
                c.prepare()
                out, ms, cpu = timed_call(lambda c=c, k=k: c.call(k), c.inner)
                r.ms_all.append(ms)
                r.cpu_ms_all.append(cpu)
                r.warned_calls += len(caught) > seen
                if keep is not None:
                    r.kept.append(keep(out))
    for _, r in live:
        r.ms, r.cpu_ms = median(r.ms_all), median(r.cpu_ms_all)
    return res


@dataclass
class Run:
    """A training run advanced one step at a time by :func:`lockstep`; a step whose index is a
    multiple of ``every`` holds a hyper-step (its time goes to ``hyper_s``)."""

    label: str
    step: Callable[[], Any]
    every: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    step_s: list[float] = field(default_factory=list)
    hyper_s: list[float] = field(default_factory=list)
    error: str | None = None
    error_step: int | None = None
    traceback: str | None = None


def lockstep(
    runs: Sequence[Run], steps: int, record: Callable[[Run, int], Any] | None = None
) -> list[str]:
    """Advance every run ``steps`` steps, one step each per round in rotating order, timed (a
    failing run stops, its error kept); ``record(run, t)`` after every step, untimed."""
    with recorded_warnings() as caught:
        for t in range(1, steps + 1):
            for r in rotation(runs, t - 1):
                if r.error is not None:
                    continue
                t0 = time.perf_counter()
                try:
                    r.step()
                except Exception as exc:  # reported in the table
                    r.error, r.error_step = error_text(exc, 400), t
                    r.traceback = traceback.format_exc(limit=6)[-2500:]
                    continue
                dt = time.perf_counter() - t0
                r.seconds += dt
                (r.hyper_s if r.every and t % r.every == 0 else r.step_s).append(dt)
                if record is not None:
                    record(r, t)
    return warning_texts(caught)


def loop_step(opt: Any, loss: Callable[[], Any], *args: Any) -> None:
    """The documented loop body of a torch optimizer or a ``HyperOptimizer``: zero_grad,
    backward, step."""
    opt.zero_grad()
    loss().backward()
    opt.step(*args)


def sgd_run(label: str, params: Any, loss: Callable[[], Any], lr: float, every: int = 0, **meta):
    """A :class:`Run` of plain ``torch.optim.SGD`` steps on ``loss()`` (``meta["opt"]``)."""
    opt = torch.optim.SGD(params, lr=lr)
    return Run(label, lambda: loop_step(opt, loss), every, meta | {"opt": opt})


def hopt_run(label: str, model: Any, hparams: Any, batch: Any, every: int, **kw: Any) -> Run:
    """A :class:`Run` of a ``HyperOptimizer(model, hparams, **kw)`` (``meta["hopt"]``)."""
    hopt = hg.HyperOptimizer(model, hparams, **kw)
    step = lambda: loop_step(hopt, lambda: hopt.train_loss(batch), batch)  # noqa: E731
    return Run(label, step, every, {"model": model, "hopt": hopt})


def rounds_of(make_runs: Callable[[], list[Run]], steps: int, rounds: int, record=None):
    """``rounds`` repetitions of fresh runs in :func:`lockstep`: (runs per round, warnings)."""
    out, warned = [], set()
    for rnd in range(rounds):
        runs = make_runs()
        log(f"  round {rnd + 1}/{rounds}: {len(runs)} runs x {steps} steps ...")
        for r in runs if record else ():
            record(r, 0)
        warned.update(lockstep(runs, steps, record))
        out.append(runs)
    return out, sorted(warned)


def leaves(tree: Any) -> Any:
    """``tree`` (tensors in tuples, lists, dicts) detached, each a leaf that requires grad."""
    if isinstance(tree, dict):
        return {k: leaves(v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return tuple(leaves(v) for v in tree)
    return tree.detach().requires_grad_(True)


try:
    _LIBC: Any = ctypes.CDLL("libc.so.6")  # malloc_trim, mallopt
except OSError:
    _LIBC = None


def settle() -> None:
    """Collect garbage and give the allocator's free pages back (``malloc_trim``)."""
    gc.collect()
    if _LIBC:
        _LIBC.malloc_trim(0)


def mmap_every_block() -> None:
    """``mallopt(M_MMAP_THRESHOLD, 4096)``: RSS then follows the live tensors."""
    settle()
    if not _LIBC or not _LIBC.mallopt(-3, 4096):
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) is not available")


def peak_memory(call: Callable[[], T], settled: bool = True) -> tuple[T, float, float, float]:
    """``(output, wall s, CPU s, peak RSS increase in MB)`` of one call."""
    if settled:
        settle()
    rss0 = int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    c0, t0 = time.process_time(), time.perf_counter()
    out = call()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return out, wall, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0


def _child(fn: Callable[..., Any], args: tuple, conn: Any) -> None:
    try:
        torch.set_num_threads(1)
        conn.send(("ok", fn(*args)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        traceback.print_exc()
        conn.send(("error", error_text(exc)))
    conn.close()


@functools.cache
def context() -> Any:
    """The multiprocessing context of every child: a forkserver that imported torch,
    ``torch._dynamo`` and hypergradient once, so that a child starts in milliseconds."""
    if str(BENCHMARKS) not in sys.path:  # the children unpickle functions of the scripts
        sys.path.append(str(BENCHMARKS))
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.func", "torch._dynamo", "hypergradient"])
    return ctx


def isolated(fn: Callable[..., T], *args: Any, timeout: float = 600.0) -> T:
    """``fn(*args)`` in a fresh child process (see :func:`context`), on one thread; raises
    ``RuntimeError`` if it fails."""
    recv, send = context().Pipe(duplex=False)
    proc = context().Process(target=_child, args=(fn, args, send))
    proc.start()
    send.close()
    status, value = "error", f"timeout after {timeout:.0f} s"
    if recv.poll(timeout):
        with contextlib.suppress(EOFError):
            status, value = "error", "the child died"
            status, value = recv.recv()
    proc.join(5.0)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if status != "ok":
        raise RuntimeError(value)
    return value


COLD = """
import json, sys, time
t0 = time.perf_counter()
import torch, hypergradient
out = {{"import_s": time.perf_counter() - t0}}
torch.set_num_threads(1)
import {module} as B
for key, call in B.cold_calls({what!r}).items():
    t, c = time.perf_counter(), time.process_time()
    call()
    out |= {{key + "_s": time.perf_counter() - t, key + "_cpu_s": time.process_time() - c}}
out["dynamo"] = "torch._dynamo" in sys.modules
print(json.dumps(out | {{"sympy": "sympy" in sys.modules}}))
"""


def cold_start(module: str, what: str = "") -> dict[str, Any]:
    """In a new interpreter: ``import_s`` of ``import torch, hypergradient``, then ``<key>_s``
    and ``<key>_cpu_s`` of each call of ``module.cold_calls(what)`` in turn (built untimed),
    and whether ``torch._dynamo`` (``dynamo``) or ``sympy`` got imported."""
    path = os.pathsep.join([str(BENCHMARKS), *sys.path])
    env = os.environ | {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", COLD.format(module=module, what=what)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])
