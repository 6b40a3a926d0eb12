"""Mixed precision: hypergradients when the inner objective runs in bfloat16."""

import contextlib
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import harness as H
import hypergradient as hg

F64, BF16, NAME = torch.float64, torch.bfloat16, "mixed_precision"
TITLE = "Mixed precision: hypergradients with a bfloat16 inner objective"
MODES = ("fp32", "autocast", "bf16 params", "ac-trained, fp32", "ac-trained, autocast")
TIMED = ("fp32", "autocast", "bf16 params")
SOLVERS: dict[str, Callable[[], hg.Solver]] = {"CG": lambda: hg.CG(maxiter=100, tol=1e-6)}
SOLVERS |= {"Neumann": lambda: hg.Neumann(maxiter=50, alpha="auto")}
SOLVERS |= {"Nystrom": lambda: hg.Nystrom(rank=20, rho=1e-3, sketch="gaussian", seed=0)}
SOLVERS |= {"Exact": lambda: hg.Exact()}


def autocast(enabled: bool = True) -> Any:
    return torch.autocast("cpu", dtype=BF16, enabled=enabled)


def logreg(log_decay: float) -> H.Bilevel:
    pb = H.logreg(0, n_train=300, bias=False, log_decay=log_decay, shuffle=False)
    pb.name = f"logreg decay={math.exp(log_decay):.3g}"
    pb.description = f"logistic regression, breast cancer (30 features), log decay {log_decay:g}"
    return pb


def autocast_trained(p: H.Bilevel, Hd: Tensor, iters: int = 20) -> tuple[tuple, dict]:
    """A stationary point of the autocast objective near theta*: Newton steps with the float64
    Hessian on the autocast gradient."""
    L = torch.linalg.cholesky(Hd + p.damping * torch.eye(Hd.shape[0], dtype=F64))
    theta, hp, norms = H.flat(p.params).float(), tuple(h.float() for h in p.hparams), []
    for _ in range(iters):
        leaves = H.leaves(H.unflat(theta, p.params))
        with autocast():
            loss = p.inner_loss(leaves, hp)
        g = H.flat(torch.autograd.grad(loss, leaves)).double()
        norms.append(float(g.norm()))
        theta = (theta.double() - torch.cholesky_solve(g[:, None], L)[:, 0]).float()
    g64 = torch.func.grad(lambda t: p.inner_loss(H.unflat(t, p.params), p.hparams))(theta.double())
    info = {"autocast_grad_norm_last": norms[-1], "autocast_grad_norm_min": min(norms)}
    info |= {"float64_grad_norm": float(g64.norm())}
    info["distance_to_theta_star_rel"] = H.relative_error(theta, H.flat(p.params))
    return H.unflat(theta, p.params), info


def moded(p: H.Bilevel, mode: str, fn: Callable, ac_params=(), start=None, leaves=False):
    """``call(*a) = fn(params, hparams, *a)`` in precision ``mode`` (under autocast if it ends
    so); ``start`` replaces the inner optimum; ``leaves``: params that require grad."""
    params = tuple(t.to(BF16 if "bf16" in mode else torch.float32) for t in start or p.params)
    params = ac_params if mode.startswith("ac-") else H.leaves(params) if leaves else params
    hparams, ac = tuple(h.float() for h in p.hparams), mode.endswith("autocast")

    def call(*a: Any) -> Any:
        with autocast(ac):
            return fn(params, hparams, *a)

    return call


def measure(row: dict, call: Callable, ref: Tensor, same64: Tensor | None, repeats: int) -> dict:
    """Accuracy of ``call(True) = (h, info or None)``, then ``repeats`` timed ``call(False)``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hg.HypergradientWarning)
            h, info = call(True)
            h = H.flat(h)
            row |= {"rel_err": H.relative_error(h, ref), "cos": H.cosine(h, ref)}
            row["out_dtype"] = str(h.dtype)[6:]
            if same64 is not None:
                row["vs_same_f64"] = H.relative_error(h, same64)
            if info is not None:
                row |= {"status": info.status, "num_hvps": info.num_hvps}
                row["inner_grad_norm"] = info.inner_grad_norm
            if row["mode"] in TIMED and repeats > 0:
                t = [H.timed_call(lambda: call(False))[1:] for _ in range(repeats)]
                row |= {"ms": H.median([w for w, _ in t]), "cpu_ms": H.median([c for _, c in t])}
                row["ms_all"] = [w for w, _ in t]
    except Exception as exc:  # reported in the table
        row["error"] = H.error_text(exc, 160)
    return row


def problem_rows(p: H.Bilevel, ref: Tensor, ac_params: tuple, repeats: int, steps: int, lr: float):
    f, g, d, rows, unr = p.inner_loss, p.outer_loss, p.damping, [], []
    for sname, make in SOLVERS.items():
        same64 = H.flat(hg.implicit(f, g, p.params, p.hparams, make(), damping=d))
        for mode in MODES:
            fn = lambda w, h, i, mk=make: hg.implicit(f, g, w, h, mk(), damping=d, return_info=i)  # noqa: E731
            call = moded(p, mode, fn, ac_params)
            rows.append(measure({"solver": sname, "mode": mode}, call, ref, same64, repeats))
            H.log(f"  {sname:8s} {mode:22s} rel err {rows[-1].get('rel_err')}")
    ref_u = H.flat(hg.unrolled(f, g, p.params0, p.hparams, steps, hg.optim.sgd(lr)))
    for mode in TIMED:
        fn = lambda w, h, info: (hg.unrolled(f, g, w, h, steps, hg.optim.sgd(lr)), None)  # noqa: E731
        row = {"solver": f"unrolled SGD T={steps}", "mode": mode}
        unr.append(measure(row, moded(p, mode, fn, start=p.params0), ref_u, None, repeats))
    return rows, unr


def gradient_ms(p: H.Bilevel, repeats: int) -> dict[str, float]:
    """Milliseconds of one gradient of f per timed mode (10 per sample)."""
    grad = lambda w, h: torch.autograd.grad(p.inner_loss(w, h), w)  # noqa: E731
    time = lambda c: H.median([H.timed_call(c, 10)[1] for _ in range(max(3, repeats))])  # noqa: E731
    return {mode: time(moded(p, mode, grad, leaves=True)) for mode in TIMED}


COLUMNS = "solver|mode|rel_err:.2e|cos:.6f|vs_same_f64:.2e|status|num_hvps:d|out_dtype|ms:.3g"
COLUMNS += "|cpu_ms:.3g|error"


def render(d: dict[str, Any]) -> list[str]:
    summary, sections = [], []
    for name, pb in d["problems"].items():
        by = {(r["solver"], r["mode"]): r for r in pb["implicit"]}
        ub, kappa = {r["mode"]: r for r in pb["unrolled"]}, pb["cond"]
        for s in ("CG", "Exact"):
            x = {"problem": name, "kappa": kappa, "2^-8 kappa": 2**-8 * kappa, "solver": s}
            x |= {m: by[(s, m)].get("rel_err") for m in MODES}
            if s == "CG":
                x["unrolled autocast"] = ub["autocast"].get("rel_err")
                x["unrolled bf16"] = ub["bf16 params"].get("rel_err")
            summary.append(x)
        notes = [
            H.facts(pb["setup"]),
            f"dense float64 Hessian: lambda_min {pb['lambda_min']:.3g}, lambda_max "
            f"{pb['lambda_max']:.3g}, kappa {pb['cond']:.3g}; damping {pb['damping']:.3g}; ||h*|| "
            f"= {pb['ref_norm']:.3g}, hg.Exact vs dense torch solve {pb['ref_check']:.1e}",
            f"autocast-trained params: {H.facts(pb['ac'])}",
            f"one gradient of f (ms): {H.facts(pb['grad_ms'])}; unrolled lr = 1/lambda_max = "
            f"{pb['unrolled_lr']:.3g}",
        ]
        table = H.dict_table(pb["implicit"] + pb["unrolled"], COLUMNS)
        sections.append(f"### {name}: {pb['description']}\n\n{H.bullets(notes)}\n\n{table}")
    notes = [
        f"CPU flags: {d['machine'].get('cpu_flags')}; reference h* = hg.Exact() in float64; "
        f"median of {d['repeats']} timed calls; unrolled: {d['unrolled_steps']} SGD steps, "
        "against hg.unrolled in float64",
        "vs same f64 = distance to the same solver in float64 at theta*; bf16 unit roundoff "
        "2^-8: a backward-stable solve has a relative error up to about 2^-8 kappa",
    ]
    cols = "problem|kappa:.3g|2^-8 kappa:.3g|solver|" + "|".join(f"{m}:.2e" for m in MODES)
    head = "### Summary: relative error of CG (tol 1e-6) and Exact vs float64's exact one\n\n"
    cols += "|unrolled autocast:.2e|unrolled bf16:.2e"
    return [H.bullets(notes), head + H.dict_table(summary, cols), *sections]


def plot(data: dict[str, Any], out: Path) -> Path:
    """Relative error vs float64, per solver and precision mode, per problem."""
    panels = []
    for name, pb in data["problems"].items():
        rows = [r for r in pb["implicit"] + pb["unrolled"] if r.get("rel_err") is not None]
        solvers, modes = (list(dict.fromkeys(r[k] for r in rows)) for k in ("solver", "mode"))
        by = {(r["solver"], r["mode"]): max(r["rel_err"], 1e-17) for r in rows}
        bars = {m: [by.get((s, m), math.nan) for s in solvers] for m in modes}
        axes = {"yscale": "log", "ylabel": "relative error vs float64 exact"}
        axes["title"] = f"{name} (condition number {pb['cond']:.3g})"
        panels.append({"bars": bars, "ticks": solvers, "hlines": {"2^-8": 2.0**-8}, "set": axes})
    return H.figure(out / f"{NAME}.png", panels, len(panels), (5.5, 4.5))


def problem(p: H.Bilevel, repeats: int, steps: int) -> dict[str, Any]:
    H.log(f"[{p.name}] {p.setup['inner_solver']}")
    Hd = H.dense_hessian(p)
    ev, ref = torch.linalg.eigvalsh(Hd), H.flat(hg.implicit(*p.args, hg.Exact(), damping=p.damping))
    ac_params, ac = autocast_trained(p, Hd)
    info = {"lambda_min": float(ev[0]), "lambda_max": float(ev[-1]), "ac": ac}
    info |= {"cond": float((ev[-1] + p.damping) / (ev[0] + p.damping)), "ref_norm": ref.norm()}
    info |= {"ref_check": H.relative_error(ref, H.dense_hypergradient(p, Hd))}
    rows, urows = problem_rows(p, ref, ac_params, repeats, steps, 1.0 / float(ev[-1]))
    info |= {"grad_ms": gradient_ms(p, repeats), "unrolled_lr": 1.0 / float(ev[-1])}
    info |= {"implicit": rows, "unrolled": urows}
    return {"description": p.description, "setup": p.setup, "damping": p.damping} | info


def run(args: Any, rep: H.Report) -> dict[str, Any]:
    flags, steps = "", 5 if args.quick else 20
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        flags = " ".join(f for f in ("avx2", "avx512_bf16", "avx512f", "amx_bf16") if f in text)
    rep.machine |= {"cpu_flags": flags, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    hidden, iters, rounds = (4, 100, 1) if args.quick else (16, 1000, 10)
    builders = [lambda: logreg(-1.0)] + [lambda: logreg(-3.0)] * (not args.quick)
    builders.append(lambda: H.digits_mlp(args.seed, hidden, iters, rounds=rounds, require_pd=False))
    out = {p.name: problem(p, args.repeats, steps) for p in (b() for b in builders)}
    return {"repeats": args.repeats, "unrolled_steps": steps, "problems": out}


OPTIONS = [H.option("--repeats", 1, 5, type=int, help="timed calls per mode")]
main = H.entry(__doc__, NAME, TITLE, run, render, plot=plot, options=OPTIONS)

if __name__ == "__main__":
    main()
