"""Time of a data-parallel hyper-step (2 gloo processes) against one process, same global batch.

``hg.implicit`` (CG 20), ``hg.unrolled`` (10 SGD steps) and a ``HyperOptimizer`` step with DDP
on an MNIST MLP, each in one process on the whole batch and in two gloo processes with half
each, plus the controls ``half`` (one rank alone) and ``nocomm`` (both ranks, no all-reduce);
all-reduces counted and timed. Cases, controls and settings: benchmarks/README.md.
"""

from __future__ import annotations

import os
import queue
import socket
import statistics
import time
import traceback
import warnings
from typing import Any

import numpy as np
import torch

from harness import Report, cli, log, start

F = torch.nn.functional
D_IN, N_CLASSES = 784, 10

# ---------------------------------------------------------------- cases


def full_cases() -> list[dict[str, Any]]:
    cases = []
    for hidden in (12, 112, 400):
        for batch in (512, 2048):
            cases.append(dict(kind="implicit", hidden=hidden, batch=batch, dtype="float32"))
    cases += [
        dict(kind="implicit", hidden=12, batch=512, dtype="float64"),
        dict(kind="implicit", hidden=112, batch=2048, dtype="float64"),
        dict(kind="unrolled", hidden=112, batch=512, dtype="float32"),
        dict(kind="unrolled", hidden=112, batch=2048, dtype="float32"),
        dict(kind="unrolled", hidden=112, batch=512, dtype="float64"),
        dict(kind="hyperopt", hidden=112, batch=512, dtype="float32"),
        dict(kind="hyperopt", hidden=112, batch=2048, dtype="float32"),
        dict(kind="hyperopt", hidden=112, batch=512, dtype="float64"),
        dict(kind="allreduce", hidden=0, batch=0, dtype="float32", sizes=[12, 112, 400]),
    ]
    return cases


def quick_cases() -> list[dict[str, Any]]:
    return [
        dict(kind="implicit", hidden=4, batch=64, dtype="float32"),
        dict(kind="allreduce", hidden=0, batch=0, dtype="float32", sizes=[4]),
    ]


def shapes(hidden: int) -> list[tuple[int, ...]]:
    """Parameter shapes of nn.Sequential(Linear(784,h), Tanh, Linear(h,h), Tanh, Linear(h,10))."""
    h = hidden
    return [(h, D_IN), (h,), (h, h), (h,), (N_CLASSES, h), (N_CLASSES,)]


def num_params(hidden: int) -> int:
    return sum(torch.Size(s).numel() for s in shapes(hidden))


def mlp(w: torch.Tensor, x: torch.Tensor, hidden: int) -> torch.Tensor:
    sh = shapes(hidden)
    sizes = [torch.Size(s).numel() for s in sh]
    W1, b1, W2, b2, W3, b3 = (t.reshape(s) for t, s in zip(torch.split(w, sizes), sh))
    a = torch.tanh(F.linear(x, W1, b1))
    a = torch.tanh(F.linear(a, W2, b2))
    return F.linear(a, W3, b3)


_DATA: tuple[torch.Tensor, torch.Tensor] | None = None


def mnist() -> tuple[torch.Tensor, torch.Tensor]:
    global _DATA
    if _DATA is None:
        from harness.problems import mnist as load_mnist

        X, y = load_mnist(torch.float64)
        X = (X - X.mean(0)) / (X.std(0) + 0.1)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        _DATA = X[perm], y[perm]
    return _DATA


def global_batches(batch: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """The training batch (first ``batch`` examples) and the validation batch (last ones)."""
    X, y = mnist()
    return (X[:batch], y[:batch]), (X[-batch:], y[-batch:])


def pretrain(hidden: int, batch: int, iters: int) -> np.ndarray:
    """Weights at a minimum of the training loss on the global training batch (L-BFGS)."""
    gen = torch.Generator().manual_seed(hidden)
    parts = []
    for s in shapes(hidden):
        if len(s) == 2:
            parts.append(torch.randn(s, generator=gen, dtype=torch.float64) / s[1] ** 0.5)
        else:
            parts.append(torch.zeros(s, dtype=torch.float64))
    w = torch.cat([p.reshape(-1) for p in parts]).float().requires_grad_(True)
    (X, y), _ = global_batches(batch)
    X = X.float()
    decay = float(np.exp(-3.0))
    opt = torch.optim.LBFGS(
        [w],
        max_iter=iters,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=0.0,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(mlp(w, X, hidden), y) + 0.5 * decay * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().double().numpy()


# ---------------------------------------------------------------- worker side

STATS = {"calls": 0, "bytes": 0, "ar_seconds": 0.0, "ddp_calls": 0, "ddp_bytes": 0}


def _install_counter() -> Any:
    import torch.distributed as dist

    original = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        STATS["calls"] += 1
        STATS["bytes"] += tensor.numel() * tensor.element_size()
        t0 = time.perf_counter()
        try:
            return original(tensor, *args, **kwargs)
        finally:
            STATS["ar_seconds"] += time.perf_counter() - t0

    dist.all_reduce = counting_all_reduce
    return original


def _reset_stats() -> None:
    for k in STATS:
        STATS[k] = 0.0 if k == "ar_seconds" else 0


def _setup(
    case: dict[str, Any], w0: np.ndarray, rank: int, world: int, group: Any, sync: Any
) -> Any:
    """Build the case on this rank; return a function that makes one timed call.

    ``group`` is passed to the library (None: no communication, each rank computes the
    hypergradient of its own shard: the compute-only control); ``sync`` is the group used
    for the barrier before a timed call.
    """
    import hypergradient as hg

    dtype = getattr(torch, case["dtype"])
    hidden, batch = case["hidden"], case["batch"]
    if case["kind"] == "allreduce":
        sizes = {"1 value": 1}
        sizes.update({f"P = {num_params(h):,} values": num_params(h) for h in case["sizes"]})
        if group is None:
            return None

        def run_allreduce() -> dict[str, Any]:
            out = {}
            for name, n in sizes.items():  # back to back
                t = torch.ones(n)
                times = []
                for _ in range(45):
                    t0 = time.perf_counter()
                    torch.distributed.all_reduce(t, group=group)
                    times.append(time.perf_counter() - t0)
                out[name] = statistics.median(times[5:])
            return {"latency": out}

        return run_allreduce
    (Xt, yt), (Xv, yv) = global_batches(batch)
    size = batch // world
    mine = slice(rank * size, (rank + 1) * size)
    Xt, yt, Xv, yv = Xt[mine].to(dtype), yt[mine], Xv[mine].to(dtype), yv[mine]
    w = torch.as_tensor(w0).to(dtype)
    P = w.numel()
    log_decay = torch.full((P,), -3.0, dtype=dtype)

    def f(p, loglam):
        return F.cross_entropy(mlp(p, Xt, hidden), yt) + 0.5 * (loglam.exp() * p**2).sum()

    def g(p, loglam):
        return F.cross_entropy(mlp(p, Xv, hidden), yv)

    if case["kind"] == "implicit":

        def run_implicit(dt: torch.dtype = dtype) -> dict[str, Any]:
            args = (w.to(dt), log_decay.to(dt))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                hyper, info = hg.implicit(
                    f if dt == dtype else f64,
                    g if dt == dtype else g64,
                    *args,
                    hg.CG(maxiter=20, tol=0.0),
                    process_group=group,
                    return_info=True,
                )
            return {
                "hyper": hyper.double().numpy(),
                "num_hvps": info.num_hvps,
                "status": info.status,
                "warnings": sorted({str(c.message)[:80] for c in caught}),
            }

        Xt64, Xv64 = Xt.double(), Xv.double()

        def f64(p, loglam):
            return F.cross_entropy(mlp(p, Xt64, hidden), yt) + 0.5 * (loglam.exp() * p**2).sum()

        def g64(p, loglam):
            return F.cross_entropy(mlp(p, Xv64, hidden), yv)

        run_implicit.float64 = lambda: run_implicit(torch.float64)  # type: ignore[attr-defined]
        return run_implicit

    if case["kind"] == "unrolled":
        lr = torch.tensor(0.05, dtype=dtype)

        def run_unrolled(dt: torch.dtype = dtype) -> dict[str, Any]:
            hp = {"log_decay": log_decay.to(dt), "lr": lr.to(dt)}
            Xa, Xb = Xt.to(dt), Xv.to(dt)

            def tf(p, h):
                return (
                    F.cross_entropy(mlp(p, Xa, hidden), yt)
                    + 0.5 * (h["log_decay"].exp() * p**2).sum()
                )

            def tg(p, h):
                return F.cross_entropy(mlp(p, Xb, hidden), yv)

            hyper = hg.unrolled(
                tf, tg, w.to(dt), hp, 10, hg.optim.sgd(lr=hp["lr"]), process_group=group
            )
            flat = torch.cat([hyper["log_decay"].reshape(-1), hyper["lr"].reshape(-1)])
            return {"hyper": flat.double().numpy(), "num_hvps": None, "status": ""}

        run_unrolled.float64 = lambda: run_unrolled(torch.float64)  # type: ignore[attr-defined]
        return run_unrolled

    assert case["kind"] == "hyperopt"
    model = torch.nn.Sequential(
        torch.nn.Linear(D_IN, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, N_CLASSES),
    ).to(dtype)
    start = [
        t.reshape(s).clone()
        for t, s in zip(
            torch.split(w, [torch.Size(s).numel() for s in shapes(hidden)]), shapes(hidden)
        )
    ]
    with torch.no_grad():
        for p, v in zip(model.parameters(), start):
            p.copy_(v)
    net: Any = model
    if group is not None:
        net = torch.nn.parallel.DistributedDataParallel(model, process_group=group)
        original = _ORIGINAL_ALL_REDUCE

        def counting_hook(state, bucket):
            buf = bucket.buffer()
            STATS["ddp_calls"] += 1
            STATS["ddp_bytes"] += buf.numel() * buf.element_size()
            buf.div_(world)
            fut = original(buf, group=group, async_op=True).get_future()
            return fut.then(lambda fu: fu.value()[0])

        net.register_comm_hook(None, counting_hook)
    decays = {
        name.replace(".", "_"): hg.Positive(torch.full_like(p, float(np.exp(-3.0))))
        for name, p in model.named_parameters()
        if p.dim() == 2
    }
    raw0 = {k: d.raw.detach().clone() for k, d in decays.items()}

    def train_loss(m, h, b):
        weights = [p for p in m.parameters() if p.dim() == 2]
        penalty = sum((d * v**2).sum() for d, v in zip(h.values(), weights))
        return F.cross_entropy(m(b[0]), b[1]) + 0.5 * penalty

    def val_loss(m, h, b):
        return F.cross_entropy(m(b[0]), b[1])

    def run_hyperopt() -> dict[str, Any]:
        with torch.no_grad():  # the same state before every call
            for p, v in zip(model.parameters(), start):
                p.copy_(v)
            for k, d in decays.items():
                d.raw.copy_(raw0[k])
        hopt = hg.HyperOptimizer(
            net,
            decays,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.05),
            train_loss=train_loss,
            val_loss=val_loss,
            val_data=(Xv, yv),
            method=hg.IFT(hg.Neumann(iters=20, alpha="auto")),
            inner_steps=1,
            process_group=group,
        )
        if sync is not None and _BARRIER[0]:
            torch.distributed.barrier(sync)
        _reset_stats()
        hopt.zero_grad()
        hopt.train_loss((Xt, yt)).backward()
        c0 = time.process_time()
        hopt.step((Xt, yt))  # the inner SGD step (negligible), then the hyper-step
        cpu = time.process_time() - c0
        rec = hopt.history[-1]
        flat = torch.cat([rec.hypergrad[k].reshape(-1) for k in decays])
        return {
            "hyper": flat.double().numpy(),
            "num_hvps": rec.diagnostics.get("num_hvps"),
            "status": str(rec.diagnostics.get("status", "")),
            "seconds_override": rec.seconds,
            "cpu_override": cpu,
        }

    run_hyperopt.resets_stats = True  # type: ignore[attr-defined]
    return run_hyperopt


_ORIGINAL_ALL_REDUCE: Any = None
_BARRIER = [True]  # False for the "half" control, where rank 0 runs alone


def worker(role: str, rank: int, world: int, port: int, inbox: Any, outbox: Any) -> None:
    global _ORIGINAL_ALL_REDUCE
    try:
        torch.set_num_threads(1)
        group = None
        if world > 1:
            import torch.distributed as dist

            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(port)
            dist.init_process_group("gloo", rank=rank, world_size=world)
            group = dist.group.WORLD
            _ORIGINAL_ALL_REDUCE = _install_counter()
        run = nocomm = None
        while True:
            msg = inbox.get()
            if msg[0] == "stop":
                break
            if msg[0] == "setup":
                run = nocomm = None
                run = _setup(msg[1], msg[2], rank, world, group, group)
                if group is not None and msg[1]["kind"] != "allreduce":
                    nocomm = _setup(msg[1], msg[2], rank, world, None, group)
                outbox.put((role, rank, "ready", None))
                continue
            want_hyper, want_f64, mode = msg[1], msg[2], msg[3]
            handling = time.process_time()
            fn = nocomm if mode in ("nocomm", "half") else run
            assert fn is not None
            _BARRIER[0] = mode != "half"
            if group is not None and _BARRIER[0] and not getattr(fn, "resets_stats", False):
                torch.distributed.barrier(group)
            _reset_stats()
            c0, t0 = time.process_time(), time.perf_counter()
            out = fn()
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            out["seconds"] = out.pop("seconds_override", seconds)
            out["cpu"] = out.pop("cpu_override", cpu)
            out.update({k: v for k, v in STATS.items()})
            if not want_hyper:
                out.pop("hyper", None)
            if want_f64 and hasattr(fn, "float64"):
                out["hyper64"] = fn.float64()["hyper"]
            out["cpu_total"] = time.process_time() - handling
            outbox.put((role, rank, "done", out))
    except BaseException:  # noqa: BLE001 - reported to the parent
        outbox.put((role, rank, "error", traceback.format_exc()))
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- parent side


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pool:
    def __init__(self) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        self.outbox = ctx.Queue()
        port = _free_port()
        self.inboxes = {
            ("solo", 0): ctx.Queue(),
            ("pair", 0): ctx.Queue(),
            ("pair", 1): ctx.Queue(),
        }
        self.procs = []
        for (role, rank), inbox in self.inboxes.items():
            world = 1 if role == "solo" else 2
            p = ctx.Process(target=worker, args=(role, rank, world, port, inbox, self.outbox))
            p.start()
            self.procs.append(p)

    def ask(self, who: list[tuple[str, int]], msg: tuple) -> dict[tuple[str, int], Any]:
        for key in who:
            self.inboxes[key].put(msg)
        answers: dict[tuple[str, int], Any] = {}
        while len(answers) < len(who):
            try:
                role, rank, status, payload = self.outbox.get(timeout=600)
            except queue.Empty as err:
                raise RuntimeError("a worker did not answer within 10 minutes") from err
            if status == "error":
                raise RuntimeError(f"worker {role} {rank} failed:\n{payload}")
            answers[(role, rank)] = payload
        return answers

    def close(self) -> None:
        for inbox in self.inboxes.values():
            inbox.put(("stop",))
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()


SOLO = [("solo", 0)]
PAIR = [("pair", 0), ("pair", 1)]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _busy_seconds() -> float:
    """CPU seconds spent by the whole machine (every process), from /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            fields = [float(x) for x in fh.readline().split()[1:]]
    except OSError:
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# world1: the whole global batch in one process; half: rank 0 alone on its half (rank 1
# idle); nocomm: both ranks at once on their halves without communicating (each gets the
# hypergradient of its own shard); world2: the real thing, process_group=WORLD.
CONFIGS = {"world1": SOLO, "half": PAIR[:1], "nocomm": PAIR, "world2": PAIR}
BUSY = 0.3  # a round during which other processes used more cores than this is repeated
# seconds the whole run may spend waiting for a quiet machine / repeating loaded rounds
QUIET = {"budget": 60.0, "redo": 60.0}


def _wait_quiet() -> None:
    """Wait (within the run's budget) until other processes use under BUSY cores."""
    while QUIET["budget"] > 0:
        b0, t0 = _busy_seconds(), time.perf_counter()
        time.sleep(0.5)
        dt = time.perf_counter() - t0
        if (_busy_seconds() - b0) / dt < BUSY:  # the workers are idle meanwhile
            return
        QUIET["budget"] -= dt


def measure(pool: Pool, case: dict[str, Any], w0: np.ndarray, reps: int) -> dict[str, Any]:
    pool.ask(SOLO + PAIR, ("setup", case, w0))
    if case["kind"] == "allreduce":
        lat = [pool.ask(PAIR, ("run", False, False, "world2")) for _ in range(3)]
        names = list(lat[0][("pair", 0)]["latency"])
        return {
            **case,
            "latency_s": {
                n: statistics.median(max(a[k]["latency"][n] for k in PAIR) for a in lat)
                for n in names
            },
        }
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    cpus: dict[str, list[float]] = {c: [] for c in CONFIGS}
    kept_bg: list[float] = []
    dropped_bg: list[float] = []
    names = list(CONFIGS)
    rep = 0
    while len(kept_bg) < reps:
        if rep:
            _wait_quiet()
        k = rep % len(names)
        got = {}
        busy0, wall0, own = _busy_seconds(), time.perf_counter(), 0.0
        for config in names[k:] + names[:k]:  # rotate the order
            own0 = time.process_time()
            ans = pool.ask(CONFIGS[config], ("run", False, False, config))
            own += time.process_time() - own0 + sum(a["cpu_total"] for a in ans.values())
            got[config] = ans
        wall = time.perf_counter() - wall0
        bg = max(_busy_seconds() - busy0 - own, 0.0) / wall
        rep += 1
        if rep == 1:
            continue  # warm-up
        if bg > BUSY and len(dropped_bg) < reps and QUIET["redo"] > 0:
            QUIET["redo"] -= wall  # another job took a core: repeat this round
            dropped_bg.append(bg)
            continue
        kept_bg.append(bg)
        for config, ans in got.items():
            times[config].append(max(a["seconds"] for a in ans.values()))
            cpus[config].append(sum(a["cpu"] for a in ans.values()))
    # the hypergradients (untimed): 1 process with its float64 reference, and 2 processes
    last = {
        "world1": pool.ask(SOLO, ("run", True, case["dtype"] == "float32", "world1")),
        "world2": pool.ask(PAIR, ("run", True, False, "world2")),
    }
    s0 = last["world1"][("solo", 0)]
    p0, p1 = last["world2"][("pair", 0)], last["world2"][("pair", 1)]
    med = {c: statistics.median(t) for c, t in times.items()}
    out = {
        **case,
        "params": num_params(case["hidden"]),
        **{f"{c}_seconds": times[c] for c in CONFIGS},
        **{f"{c}_cpu_seconds_sum_ranks": cpus[c] for c in CONFIGS},
        **{f"{c}_median_s": med[c] for c in CONFIGS},
        "background_cores_kept_rounds": kept_bg,
        "background_cores_dropped_rounds": dropped_bg,
        "speedup": med["world1"] / med["world2"],
        "speedup_half_alone": med["world1"] / med["half"],
        "speedup_without_communication": med["world1"] / med["nocomm"],
        "allreduce_calls": p0["calls"],
        "allreduce_bytes_per_rank": p0["bytes"],
        "allreduce_seconds_rank0": p0["ar_seconds"],
        "allreduce_seconds_rank1": p1["ar_seconds"],
        "ddp_allreduce_calls": p0["ddp_calls"],
        "ddp_allreduce_bytes_per_rank": p0["ddp_bytes"],
        "num_hvps_world1": s0["num_hvps"],
        "num_hvps_world2": p0["num_hvps"],
        "status_world1": s0["status"],
        "status_world2": p0["status"],
        "warnings_world1": s0.get("warnings", []),
        "warnings_world2": p0.get("warnings", []),
        "ranks_bit_identical": bool(np.array_equal(p0["hyper"], p1["hyper"])),
        "rel_diff_world2_vs_world1": rel(p0["hyper"], s0["hyper"]),
        "hypergrad_norm": float(np.linalg.norm(s0["hyper"])),
    }
    if "hyper64" in s0:
        out["rel_diff_world1_float32_vs_float64"] = rel(s0["hyper"], s0["hyper64"])
        out["rel_diff_world2_float32_vs_float64"] = rel(p0["hyper"], s0["hyper64"])
    return out


def _counts(rows: list[dict[str, Any]], kind: str) -> str:
    """The all-reduce counts per call of one kind of case, e.g. ``23`` or ``23-25``."""
    got = sorted({r["allreduce_calls"] for r in rows if r["kind"] == kind})
    return "-".join(str(c) for c in (got[:1] + got[-1:] if len(got) > 1 else got)) or "?"


def case_name(r: dict[str, Any]) -> str:
    what = {
        "implicit": "implicit, CG 20",
        "unrolled": "unrolled, 10 SGD steps",
        "hyperopt": "HyperOptimizer + DDP, IFT/Neumann 20+20",
    }[r["kind"]]
    return what


def markdown(machine: str, results: list[dict[str, Any]], reps: int, seconds: float) -> str:
    rows = [r for r in results if r["kind"] != "allreduce"]
    same = all(r["ranks_bit_identical"] for r in rows)
    dropped = sum(len(r["background_cores_dropped_rounds"]) for r in rows)
    lines = [
        "# Distributed hyper-steps: 2 gloo processes against 1, same global batch",
        "",
        f"machine: {machine}",
        "",
        f"Medians of {reps} rounds after a warm-up round (whole run {seconds:.0f} s); a round "
        "runs the four configurations one after the other, in rotating order. Seconds per "
        "hypergradient: `1 proc` = the whole global batch in one process; `2 procs` = 2 gloo "
        "processes with half each and `process_group=WORLD` (the slower rank). Controls: "
        "`half alone` = one process on half the batch while the other core is idle; `2, no "
        "comm.` = both processes on their halves at the same time without `process_group` "
        "(no all-reduce; each gets its own shard's hypergradient). `all-reduces` and `MB` are "
        "per call and per rank, MB = payload (the trajectory methods and the HyperOptimizer's "
        "first all-reduce widen to float64); `in a.-r.` is rank 0's wall time inside the "
        "all-reduces, waiting for the other rank included. `bg` = CPU cores used by other "
        f"processes during the kept rounds (/proc/stat; {dropped} round(s) with more than "
        f"{BUSY} were repeated). `w2 vs w1` = `||h_2 - h_1|| / ||h_1||`; `f32 vs f64` = the "
        "1-process float32 result against the float64 one (float32's own rounding, for "
        "scale). Both ranks' hypergradients bit-identical in every case: "
        + ("yes." if same else "**NO**."),
        "",
        "| case | P | global batch | dtype | 1 proc s | 2 procs s | speedup "
        "| half alone s | 2, no comm. s | all-reduces | MB | in a.-r. s | bg "
        "| w2 vs w1 | f32 vs f64 |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        calls = str(r["allreduce_calls"])
        if r["kind"] == "hyperopt":
            calls += f" + {r['ddp_allreduce_calls']} DDP"
        f64 = r.get("rel_diff_world1_float32_vs_float64")
        bg = statistics.mean(r["background_cores_kept_rounds"])
        lines.append(
            f"| {case_name(r)} | {r['params']:,} | {r['batch']:,} | {r['dtype']} "
            f"| {r['world1_median_s']:.3f} | {r['world2_median_s']:.3f} "
            f"| **{r['speedup']:.2f}** | {r['half_median_s']:.3f} | {r['nocomm_median_s']:.3f} "
            f"| {calls} | {r['allreduce_bytes_per_rank'] / 1e6:.1f} "
            f"| {r['allreduce_seconds_rank0']:.3f} | {bg:.2f} "
            f"| {r['rel_diff_world2_vs_world1']:.1e} | {'' if f64 is None else f'{f64:.1e}'} |"
        )
    lat = [r for r in results if r["kind"] == "allreduce"]
    latency: dict[str, float] = {}
    for r in lat:
        latency.update(r["latency_s"])
    if latency:
        lines += ["", "Median time of one gloo all-reduce between the 2 processes (alone):", ""]
        lines += [f"- {name} (float32): {1e3 * sec:.3f} ms" for name, sec in latency.items()]
    hvps = sorted({(r["kind"], r["num_hvps_world1"], r["num_hvps_world2"]) for r in rows})
    statuses = sorted(
        {(r["status_world1"], r["status_world2"]) for r in rows if r["status_world1"]}
    )
    lines += [
        "",
        f"Products per call (kind, 1 proc, 2 procs): {hvps}; solver status (1 proc, 2 procs): "
        f"{statuses}.",
    ]
    warned = sorted({w for r in rows for w in r.get("warnings_world1", [])})
    if warned:
        lines += ["", "Warnings (1 process): " + "; ".join(warned)]
    lines += ["", "## Where the time goes", ""] + decomposition(rows)
    lines += ["", "## Summary", ""] + summary(rows, latency)
    return "\n".join(lines) + "\n"


def _calls(r: dict[str, Any]) -> int:
    return r["allreduce_calls"] + r["ddp_allreduce_calls"]


def _comm_cpu(r: dict[str, Any]) -> float:
    """Extra CPU seconds per rank of the 2-process call over the no-communication one."""
    w2 = statistics.median(r["world2_cpu_seconds_sum_ranks"])
    return (w2 - statistics.median(r["nocomm_cpu_seconds_sum_ranks"])) / 2


def _bg(r: dict[str, Any]) -> float:
    return statistics.mean(r["background_cores_kept_rounds"])


def _span(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{lo:{fmt}}-{hi:{fmt}}"


def summary(rows: list[dict[str, Any]], latency: dict[str, float]) -> list[str]:
    """The numbers behind the explanation, from this run's rows."""
    clean = [r for r in rows if _bg(r) < BUSY]
    loaded = [r for r in rows if _bg(r) >= BUSY]
    out = []
    best = max(rows, key=lambda r: r["speedup"])
    below = sum(r["speedup"] < 2 for r in rows)
    out.append(
        f"- **Speedup.** Below 2 in {below} of {len(rows)} cases; the best is "
        f"{best['speedup']:.2f} ({case_name(best)}, P = {best['params']:,}, global batch "
        f"{best['batch']:,}, {best['dtype']})."
    )
    pairs = [
        (a, b)
        for a in rows
        for b in rows
        if a["batch"] < b["batch"]
        and all(a[k] == b[k] for k in ("kind", "hidden", "dtype"))
        and max(_bg(a), _bg(b)) < BUSY
    ]
    if pairs and all(a["speedup"] < b["speedup"] for a, b in pairs):
        out[-1] += (
            " Where both batch sizes ran on a quiet machine, the larger global batch gives "
            "the larger speedup: the work per product grows with the batch, the "
            "communication does not."
        )
    if clean:
        extra = [1e3 * (r["world2_median_s"] - r["nocomm_median_s"]) for r in clean]
        per = [e / _calls(r) for e, r in zip(extra, clean)]
        cpu_share = [_comm_cpu(r) / (r["world2_median_s"] - r["nocomm_median_s"]) for r in clean]
        hvp = [
            1e3 * r["half_median_s"] / ((r["num_hvps_world1"] or 30) + 3)
            for r in clean
            if r["kind"] != "unrolled"
        ]
        lat_text = ""
        if latency:
            lat_text = " (an all-reduce alone: " + ", ".join(
                f"{1e3 * v:.2f} ms for {k}" for k, v in latency.items()
            )
            lat_text += ")"
        out.append(
            f"- **Communication** (the {len(clean)} rows without background load). The "
            f"2-process call takes {_span(extra, '.0f')} ms "
            f"more than the same two halves without all-reduces, i.e. {_span(per, '.1f')} ms "
            f"per all-reduce{lat_text}. {_span(cpu_share, '.0%')} of that extra wall time is "
            "extra CPU time on each rank (communication code and the kernel's loopback TCP, "
            "which no computation overlaps); the rest is waiting, since each all-reduce is "
            f"also a barrier where the faster rank waits for the slower one. With "
            f"{_counts(rows, 'implicit')} all-reduces per CG hypergradient, "
            f"{_counts(rows, 'unrolled')} for 10 unrolled steps and "
            f"{_counts(rows, 'hyperopt')} for the HyperOptimizer step, this fixed cost is "
            "comparable to the work: one "
            f"product on half the batch costs about {_span(hvp, '.1f')} ms here. One of "
            "the all-reduces is the input check (hyperparameters and parameters equal on "
            "every rank). The cost of one all-reduce grows with its payload (MB "
            "column) on top of a fixed cost per call, so it is the number of all-reduces "
            "per product, not only the bytes, that sets the overhead."
        )
        ratio = [r["half_median_s"] / r["world1_median_s"] for r in clean]
        both = [r["nocomm_median_s"] / r["half_median_s"] for r in clean]
        ceiling = [r["world1_median_s"] / r["nocomm_median_s"] for r in clean]
        out.append(
            f"- **Compute.** Half the batch on one idle core takes {_span(ratio, '.2f')} of the "
            "whole batch (below 0.5 where the half batch fits the caches better; above where "
            "the solver's P-sized vectors, the penalty and Python overhead do not shrink); "
            f"running both halves at once costs {_span(both, '.2f')}x one half alone. Without "
            f"any communication the two processes would be {_span(ceiling, '.2f')}x faster than "
            "one."
        )
    if loaded:
        names = "; ".join(
            f"{case_name(r)} P = {r['params']:,} batch {r['batch']:,} {r['dtype']}" for r in loaded
        )
        out.append(
            f"- **Loaded rows** ({names}): another job held about one of the 2 cores during "
            "the rounds (bg column; the run's budget for repeating rounds was spent), so the "
            "two ranks shared one core (`2, no comm.` about 2x `half alone`). Their speedups "
            "measure the machine, not the library; rerun on an idle machine."
        )
    f64 = [r for r in rows if r["dtype"] == "float64"]
    f32 = [r for r in rows if r["dtype"] == "float32"]
    text = "- **Same hypergradient.** The 2-process hypergradient differs from the 1-process one "
    if f64:
        text += f"by {_span([r['rel_diff_world2_vs_world1'] for r in f64], '.0e')} in float64. "
    if f32:
        cg = [r for r in f32 if r["kind"] == "implicit"]
        other = [r for r in f32 if r["kind"] != "implicit"]
        text += "In float32: "
        if other:
            text += (
                "unrolled and HyperOptimizer (IFT/Neumann) "
                f"{_span([r['rel_diff_world2_vs_world1'] for r in other], '.0e')}; "
            )
        if cg:
            own = [r.get("rel_diff_world1_float32_vs_float64", float("nan")) for r in cg]
            text += (
                f"CG {_span([r['rel_diff_world2_vs_world1'] for r in cg], '.0e')}, more than "
                "1e-6 because 20 CG iterations with tol=0 amplify the rounding of each "
                "product (a sum over two half batches instead of one batch) by the Hessian's "
                "conditioning; float32 CG itself is "
                f"{_span(own, '.0e')} away from the float64 result on these problems, so the "
                "data-parallel difference is of the order of float32's own error, or below."
            )
    out.append(text)
    out.append(
        "- Both ranks always end with bit-identical hypergradients (checked), and the "
        "solvers spend the same number of products in both settings."
    )
    return out


def decomposition(rows: list[dict[str, Any]]) -> list[str]:
    """Split the 2-process time into: half the work, + running two at once, + communication."""
    out = [
        "Ideal: `2 procs = 1 proc / 2`. Read each row's gap from left to right: `half alone "
        "/ 1 proc` is how well the work halves (what stays the same size on each rank: "
        "the solver's vectors, the penalty over P parameters, Python and autograd overhead); "
        "`2, no comm. / half alone` is the cost of running two processes at once on the 2 "
        "shared cores (memory bandwidth, cache, other jobs); `2 procs - 2, no comm.` is the "
        "communication: one all-reduce per Hessian-vector product (or per unrolled step) plus "
        "the fixed ones, each a synchronization point where the faster rank waits.",
        "",
        "| case | P | batch | dtype | half alone / 1 proc | 2, no comm. / half alone "
        "| comm. s (2 procs - no comm.) | of which CPU s per rank | ms per all-reduce "
        "| comm. share of 2 procs | speedup without comm. | bg |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        w1, half, nc, w2 = (r[f"{c}_median_s"] for c in ("world1", "half", "nocomm", "world2"))
        out.append(
            f"| {case_name(r)} | {r['params']:,} | {r['batch']:,} | {r['dtype']} "
            f"| {half / w1:.2f} | {nc / half:.2f} | {w2 - nc:.3f} | {_comm_cpu(r):.3f} "
            f"| {1e3 * (w2 - nc) / _calls(r):.1f} | {(w2 - nc) / w2:.0%} | {w1 / nc:.2f} "
            f"| {statistics.mean(r['background_cores_kept_rounds']):.2f} |"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = cli(__doc__)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, quick 1)")
    args = p.parse_args(argv)
    start(args)
    reps = args.repeats or (1 if args.quick else 5)
    QUIET["budget"] = QUIET["redo"] = 0.0 if args.quick else 60.0
    os.environ["OMP_NUM_THREADS"] = "1"
    cases = quick_cases() if args.quick else full_cases()
    load0 = os.getloadavg()
    rep = Report(
        "distributed",
        "Distributed hyper-steps: 2 gloo processes against 1, same global batch",
        args,
    )
    machine = (
        f"{rep.machine['platform']}, {rep.machine['processor']}, {os.cpu_count()} CPUs (shared "
        f"with other jobs), 1 torch thread per process, torch {torch.__version__}, gloo "
        f"backend; load average at start {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}"
    )
    pool, weights, results = Pool(), {}, []
    try:
        for case in cases:
            key = (case["hidden"], case["batch"])
            if key not in weights:
                iters = 10 if args.quick else 100 if key[0] < 400 else 60
                weights[key] = (
                    np.zeros(0) if case["kind"] == "allreduce" else pretrain(*key, iters=iters)
                )
            results.append(r := measure(pool, case, weights[key], reps))
            if case["kind"] != "allreduce":
                log(
                    f"{case_name(r)}, P={r['params']}, batch {r['batch']}, {r['dtype']}: 1 proc "
                    f"{r['world1_median_s']:.3f} s, 2 procs {r['world2_median_s']:.3f} s "
                    f"(x{r['speedup']:.2f})"
                )
    finally:
        pool.close()
    load1 = os.getloadavg()
    machine += f", at end {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}"
    md = markdown(machine, results, reps, time.perf_counter() - rep.started)
    rep.section(md.split("\n", 2)[2])
    rep.write(
        {
            "machine_text": machine,
            "repeats": reps,
            "seconds": time.perf_counter() - rep.started,
            "results": results,
        }
    )
    return 0


if __name__ == "__main__":
    main()
