"""Time of a data-parallel hyper-step (2 gloo processes) against one process, same global batch."""

import functools
import math
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
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

import harness as H
import hypergradient as hg

NAME = "distributed"
TITLE = "Distributed hyper-steps: 2 gloo processes against 1, same global batch"
SOLO, PAIR = [("solo", 0)], [("pair", 0), ("pair", 1)]
# world1: the whole batch in one process; half: rank 0 alone on its half; nocomm: both ranks
# on their halves without communicating; world2: process_group=WORLD.
CONFIGS = {"world1": SOLO, "half": PAIR[:1], "nocomm": PAIR, "world2": PAIR}
BUSY = 0.3  # a round during which other processes used more cores than this is repeated
QUIET = {"budget": 60.0, "redo": 60.0}  # seconds to wait for a quiet machine / to repeat rounds
ZERO = {"calls": 0, "bytes": 0, "ar_seconds": 0.0, "ddp_calls": 0, "ddp_bytes": 0}
STATS = dict(ZERO)  # the all-reduces of this process since the last call began
NAMES = {"implicit": "implicit, CG 20", "unrolled": "unrolled, 10 SGD steps"}
NAMES["hyperopt"] = "HyperOptimizer + DDP, IFT/Neumann 20+20"
DIAGNOSTICS = ("num_hvps", "status", "warnings")


def cases(quick: bool) -> list[dict[str, Any]]:
    """Every kind at h = 4 (quick); else implicit at every size, the others at h = 112."""
    if quick:
        kinds = [(k, 4, 64, "float32") for k in NAMES]
    else:
        kinds = [("implicit", h, b, "float32") for h in (12, 112, 400) for b in (512, 2048)]
        kinds += [("implicit", 12, 512, "float64"), ("implicit", 112, 2048, "float64")]
        bts = ((512, "float32"), (2048, "float32"), (512, "float64"))
        kinds += [(k, 112, b, t) for k in ("unrolled", "hyperopt") for b, t in bts]
    out = [dict(zip(("kind", "hidden", "batch", "dtype"), c)) for c in kinds]
    return out + [dict(kind="allreduce", sizes=[4] if quick else [12, 112, 400])]


def like(hidden: int) -> tuple[Tensor, ...]:
    """Parameters of nn.Sequential(Linear(784, h), Tanh, Linear(h, h), Tanh, Linear(h, 10)),
    ``W ~ N(0, 1/fan_in)`` with seed ``hidden``, zero biases (float64)."""
    return H.mlp_init((784, hidden, hidden, 10), torch.Generator().manual_seed(hidden))


@functools.cache
def batches(batch: int) -> tuple[tuple[Tensor, Tensor], ...]:
    """The training batch (the first ``batch`` shuffled digits) and the validation batch."""
    X, y = H.mnist(torch.float64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    X, y = H.standardize(X, eps=0.1)[perm], y[perm]
    return (X[:batch], y[:batch]), (X[-batch:], y[-batch:])


def pretrain(hidden: int, batch: int, iters: int) -> Tensor:
    """Weights at a minimum of the training loss on the global training batch (L-BFGS, float32)."""
    (X, y), _ = batches(batch)
    p0, X = like(hidden), X.float()

    def f(w: Tensor) -> Tensor:
        ce = F.cross_entropy(H.mlp_forward(H.unflat(w, p0), X), y)
        return ce + 0.5 * math.exp(-3) * (w**2).sum()

    return H.lbfgs(f, H.flat(p0).float(), iters, 20).double()


def counting(original: Any) -> Any:
    """``dist.all_reduce`` counting the calls, bytes and seconds of the library's all-reduces."""

    def all_reduce(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
        STATS["calls"] += 1
        STATS["bytes"] += tensor.numel() * tensor.element_size()
        out, wall, _ = H.timed_call(lambda: original(tensor, *args, **kwargs))
        STATS["ar_seconds"] += wall / 1e3
        return out

    return all_reduce


def allreduce_latency(case: dict, group: Any) -> Any:
    """Median seconds of 40 back-to-back all-reduces (after 5 more) of 1 value and of P values."""
    counts = [H.flat(like(h)).numel() for h in case["sizes"]]
    sizes = {"1 value": 1} | {f"P = {n:,} values": n for n in counts}

    def latency(n: int) -> float:
        t = torch.ones(n)
        times = [H.timed_call(lambda: dist.all_reduce(t, group=group))[1] for _ in range(45)]
        return statistics.median(times[5:]) / 1e3

    return lambda: {"latency": {name: latency(n) for name, n in sizes.items()}}


def hyperopt(case: dict, w: Tensor, shard: tuple, group: Any, world: int, original: Any) -> Any:
    """One ``HyperOptimizer`` step (inner SGD, then IFT/Neumann 20) on the MLP as an
    ``nn.Sequential`` (DDP-wrapped with a counting comm hook when ``group`` is given)."""
    dtype, h = getattr(torch, case["dtype"]), case["hidden"]
    model = torch.nn.Sequential(torch.nn.Linear(784, h), torch.nn.Tanh(), torch.nn.Linear(h, h))
    model.append(torch.nn.Tanh()).append(torch.nn.Linear(h, 10)).to(dtype)
    start = [t.clone() for t in H.unflat(w, like(h))]
    ddp = torch.nn.parallel.DistributedDataParallel
    net = model if group is None else ddp(model, process_group=group)

    def hook(state, bucket):  # noqa: ANN001 - DDP checks the annotations: none
        buf = bucket.buffer()
        STATS["ddp_calls"] += 1
        STATS["ddp_bytes"] += buf.numel() * buf.element_size()
        buf.div_(world)
        return original(buf, group=group, async_op=True).get_future().then(lambda fu: fu.value()[0])

    if group is not None:
        net.register_comm_hook(None, hook)
    weights = [(n.replace(".", "_"), p) for n, p in model.named_parameters() if p.dim() == 2]

    def train_loss(m: Any, hp: dict, b: Any) -> Tensor:
        ws = [p for p in m.parameters() if p.dim() == 2]
        pen = sum((d * v**2).sum() for d, v in zip(hp.values(), ws))
        return F.cross_entropy(m(b[0]), b[1]) + 0.5 * pen

    def run() -> dict[str, Any]:
        with torch.no_grad():  # the same state before every call
            for p, v in zip(model.parameters(), start):
                p.copy_(v)
        decays = {n: hg.Positive(torch.full_like(p, math.exp(-3))) for n, p in weights}
        kw = {"train_loss": train_loss, "val_loss": lambda m, hp, b: F.cross_entropy(m(b[0]), b[1])}
        kw |= {"val_data": shard[1], "inner_steps": 1, "process_group": group}
        kw |= {"method": hg.IFT(hg.Neumann(maxiter=20, alpha="auto", seed=0))}
        kw |= {"outer_optimizer": lambda hp: torch.optim.Adam(hp, lr=0.05)}
        sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        hopt = hg.HyperOptimizer(net, decays, inner_optimizer=sgd, history_size=None, **kw)
        hopt.zero_grad()
        hopt.train_loss(shard[0]).backward()
        STATS.update(ZERO)
        c0 = time.process_time()
        hopt.step(shard[0])  # the inner SGD step (negligible), then the hyper-step
        rec, cpu = hopt.history[-1], time.process_time() - c0
        out = {"hyper": torch.cat([rec.hypergrad[k].reshape(-1) for k in decays])}
        diag = rec.diagnostics
        out |= {"status": diag.get("status", ""), "num_hvps": diag.get("num_hvps")}
        return out | {"seconds": rec.seconds, "cpu": cpu}

    return run


def setup(case: dict, w0: Any, data: Any, rank: int, world: int, group: Any, original: Any) -> Any:
    """This rank's call of a case: a function returning the hypergradient and diagnostics
    (``group`` None: each rank computes its own shard's hypergradient, the control)."""
    if case["kind"] == "allreduce":
        return allreduce_latency(case, group)
    dtype, size = getattr(torch, case["dtype"]), case["batch"] // world
    mine, w, p0 = slice(rank * size, (rank + 1) * size), w0.to(dtype), like(case["hidden"])
    shard = tuple((X[mine].to(dtype), y[mine]) for X, y in data)
    if case["kind"] == "hyperopt":
        return hyperopt(case, w, shard, group, world, original)
    log_decay, lr = torch.full_like(w, -3.0), torch.tensor(0.05, dtype=dtype)

    def ce(p: Tensor, b: tuple) -> Tensor:
        return F.cross_entropy(H.mlp_forward(H.unflat(p, p0), b[0].to(p.dtype)), b[1])

    def run(dt: torch.dtype = dtype) -> dict[str, Any]:
        f = lambda p, hp: ce(p, shard[0]) + 0.5 * (hp["ld"].exp() * p**2).sum()  # noqa: E731
        g = lambda p, hp: ce(p, shard[1])  # noqa: E731
        hp = {"ld": log_decay.to(dt)}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if case["kind"] == "implicit":
                kw = {"process_group": group, "return_info": True}
                out, info = hg.implicit(f, g, w.to(dt), hp, hg.CG(maxiter=20, tol=0.0), **kw)
                out, extra = out["ld"], {"num_hvps": info.num_hvps, "status": info.status}
            else:
                hp["lr"] = lr.to(dt)
                sgd = hg.optim.sgd(lr=hp["lr"])
                out = hg.unrolled(f, g, w.to(dt), hp, 10, sgd, process_group=group)
                out = torch.cat([out["ld"].reshape(-1), out["lr"].reshape(-1)])
                extra = {"num_hvps": None, "status": ""}
        return extra | {"hyper": out, "warnings": sorted({str(c.message)[:80] for c in caught})}

    run.float64 = lambda: run(torch.float64)  # type: ignore[attr-defined]
    return run


def worker(role: str, rank: int, world: int, port: int, inbox: Any, outbox: Any) -> None:
    """A process that sets up cases and runs calls on request (a barrier before each 2-process
    call; ``seconds`` is the call's, or the hyper-step's own time)."""
    try:
        torch.set_num_threads(1)
        group = original = None
        if world > 1:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            dist.init_process_group("gloo", rank=rank, world_size=world)
            group, original = dist.group.WORLD, dist.all_reduce
            dist.all_reduce = counting(original)
        while (msg := inbox.get())[0] != "stop":
            if msg[0] == "setup":
                calls = {"run": setup(*msg[1:], rank, world, group, original)}
                if group is not None and msg[1]["kind"] != "allreduce":
                    calls["nocomm"] = setup(*msg[1:], rank, world, None, original)
                outbox.put((role, rank, "ready", None))
                continue
            want_hyper, want_f64, mode = msg[1:]
            fn = calls["nocomm" if mode in ("nocomm", "half") else "run"]
            if group is not None and mode != "half":
                dist.barrier(group)
            STATS.update(ZERO)
            out, wall, cpu = H.timed_call(fn)
            out = {"seconds": wall / 1e3, "cpu": cpu / 1e3} | out | STATS
            out["hyper"] = out["hyper"].double().numpy() if want_hyper and "hyper" in out else None
            if want_f64 and hasattr(fn, "float64"):
                out["hyper64"] = fn.float64()["hyper"].double().numpy()
            outbox.put((role, rank, "done", out))
    except BaseException:  # noqa: BLE001 - reported to the parent
        outbox.put((role, rank, "error", traceback.format_exc()))
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class Pool:
    """Three workers for the whole run: one for world 1, two for world 2 (and the controls)."""

    def __init__(self) -> None:
        ctx = H.context()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.outbox, self.inboxes = ctx.Queue(), {k: ctx.Queue() for k in SOLO + PAIR}
        args = lambda role, rank, q: (role, rank, 1 if role == "solo" else 2, port, q, self.outbox)  # noqa: E731
        self.procs = [ctx.Process(target=worker, args=args(*k, q)) for k, q in self.inboxes.items()]
        for p in self.procs:
            p.start()

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


def busy_seconds() -> float:
    """CPU seconds spent by the whole machine (every process), from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [float(x) for x in fh.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def wait_quiet() -> None:
    """Wait (within the run's budget) until other processes use under BUSY cores."""
    while QUIET["budget"] > 0:
        b0, t0 = busy_seconds(), time.perf_counter()
        time.sleep(0.5)
        dt = time.perf_counter() - t0
        if (busy_seconds() - b0) / dt < BUSY:  # the workers are idle meanwhile
            return
        QUIET["budget"] -= dt


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def measure(pool: Pool, case: dict[str, Any], w0: Tensor, reps: int) -> dict[str, Any]:
    """A warm-up round, then ``reps`` rounds of the four configurations in rotating order
    (a round with background load above BUSY is repeated, within the budget)."""
    data = batches(case["batch"]) if "batch" in case else None  # the workers load no data
    pool.ask(SOLO + PAIR, ("setup", case, w0, data))
    if case["kind"] == "allreduce":
        lat = [pool.ask(PAIR, ("run", False, False, "world2")) for _ in range(3)]
        slowest = lambda n: [max(a[k]["latency"][n] for k in PAIR) for a in lat]  # noqa: E731
        names = lat[0][PAIR[0]]["latency"]
        return case | {"latency_s": {n: statistics.median(slowest(n)) for n in names}}
    times, cpus = {c: [] for c in CONFIGS}, {c: [] for c in CONFIGS}
    kept, dropped, rnd = [], [], -1
    while len(kept) < reps:
        rnd += 1
        if rnd:
            wait_quiet()
        got, busy0, wall0, own0 = {}, busy_seconds(), time.perf_counter(), 0.0
        for config in H.rotation(list(CONFIGS), rnd):
            own = time.process_time()
            got[config] = pool.ask(CONFIGS[config], ("run", False, False, config))
            own0 += time.process_time() - own + sum(a["cpu"] for a in got[config].values())
        wall = time.perf_counter() - wall0
        bg = max(busy_seconds() - busy0 - own0, 0.0) / wall
        if rnd == 0:
            continue  # warm-up
        if bg > BUSY and len(dropped) < reps and QUIET["redo"] > 0:
            QUIET["redo"] -= wall  # another job took a core: repeat this round
            dropped.append(bg)
            continue
        kept.append(bg)
        for config, ans in got.items():
            times[config].append(max(a["seconds"] for a in ans.values()))
            cpus[config].append(sum(a["cpu"] for a in ans.values()))
    s0 = pool.ask(SOLO, ("run", True, case["dtype"] == "float32", "world1"))[SOLO[0]]
    ans = pool.ask(PAIR, ("run", True, False, "world2"))  # untimed: the hypergradients
    p0, p1 = ans[PAIR[0]], ans[PAIR[1]]
    med = {c: statistics.median(t) for c, t in times.items()}
    out = case | {"params": H.flat(like(case["hidden"])).numel()}
    out["speedup"] = med["world1"] / med["world2"]
    out |= {f"{c}_seconds": times[c] for c in CONFIGS} | {f"{c}_median_s": med[c] for c in CONFIGS}
    out |= {f"{c}_cpu_seconds_sum_ranks": cpus[c] for c in CONFIGS}
    out |= {"background_cores_kept_rounds": kept, "background_cores_dropped_rounds": dropped}
    out["speedup_half_alone"] = med["world1"] / med["half"]
    out["speedup_without_communication"] = med["world1"] / med["nocomm"]
    out |= {"allreduce_calls": p0["calls"], "allreduce_bytes_per_rank": p0["bytes"]}
    out |= {f"allreduce_seconds_rank{i}": p["ar_seconds"] for i, p in enumerate((p0, p1))}
    out |= {"ddp_allreduce_calls": p0["ddp_calls"], "ddp_allreduce_bytes_per_rank": p0["ddp_bytes"]}
    out |= {f"{k}_world{i}": a.get(k) for i, a in ((1, s0), (2, p0)) for k in DIAGNOSTICS}
    out |= {"ranks_bit_identical": bool(np.array_equal(p0["hyper"], p1["hyper"]))}
    out["rel_diff_world2_vs_world1"] = rel(p0["hyper"], s0["hyper"])
    out["hypergrad_norm"] = float(np.linalg.norm(s0["hyper"]))
    if s0.get("hyper64") is not None:
        out["rel_diff_world1_float32_vs_float64"] = rel(s0["hyper"], s0["hyper64"])
        out["rel_diff_world2_float32_vs_float64"] = rel(p0["hyper"], s0["hyper64"])
    return out


def render(d: dict[str, Any]) -> list[str]:
    rows = [r for r in d["results"] if r["kind"] != "allreduce"]
    latency = {k: v for r in d["results"] for k, v in r.get("latency_s", {}).items()}
    table = []
    for r in rows:  # the derived columns of both tables
        w1, half, nc, w2 = (r[f"{c}_median_s"] for c in CONFIGS)
        cpu = {c: statistics.median(r[f"{c}_cpu_seconds_sum_ranks"]) for c in CONFIGS}
        ddp = f" + {r['ddp_allreduce_calls']} DDP" if r["kind"] == "hyperopt" else ""
        calls = r["allreduce_calls"] + r["ddp_allreduce_calls"]
        x = {"case": NAMES[r["kind"]], "bg": statistics.mean(r["background_cores_kept_rounds"])}
        x |= {"all-reduces": f"{r['allreduce_calls']}{ddp}", "half/w1": half / w1}
        x |= {"MB": r["allreduce_bytes_per_rank"] / 1e6}
        x |= {"f32_vs_f64": r.get("rel_diff_world1_float32_vs_float64")}
        x |= {"nocomm/half": nc / half, "comm_s": w2 - nc, "w1/nocomm": w1 / nc}
        x["comm_cpu_s_per_rank"] = (cpu["world2"] - cpu["nocomm"]) / 2
        x |= {"ms_per_all-reduce": 1e3 * (w2 - nc) / calls, "comm_share": (w2 - nc) / w2}
        table.append(r | x)
    cols = "case|params:,|batch:,|dtype|world1_median_s:.3f|world2_median_s:.3f|speedup:.2f"
    cols += "|half_median_s:.3f|nocomm_median_s:.3f|all-reduces|MB:.1f|allreduce_seconds_rank0:.3f"
    cols += "|bg:.2f|rel_diff_world2_vs_world1:.1e|f32_vs_f64:.1e"
    cols2 = "case|params:,|batch:,|dtype|half/w1:.2f|nocomm/half:.2f|comm_s:.3f"
    cols2 += "|comm_cpu_s_per_rank:.3f|ms_per_all-reduce:.1f|comm_share:.0%|w1/nocomm:.2f|bg:.2f"
    hvps = {f"{r['kind']} {r['num_hvps_world1'] or 0}/{r['num_hvps_world2'] or 0}" for r in rows}
    notes = [f"{n} (float32): {1e3 * s:.3f} ms per gloo all-reduce" for n, s in latency.items()]
    notes += [f"products per call (1 proc/2 procs): {', '.join(sorted(hvps))}"]
    notes += [f"both ranks bit-identical: {all(r['ranks_bit_identical'] for r in rows)}"]
    notes += sorted({f"warning: {w}" for r in rows for w in r.get("warnings_world1") or []})
    return [
        f"Medians of {d['repeats']} interleaved rounds after a warm-up; seconds per hypergradient; "
        "`bg` = cores used by other processes during the kept rounds.\n\n"
        + H.dict_table(table, cols),
        H.bullets(notes),
        "## Where the time goes\n\n" + H.dict_table(table, cols2),
    ]


def run(args: Any, rep: H.Report) -> dict[str, Any]:
    QUIET["budget"] = QUIET["redo"] = 0.0 if args.quick else 60.0
    os.environ["OMP_NUM_THREADS"] = "1"
    pool, weights, results = Pool(), {}, []
    try:
        for case in cases(args.quick):
            key = (case.get("hidden"), case.get("batch"))
            if key not in weights and case["kind"] != "allreduce":
                iters = 10 if args.quick else 100 if key[0] < 400 else 60
                weights[key] = pretrain(*key, iters=iters)
            results.append(r := measure(pool, case, weights.get(key), args.repeats))
            H.log(f"{case}: " + (f"speedup {r['speedup']:.2f}" if "speedup" in r else "latency"))
    finally:
        pool.close()
    return {"repeats": args.repeats, "results": results}


OPTIONS = [H.option("--repeats", 1, 5, type=int, help="timed rounds")]
main = H.entry(__doc__, NAME, TITLE, run, render, options=OPTIONS)

if __name__ == "__main__":
    main()
