"""``hg.unrolled`` against plain autograd: time, peak memory and cold start.

Two problems, each ``T`` full-batch SGD steps with the learning rate and a weight decay as
hyperparameters:

- ``logreg``: L2 logistic regression on breast cancer (30 features + bias, float64), one
  decay per feature;
- ``mlp``: a 64-32-10 tanh MLP on digits (2,410 parameters, float32), one decay per
  parameter tensor.

Competitors, timed in interleaved rounds in one process (one torch thread; the order
rotates from round to round so that a shared machine's drifts spread evenly):

- ``unrolled``: ``hg.unrolled`` (store-and-recompute: ``T`` stored states);
- ``hand``: the hand-written loop that keeps every step's graph
  (``autograd.grad(..., create_graph=True)`` per step, one backward at the end);
- ``recompute``: the floor of ``hg.unrolled``'s algorithm, store-and-recompute written in
  20 lines of plain autograd for plain SGD (no validation, no RNG replay, no modes): the
  forward pass costs one extra gradient per step over ``hand``, which bounds the ratio
  from below at about ``1 + (forward + backward) / (hand's cost per step)``;
- ``torchopt``: TorchOpt's functional SGD with the same loop, when TorchOpt is installed.

Reported: the median time of each, the median over rounds of the per-round ratio to
``hand``, the peak memory increase of one call at T = 100 (in a fresh subprocess per
competitor: ``VmHWM`` reset through ``/proc/self/clear_refs`` before the call, minus
``VmRSS`` before it, with glibc's mmap threshold fixed at 64 KiB so that freed memory is
returned), and the cold start (the first ``hg.unrolled`` call in a fresh interpreter,
beyond ``import torch, hypergradient``, and whether it imported ``torch._dynamo``).

Run from the repository root::

    .venv/bin/python benchmarks/unrolled_speed.py            # T=100, 15 rounds
    .venv/bin/python benchmarks/unrolled_speed.py --quick    # T=20, 2 rounds (smoke test)
    .venv/bin/python benchmarks/unrolled_speed.py --compile  # and torch.compile's figures
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import hypergradient as hg

RESULTS = Path(__file__).resolve().parent / "results"
PROBLEMS = ("logreg", "mlp")


# ----------------------------------------------------------------------------- problems


def _data(name: str, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_breast_cancer, load_digits

    loader = load_breast_cancer if name == "breast_cancer" else load_digits
    X_np, y_np = loader(return_X_y=True)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y_np), generator=g)
    X = torch.as_tensor(X_np, dtype=dtype)[perm]
    y = torch.as_tensor(y_np)[perm]
    n = len(y) // 2
    mu, sd = X[:n].mean(0), X[:n].std(0)
    X = (X - mu) / torch.where(sd > 0, sd, torch.ones_like(sd))
    return X[:n], y[:n], X[n:], y[n:]


def problem(name: str) -> dict[str, Any]:
    """Losses, ``params0``, ``hparams`` and the learning-rate leaf of one problem."""
    if name == "logreg":
        dt = torch.float64
        X, y, Xv, yv = _data("breast_cancer", dt)
        y, yv = y.to(dt), yv.to(dt)
        params0 = {"w": torch.zeros(X.shape[1], dtype=dt), "b": torch.zeros((), dtype=dt)}
        hparams = {
            "decay": torch.full((X.shape[1],), 1e-2, dtype=dt),
            "lr": torch.tensor(0.5, dtype=dt),
        }

        def predict(p: Any, X: Tensor) -> Tensor:
            return X @ p["w"] + p["b"]

        def data_loss(out: Tensor, y: Tensor) -> Tensor:
            return torch.nn.functional.binary_cross_entropy_with_logits(out, y)

        def penalty(p: Any, h: Any) -> Tensor:
            return 0.5 * (h["decay"] * p["w"] ** 2).sum()

    else:
        dt = torch.float32
        X, y, Xv, yv = _data("digits", dt)
        g = torch.Generator().manual_seed(1)
        params0 = {
            "W1": 0.1 * torch.randn(64, 32, generator=g),
            "b1": torch.zeros(32),
            "W2": 0.1 * torch.randn(32, 10, generator=g),
            "b2": torch.zeros(10),
        }
        hparams = {"decay": torch.full((4,), 1e-3), "lr": torch.tensor(0.3)}

        def predict(p: Any, X: Tensor) -> Tensor:
            return torch.tanh(X @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]

        def data_loss(out: Tensor, y: Tensor) -> Tensor:
            return torch.nn.functional.cross_entropy(out, y)

        def penalty(p: Any, h: Any) -> Tensor:
            return 0.5 * sum(h["decay"][i] * (v**2).sum() for i, v in enumerate(p.values()))

    def inner(p: Any, h: Any) -> Tensor:
        return data_loss(predict(p, X), y) + penalty(p, h)

    def outer(p: Any, h: Any) -> Tensor:
        return data_loss(predict(p, Xv), yv)

    return {"inner": inner, "outer": outer, "params0": params0, "hparams": hparams}


# ----------------------------------------------------------------------------- competitors


def run_unrolled(pb: dict[str, Any], T: int) -> dict[str, Tensor]:
    h = pb["hparams"]
    return hg.unrolled(pb["inner"], pb["outer"], pb["params0"], h, T, hg.optim.sgd(lr=h["lr"]))


def run_hand(pb: dict[str, Any], T: int) -> dict[str, Tensor]:
    """Plain autograd: every step's graph is kept, one backward pass at the end."""
    h = {k: v.detach().requires_grad_(True) for k, v in pb["hparams"].items()}
    p = {k: v.detach().requires_grad_(True) for k, v in pb["params0"].items()}
    keys = list(p)
    for _ in range(T):
        g = torch.autograd.grad(pb["inner"](p, h), list(p.values()), create_graph=True)
        p = {k: p[k] - h["lr"] * gk for k, gk in zip(keys, g)}
    grads = torch.autograd.grad(pb["outer"](p, h), list(h.values()))
    return dict(zip(h, grads))


def run_recompute(pb: dict[str, Any], T: int) -> dict[str, Tensor]:
    """The floor of store-and-recompute: ``hg.unrolled``'s algorithm, minimal, for SGD.

    Forward without graphs storing the ``T`` states, then per step in reverse: the gradient
    with ``create_graph=True`` and one backward pass of the update against the adjoint.
    """
    fixed = {k: v.detach() for k, v in pb["hparams"].items()}
    h = {k: v.detach().requires_grad_(True) for k, v in pb["hparams"].items()}
    keys = list(pb["params0"])
    p, states = dict(pb["params0"]), []
    for _ in range(T):
        states.append(p)
        leaves = [v.detach().requires_grad_(True) for v in p.values()]
        g = torch.autograd.grad(pb["inner"](dict(zip(keys, leaves)), fixed), leaves)
        p = {k: v - fixed["lr"] * gk for (k, v), gk in zip(p.items(), g)}
    leaves = [v.detach().requires_grad_(True) for v in p.values()]
    out = torch.autograd.grad(
        pb["outer"](dict(zip(keys, leaves)), h), leaves + list(h.values()), allow_unused=True
    )
    a = out[: len(keys)]
    hyper = [torch.zeros_like(v) if d is None else d for v, d in zip(h.values(), out[len(keys) :])]
    for p in reversed(states):
        leaves = [v.detach().requires_grad_(True) for v in p.values()]
        g = torch.autograd.grad(pb["inner"](dict(zip(keys, leaves)), h), leaves, create_graph=True)
        new = [x - h["lr"] * gk for x, gk in zip(leaves, g)]
        out = torch.autograd.grad(new, leaves + list(h.values()), a)
        a = out[: len(keys)]
        for acc, d in zip(hyper, out[len(keys) :]):
            acc.add_(d)
    return dict(zip(h, hyper))


def run_torchopt(pb: dict[str, Any], T: int) -> dict[str, Tensor]:
    """TorchOpt's functional SGD in the same loop (its ``lr`` a differentiable tensor)."""
    import torchopt

    h = {k: v.detach().requires_grad_(True) for k, v in pb["hparams"].items()}
    p = {k: v.detach().requires_grad_(True) for k, v in pb["params0"].items()}
    opt = torchopt.sgd(lr=h["lr"])
    state = opt.init(p)
    for _ in range(T):
        g = torch.autograd.grad(pb["inner"](p, h), list(p.values()), create_graph=True)
        updates, state = opt.update(dict(zip(p, g)), state, inplace=False)
        p = torchopt.apply_updates(p, updates, inplace=False)
    grads = torch.autograd.grad(pb["outer"](p, h), list(h.values()))
    return dict(zip(h, grads))


def competitors(peers: bool = True) -> dict[str, Callable[[dict[str, Any], int], Any]]:
    """``unrolled``, ``hand``, ``recompute``, and TorchOpt's loop when ``peers`` and it is
    installed."""
    out = {"unrolled": run_unrolled, "hand": run_hand, "recompute": run_recompute}
    try:
        import torchopt  # noqa: F401
    except ImportError:
        pass
    else:
        if peers:
            out["torchopt"] = run_torchopt
    return out


# ----------------------------------------------------------------------------- measurements


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_child(name: str, who: str, T: int) -> None:
    """(In a subprocess) one warm-up call, then the peak memory increase of one call."""
    torch.set_num_threads(1)
    pb = problem(name)
    fn = competitors()[who]
    fn(pb, 2)  # lazy imports and allocator warm-up
    import gc

    gc.collect()
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    fn(pb, T)
    print(json.dumps({"peak_bytes": _status("VmHWM") - before}))


def peak(name: str, who: str, T: int) -> float:
    """Peak memory increase (MB) of one call, in a fresh subprocess."""
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); " + (
        f"import unrolled_speed as b; b.peak_child({name!r}, {who!r}, {T})"
    )
    # A fixed mmap threshold: glibc's adaptive one keeps freed blocks in the heap, so the
    # resident size would count what the allocator keeps, not what the call uses.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**20


COLD = """
import sys, time
t0 = time.perf_counter()
import torch, hypergradient as hg
torch.set_num_threads(1)
t1, c1 = time.perf_counter(), time.process_time()
w0, h = torch.zeros(3), {"d": torch.ones(3), "lr": torch.tensor(0.1)}
f = lambda w, h: ((w - 1) ** 2).sum() + (h["d"] * w**2).sum()
hg.unrolled(f, lambda w, h: (w**2).sum(), w0, h, 3, hg.optim.sgd(lr=h["lr"]))
t2, c2 = time.perf_counter(), time.process_time()
hg.drmad(f, lambda w, h: (w**2).sum(), w0, h, 3, hg.optim.sgd(lr=h["lr"]))
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, c2 - c1, t3 - t2, "torch._dynamo" in sys.modules or "sympy" in sys.modules)
"""


def cold_start() -> dict[str, Any]:
    """The first ``hg.unrolled`` (then ``hg.drmad``) call in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", COLD], capture_output=True, text=True, check=True)
    imp, first, first_cpu, drmad, dynamo = out.stdout.split()
    return {
        "import_s": float(imp),
        "first_call_s": float(first),
        "first_call_cpu_s": float(first_cpu),
        "first_drmad_s": float(drmad),
        "dynamo": dynamo == "True",
    }


def time_problem(name: str, T: int, rounds: int, quick: bool = False) -> dict[str, Any]:
    """Interleaved timings of every competitor on ``name``; peak memory in subprocesses
    (with ``quick``: no peers, and memory of the MLP only)."""
    pb = problem(name)
    fns = competitors(peers=not quick)
    for fn in fns.values():  # warm-up, and the answers agree
        fn(pb, 2)
    ref = run_hand(pb, T)
    for who, fn in fns.items():
        got = fn(pb, T)
        err = max(float((got[k] - ref[k]).norm() / ref[k].norm()) for k in ref)
        assert err < 1e-3, f"{who} disagrees with the hand-written loop on {name}: {err:.2e}"
    times: dict[str, list[float]] = {who: [] for who in fns}
    names = list(fns)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for who in order:
            started = time.perf_counter()
            fns[who](pb, T)
            times[who].append(1e3 * (time.perf_counter() - started))
    ratios = {
        who: statistics.median(a / b for a, b in zip(times[who], times["hand"])) for who in names
    }
    return {
        "params": sum(v.numel() for v in pb["params0"].values()),
        "median_ms": {who: statistics.median(ts) for who, ts in times.items()},
        "ratio_to_hand": ratios,
        "peak_mb": {
            who: peak(name, who, 100)
            for who in names
            if not quick or (name == "mlp" and who in ("unrolled", "hand"))
        },
        "times_ms": times,
    }


def compile_trial(name: str, T: int, rounds: int) -> dict[str, Any]:
    """``torch.compile`` of the inner loss: compile time, ``T`` plain gradient steps (the
    forward sweep) eager vs compiled, and whether double backward (the reverse step) goes
    through the compiled graph."""
    os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # a cold compile
    pb = problem(name)
    h = {k: v.detach() for k, v in pb["hparams"].items()}

    def sweep(loss: Callable[..., Tensor], steps: int) -> None:
        p = dict(pb["params0"])
        for _ in range(steps):
            leaves = {k: v.detach().requires_grad_(True) for k, v in p.items()}
            g = torch.autograd.grad(loss(leaves, h), list(leaves.values()))
            p = {k: v.detach() - h["lr"] * gk for (k, v), gk in zip(leaves.items(), g)}

    started = time.perf_counter()
    compiled = torch.compile(pb["inner"], dynamic=False)
    sweep(compiled, 2)
    compile_s = time.perf_counter() - started
    leaves = {k: v.detach().requires_grad_(True) for k, v in pb["params0"].items()}
    try:
        g = torch.autograd.grad(compiled(leaves, h), list(leaves.values()), create_graph=True)
        torch.autograd.grad(g, list(leaves.values()), [torch.ones_like(x) for x in g])
        double = "works"
    except RuntimeError as error:
        double = str(error).splitlines()[0][:120]
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(rounds):
        for who, fn in (("eager", pb["inner"]), ("compiled", compiled)):
            started = time.perf_counter()
            sweep(fn, T)
            times[who].append(1e3 * (time.perf_counter() - started))
    return {
        "compile_s": compile_s,
        "sweep_ms": {k: statistics.median(v) for k, v in times.items()},
        "double_backward": double,
    }


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "# hg.unrolled vs plain autograd",
        "",
        f"T = {res['T']}, {res['rounds']} interleaved rounds, one torch thread; "
        f"{res['machine']}; load average at start {res['load']}.",
        "",
        "| problem | params | competitor | median ms | ratio to hand (median) | peak MB |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name, r in res["problems"].items():
        for who in r["median_ms"]:
            mb = r["peak_mb"].get(who)
            lines.append(
                f"| {name} | {r['params']} | {who} | {r['median_ms'][who]:.1f} | "
                f"{r['ratio_to_hand'][who]:.2f} | {'-' if mb is None else f'{mb:.2f}'} |"
            )
    c = res["cold"]
    lines += [
        "",
        f"Cold start: `import torch, hypergradient` {c['import_s']:.2f} s; the first "
        f"`hg.unrolled` call {c['first_call_s']:.2f} s more ({c['first_call_cpu_s']:.2f} s "
        f"CPU), then the first `hg.drmad` {c['first_drmad_s']:.2f} s; torch._dynamo or sympy "
        f"imported: {c['dynamo']}.",
        "",
        "Peak memory: the increase during one call at T = 100, in a fresh subprocess.",
        "",
        "",
    ]
    for name, c in res.get("compile", {}).items():
        lines.append(
            f"torch.compile on {name}: compiled in {c['compile_s']:.1f} s; {res['T']} plain "
            f"gradient steps (the forward sweep) {c['sweep_ms']['eager']:.1f} ms eager, "
            f"{c['sweep_ms']['compiled']:.1f} ms compiled; double backward through the "
            f"compiled graph (the reverse step): {c['double_backward']}."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="T=20, 2 rounds, no peers, memory of the MLP only"
    )
    parser.add_argument("--steps", type=int, default=None, help="T (default 100)")
    parser.add_argument("--rounds", type=int, default=None, help="default 15")
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--compile", action="store_true", help="also try torch.compile (slow: ~1 min)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    T = args.steps or (20 if args.quick else 100)
    rounds = args.rounds or (2 if args.quick else 15)
    res: dict[str, Any] = {
        "T": T,
        "rounds": rounds,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "problems": {name: time_problem(name, T, rounds, args.quick) for name in args.problems},
        "cold": cold_start(),
    }
    if args.compile:
        res["compile"] = {name: compile_trial(name, T, rounds) for name in args.problems}
    text = markdown(res)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "unrolled_speed.md").write_text(text)
    (args.out / "unrolled_speed.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
