"""``hg.unrolled`` against plain autograd: time, peak memory, cold start, torch.compile."""

import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import harness as H
import hypergradient as hg

NAME, TITLE, PROBLEMS = "unrolled_speed", "hg.unrolled vs plain autograd", ("logreg", "mlp")
MEMORY_T, RATIO = 100, "ratio to hand (median):.2f|peak MB:.2f"
MEMORY_SHARE, MEM_QUICK = 0.2, ("unrolled", "hand")  # issue 11, goal 1: peak <= 0.2x hand's


def problem(name: str, hidden: int = 32) -> tuple:
    """``(f, g, params0, hparams)``: the harness's logistic regression, or its digits MLP
    (at its initial weights, float32); ``hparams = {"lr", "decay"}``."""
    if name == "logreg":
        pb, lr = H.logreg(0, solve=False), 0.5
    else:
        pb, lr = H.digits_mlp(0, hidden, train=False).cast(torch.float32), 0.1
    h = {"lr": torch.tensor(lr, dtype=pb.params[0].dtype), "decay": tuple(pb.hparams)}
    f, g = (lambda p, h: pb.inner_loss(p, h["decay"])), (lambda p, h: pb.outer_loss(p, None))
    return f, g, tuple(pb.params0), h


def hand(f: Callable, g: Callable, p0: tuple, h: dict, T: int, peer: Any = None) -> Tensor:
    """Plain autograd (or TorchOpt's functional SGD): every step's graph kept."""
    p, hs = H.leaves(p0), [h["lr"], *h["decay"]]
    if peer is not None:
        opt = peer.sgd(lr=h["lr"])
        state = opt.init(p)
    for _ in range(T):
        grads = torch.autograd.grad(f(p, h), p, create_graph=True)
        if peer is None:
            p = tuple(x - h["lr"] * gx for x, gx in zip(p, grads))
        else:
            updates, state = opt.update(grads, state, inplace=False)
            p = peer.apply_updates(p, updates, inplace=False)
    return H.flat(torch.autograd.grad(g(p, h), hs, allow_unused=True, materialize_grads=True))


def recompute(f: Callable, g: Callable, p0: tuple, h: dict, T: int) -> Tensor:
    """Store-and-recompute for plain SGD, minimal: a forward pass without graphs storing the
    T states, then per step in reverse the gradient with ``create_graph=True`` and one
    backward pass of the update against the adjoint."""
    (*states, p), hs, n = sweep(f, p0, h, T), [h["lr"], *h["decay"]], len(p0)
    x = H.leaves(p)
    out = torch.autograd.grad(g(x, h), [*x, *hs], allow_unused=True, materialize_grads=True)
    a, hyper = out[:n], list(out[n:])
    for p in reversed(states):
        x = H.leaves(p)
        gx = torch.autograd.grad(f(x, h), x, create_graph=True)
        new = [v - h["lr"] * gv for v, gv in zip(x, gx)]
        out = torch.autograd.grad(new, [*x, *hs], a, allow_unused=True, materialize_grads=True)
        a, hyper = out[:n], [acc + d for acc, d in zip(hyper, out[n:])]
    return H.flat(hyper)


def sweep(f: Callable, p0: tuple, h: dict, T: int) -> list[tuple]:
    """The forward sweep: the T + 1 states of T plain SGD steps, no graph kept (what any method
    that does not keep a step's graph computes twice for it)."""
    fixed, states = H.leaves(h), [tuple(p0)]
    for _ in range(T):
        x = H.leaves(states[-1])
        gx = torch.autograd.grad(f(x, fixed), x)
        states.append(tuple(v - fixed["lr"] * gv for v, gv in zip(states[-1], gx)))
    return states


def competitor(who: str, name: str, T: int, hidden: int = 32) -> Callable[[], Tensor]:
    """One hypergradient (lr, then the decays) through T SGD steps by ``who``."""
    f, g, p0, h0 = problem(name, hidden)
    calls = {
        "unrolled": lambda h: H.flat(hg.unrolled(f, g, p0, h, T, hg.optim.sgd(lr=h["lr"]))),
        "hand": lambda h: hand(f, g, p0, h, T),
        "recompute": lambda h: recompute(f, g, p0, h, T),
        "torchopt": lambda h: hand(f, g, p0, h, T, H.import_peer("torchopt")[0]),
        "sweep": lambda h: H.flat(sweep(f, p0, h, T)[-1]),
    }
    return lambda: calls[who](H.leaves(h0))


def peak_child(who: str, name: str, T: int, hidden: int = 32, mmap: bool = False) -> dict:
    """(In a child process) a warm-up call, then the measured one: seconds and peak MB;
    ``mmap``: every block mmapped, so that the resident size follows the live tensors."""
    if mmap:
        H.mmap_every_block()
    call = competitor(who, name, T, hidden)
    call()
    _, wall, cpu, peak = H.peak_memory(call)
    return {"seconds": wall, "cpu_seconds": cpu, "peak_mb": peak}


def time_problem(name: str, T: int, rounds: int, quick: bool) -> dict[str, Any]:
    """Interleaved timings (they must agree with ``hand`` to 1e-3); peak memory at
    ``MEMORY_T`` (quick: no peers, memory of the MLP's ``unrolled`` and ``hand`` only)."""
    peer = not quick and H.import_peer("torchopt")[0] is not None
    names = ["unrolled", "hand", "recompute"] + ["torchopt"] * peer + ["sweep"]
    cases = [H.Case(w, lambda s, c=competitor(w, name, T): c()) for w in names]  # noqa: B008
    res = {t.key: t for t in H.interleave(cases, rounds)}
    agree = {w: H.relative_error(t.warm, res["hand"].warm) for w, t in res.items() if w != "sweep"}
    assert max(agree.values()) < 1e-3, f"a competitor disagrees with the hand-written loop: {agree}"
    hand = res["hand"].ms_all
    ratio = {w: H.median([a / b for a, b in zip(t.ms_all, hand)]) for w, t in res.items()}
    mem = [w for w in names if w != "sweep" and (not quick or name == "mlp" and w in MEM_QUICK)]
    peak = {w: H.isolated(peak_child, w, name, MEMORY_T, 32, True)["peak_mb"] for w in mem}
    out = {"params": H.flat(problem(name)[2]).numel()}
    out["median_ms"] = {w: t.ms for w, t in res.items()}
    out |= {"ratio_to_hand": ratio, "peak_mb": peak, "rel_diff_to_hand": agree}
    out["bound"] = 1.0 + (1.0 - MEMORY_SHARE) * ratio["sweep"]  # see render
    return out | {"times_ms": {w: t.ms_all for w, t in res.items()}}


def cold_calls(what: str) -> dict[str, Callable[[], Any]]:
    """The first ``hg.unrolled`` call, then the first ``hg.drmad`` (3 steps, 3 weights)."""
    w0, h = torch.zeros(3), {"d": torch.ones(3), "lr": torch.tensor(0.1)}
    f, g = (lambda w, h: ((w - 1) ** 2).sum() + (h["d"] * w**2).sum()), lambda w, h: (w**2).sum()
    args = (f, g, w0, h, 3, hg.optim.sgd(lr=h["lr"]))
    return {"first_call": lambda: hg.unrolled(*args), "first_drmad": lambda: hg.drmad(*args)}


def compile_trial(name: str, T: int, rounds: int) -> dict[str, Any]:
    """``torch.compile`` of the inner loss (cold): compile time, T plain gradient steps (the
    forward sweep) eager vs compiled, and whether double backward (the reverse step) goes
    through the compiled graph."""
    os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
    f, _, p0, h = problem(name)

    def sweep(loss: Callable[..., Tensor], steps: int) -> None:
        p = p0
        for _ in range(steps):
            x = H.leaves(p)
            gx = torch.autograd.grad(loss(x, h), x)
            p = tuple(v.detach() - h["lr"] * gv for v, gv in zip(x, gx))

    started, compiled = time.perf_counter(), torch.compile(f, dynamic=False)
    sweep(compiled, 2)
    out, x = {"compile_s": time.perf_counter() - started}, H.leaves(p0)
    try:
        gx = torch.autograd.grad(compiled(x, h), x, create_graph=True)
        torch.autograd.grad(gx, x, [torch.ones_like(v) for v in gx])
        out["double_backward"] = "works"
    except RuntimeError as error:
        out["double_backward"] = str(error).splitlines()[0][:120]
    sweeps = {"eager": f, "compiled": compiled}
    cases = [H.Case(k, lambda s, fn=fn: sweep(fn, T)) for k, fn in sweeps.items()]
    out["sweep_ms"] = {t.key: t.ms for t in H.interleave(cases, rounds)}
    g, sgd = problem(name)[1], hg.optim.sgd(lr=h["lr"])  # the option, end to end
    calls = {c: lambda s, c=c: hg.unrolled(f, g, p0, h, T, sgd, compile=c) for c in (False, True)}
    calls[True](0)  # compiles (this process already compiled f: mostly a cache hit)
    cases = [H.Case(f"compile={c}", fn) for c, fn in calls.items()]
    cases.append(H.Case("hand", lambda s: hand(f, g, p0, H.leaves(h), T)))
    return out | {"unrolled_ms": {t.key: t.ms for t in H.interleave(cases, rounds)}}


def run(args: Any, rep: H.Report) -> dict[str, Any]:
    T, rounds = args.steps, args.rounds
    data = {"T": T, "rounds": rounds, "load": os.getloadavg(), "memory_share": MEMORY_SHARE}
    data["problems"] = {n: time_problem(n, T, rounds, args.quick) for n in PROBLEMS}
    cold = H.cold_start(NAME)
    sympy, _ = cold.pop("sympy"), cold.pop("first_drmad_cpu_s")
    data["cold"] = cold | {"dynamo": cold["dynamo"] or sympy}
    if args.compile:
        data["compile"] = {n: compile_trial(n, T, rounds) for n in PROBLEMS}
    return data


def render(d: dict[str, Any]) -> list[str]:
    rows = []
    for n, r in d["problems"].items():
        for w, ms in r["median_ms"].items():
            row = {"problem": n, "params": r["params"], "competitor": w, "median ms": ms}
            row["ratio to hand (median)"] = r["ratio_to_hand"][w]
            rows.append(row | {"peak MB": r["peak_mb"].get(w)})
    c, share = d["cold"], d["memory_share"]
    bounds = ", ".join(f"{n} {r['bound']:.2f}" for n, r in d["problems"].items())
    out = [
        f"T = {d['T']}, {d['rounds']} interleaved rounds; peak MB: the increase during one call "
        f"at T = {MEMORY_T}, alone in a child process; sweep: the T plain SGD steps alone (no "
        "graph kept, no hypergradient)",
        H.dict_table(rows, "problem|params:d|competitor|median ms:.1f|" + RATIO),
        f"Least ratio to hand at a peak of at most {share:g}x hand's: such a run keeps at most "
        f"a fraction {share:g} of the steps' graphs, so it computes the gradient of at least "
        f"{1 - share:g} T steps twice (once plain in the forward sweep, once with its graph in "
        "the reverse sweep), on top of the hand loop's graph building and backward passes: "
        f"ratio >= 1 + {1 - share:g} x (sweep / hand) = {bounds}.",
        f"Cold start: `import torch, hypergradient` {c['import_s']:.2f} s; the first "
        f"`hg.unrolled` call {c['first_call_s']:.2f} s more ({c['first_call_cpu_s']:.2f} s CPU), "
        f"then the first `hg.drmad` {c['first_drmad_s']:.2f} s; torch._dynamo or sympy "
        f"imported: {c['dynamo']}.",
    ]
    for n, c, u in ((n, c, c["unrolled_ms"]) for n, c in d.get("compile", {}).items()):
        out.append(
            f"torch.compile on {n}: compiled in {c['compile_s']:.1f} s; {d['T']} plain gradient "
            f"steps (the forward sweep) {c['sweep_ms']['eager']:.1f} ms eager, "
            f"{c['sweep_ms']['compiled']:.1f} ms compiled; double backward through the compiled "
            f"graph (the reverse step): {c['double_backward']}. `hg.unrolled` end to end: "
            f"{u['compile=False']:.1f} ms eager, {u['compile=True']:.1f} ms with `compile=True`, "
            f"hand-written loop {u['hand']:.1f} ms (ratio {u['compile=True'] / u['hand']:.2f})."
        )
    return out


OPTIONS = [
    H.option("--steps", 20, 100, type=int, help="T"),
    H.option("--rounds", 2, 15, type=int, help="interleaved rounds"),
    H.option("--compile", action="store_true", help="also try torch.compile (~1 min)"),
]
main = H.entry(__doc__, NAME, TITLE, run, render, options=OPTIONS)

if __name__ == "__main__":
    main()
