"""Accuracy and cost of the implicit-hypergradient solvers, against an exact reference."""

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

import harness as H
import hypergradient as hg

NAME, TITLE = "implicit_solvers", "Implicit hypergradient solvers: accuracy and cost"


def reference(pb: H.Bilevel) -> dict[str, Any]:
    """``h*`` (closed form or ``hg.Exact()``), checked against plain torch; the spectrum."""
    t0 = time.perf_counter()
    h, info = hg.implicit(*pb.args, solver=hg.Exact(chunk_size=64), return_info=True)
    exact_ms, h, Hd = 1e3 * (time.perf_counter() - t0), H.flat(h), H.dense_hessian(pb)
    dense, ev = H.dense_hypergradient(pb, Hd), torch.linalg.eigvalsh(Hd)
    checks = {"hg.Exact vs torch dense (rel. diff)": H.relative_error(h, dense)}
    checks |= {"hg.Exact inner_grad_norm": info.inner_grad_norm}
    checks |= {"hg.Exact relative_residual": float(info.relative_residual or 0.0)}
    if pb.closed_form is not None:
        checks["hg.Exact vs closed form (rel. diff)"] = H.relative_error(h, pb.closed_form)
        checks["torch dense vs closed form (rel. diff)"] = H.relative_error(dense, pb.closed_form)
        h = pb.closed_form
    out = {"h": h, "lambda_min": float(ev[0]), "lambda_median": float(ev.median())}
    out |= {"lambda_max": float(ev[-1]), "reference_norm": float(h.norm())}
    return out | {"reference_checks": checks, "exact_ms": exact_ms}


def ours(pb: H.Bilevel, key: str, make: Callable[[int], hg.Solver]) -> H.Case:
    def info() -> tuple:
        h, inf = hg.implicit(*pb.args, solver=make(10_000), return_info=True)
        return H.flat(h), inf.num_hvps, str(inf.status)

    call = lambda s: H.flat(hg.implicit(*pb.args, solver=make(s)))  # noqa: E731
    return H.Case(key, call, info, meta={"impl": "hypergradient"})


def theirs(pb: H.Bilevel, key: str, fn: Callable, k: int, arg: float, seeded: bool) -> H.Case:
    def call(s: int) -> torch.Tensor:
        if seeded:  # hypergrad's nystrom samples with the global generator
            torch.manual_seed(s)
        return H.flat([t.detach() for t in fn(*pb.args, k, arg)])

    return H.Case(key, call, lambda: (call(10_000), k, ""), meta={"impl": "hypergrad"})


def gradient(pb: H.Bilevel) -> H.Case:
    ps = H.leaves(pb.params)
    call = lambda s: torch.autograd.grad(pb.inner_loss(ps, pb.hparams), ps)[0]  # noqa: E731
    n, meta = H.calls_per_sample(lambda: call(0)), {"impl": "autograd"}
    return H.Case("gradient of f", call, lambda: (None, None, ""), inner=n, meta=meta)


def measure(cases: list[H.Case], repeats: int, h_ref: torch.Tensor) -> list[dict[str, Any]]:
    """Interleaved timing; per case the measurement dict of the JSON (errors per seed)."""
    out = []
    for t, row in H.scored(cases, repeats, h_ref):
        _, hvps, status = t.warm or (None, None, "")
        row |= {"impl": t.meta["impl"], "num_hvps": hvps, "status": status}
        out.append(row | {"warned_calls": t.warned_calls})
    return out


def benchmark(pb: H.Bilevel, ref: dict, budgets: Sequence[int], repeats: int, hgrad: Any) -> dict:
    alpha, rhos, rows, costs = 1.0 / ref["lambda_max"], [0.1, ref["lambda_median"]], [], []

    def row(k: int, solver: str, o: Any, t: Any = None, label: str | None = None) -> None:
        rows.append({"k": k, "solver": solver, "ours": o, "theirs_label": label, "theirs": t})

    def group(k: int, solver: str, key: str, make: Callable, peer: tuple = (), label=None) -> None:
        """A row: ours and, given ``peer = (hypergrad's function, argument, seeded)``, theirs."""
        cases = [ours(pb, key, make)]
        if hgrad is not None and peer:
            cases.append(theirs(pb, peer[0], getattr(hgrad, peer[0]), k, *peer[1:]))
        o, *t = measure(cases, repeats, ref["h"])
        row(k, solver, o, *(t + [label] if t else []))

    for k in budgets:
        H.log(f"  [{pb.name}] k = {k}")
        cases = [ours(pb, "CG", lambda s, k=k: hg.CG(maxiter=k, tol=0))]
        for lr in (1.0, 0.1) if hgrad is not None else ():
            key, cg = f"conjugate_gradient(lr={lr:g})", hgrad.conjugate_gradient
            cases.append(theirs(pb, key, cg, k, lr, False))
        cg, *th, grad = measure([*cases, gradient(pb)], repeats, ref["h"])
        row(k, f"CG(maxiter={k}, tol=0)", cg, *(th[:1] + ["conjugate_gradient lr=1"] if th else []))
        if th:
            row(k, "〃", None, th[1], "conjugate_gradient lr=0.1")
        if cg["ms"] and grad["ms"]:
            c = {"k": k, "cg_ms": cg["ms"], "grad_ms": grad["ms"], "ratio": cg["ms"] / grad["ms"]}
            c |= {"cg_cpu_ms": cg["cpu_ms"], "grad_cpu_ms": grad["cpu_ms"], "floor": k + 3}
            c |= {"cpu_ratio": cg["cpu_ms"] / grad["cpu_ms"], "num_hvps": cg["num_hvps"]}
            costs.append(c)
        auto = lambda s, k=k: hg.Neumann(k, "auto")  # noqa: E731
        group(k, f'Neumann({k}, alpha="auto")', "Neumann auto", auto)
        neumann = lambda s, k=k: hg.Neumann(k, alpha=alpha)  # noqa: E731
        peer, label = ("neumann", alpha, False), f"neumann lr={alpha:.3g}"
        group(k, f"Neumann({k}, alpha=1/L={alpha:.3g})", "Neumann 1/L", neumann, peer, label)
        for sketch in ("column", "gaussian"):
            for rho in rhos:
                make = lambda s, k=k, rho=rho, sk=sketch: hg.Nystrom(k, rho, sk, seed=s)  # noqa: E731
                peer = ("nystrom", rho, True) if sketch == "column" else ()
                key = f"Nystrom {sketch[:3] if sketch == 'column' else 'gauss'}"
                label = f"nystrom rank={k} rho={rho:.3g}"
                group(k, f"Nystrom(rank={k}, rho={rho:.3g}, {sketch})", key, make, peer, label)
        r, it = k // 2, k - k // 2
        pcg = lambda s, r=r, it=it: hg.NystromPCG(r, maxiter=it, tol=0, seed=s)  # noqa: E731
        group(k, f"NystromPCG(rank={r}, maxiter={it}, tol=0)", "NystromPCG", pcg)
    group(0, f"Identity(scale=1/L={alpha:.3g})", "Identity", lambda s: hg.Identity(scale=alpha))
    rows.insert(0, rows.pop())
    out = {"alpha": alpha, "rhos": rhos, "grad_ms": grad["ms"], "rows": rows}
    return out | {"cg_cost_ratio": costs}


def render_problem(name: str, pb: dict[str, Any]) -> str:
    s, checks = pb["setup"], "; ".join(f"{k} = {v:.2e}" for k, v in pb["reference_checks"].items())
    facts = [
        H.facts(s),
        f"exact Hessian: lambda_min {pb['lambda_min']:.4g}, median {pb['lambda_median']:.4g}, "
        f"lambda_max {pb['lambda_max']:.4g}; ||h*|| = {pb['reference_norm']:.4g}; hg.Exact() took "
        f"{pb['exact_ms']:.0f} ms; checks: {checks}",
        f"Neumann alpha = 1/lambda_max = {pb['alpha']:.4g}; Nystrom rho 0.1 and "
        f"{pb['rhos'][1]:.3g}; one gradient of f = {H.ms(pb['grad_ms'])} ms",
    ]
    rows, base = [], {}
    for r in pb["rows"]:
        o, t = r["ours"] or {}, r["theirs"] or {}
        base = r["ours"] or base
        x = {"k": r["k"], "solver": r["solver"], "theirs": r["theirs_label"]}
        x |= {k: o.get(k) for k in ("num_hvps", "rel_err", "cos", "ms")}
        x["status"] = (o.get("status") or "") + (" (error)" if o.get("error") else "")
        if o.get("warned_calls"):
            x["status"] += f" (warned in {o['warned_calls']}/{len(o['ms_all'])} timed calls)"
        x |= {f"theirs {k}": t.get(k) for k in ("rel_err", "cos", "ms", "error")}
        if t and not t.get("error"):
            x["theirs/ours wall"] = t["ms"] / base["ms"]
            x["theirs/ours CPU"] = t["cpu_ms"] / base["cpu_ms"]
        rows.append(x)
    cols = "k:d|solver|num_hvps:d|status|rel_err:.2e|cos:.6f|ms:.3g"
    if any(r["theirs"] for r in pb["rows"]):
        cols += "|theirs|theirs rel_err:.2e|theirs cos:.6f|theirs ms:.3g"
        cols += "|theirs/ours wall:.2f|theirs/ours CPU:.2f"
    ms_ = [m for r in pb["rows"] for m in (r["ours"], r["theirs"]) if m]
    notes = sorted({f"{m['key']}: {w}" for m in ms_ for w in m["warnings"]})
    notes += sorted({f"{m['key']}: {m['error']}" for m in ms_ if m["error"]})
    cost = "k:d|num_hvps:d|cg_ms:.3g|grad_ms:.3g|ratio:.1f|cpu_ratio:.1f|floor:d"
    warned = "\n\nWarnings (of the warm-up calls) and errors:\n\n" + H.bullets(notes)
    return (
        f"### {name}: {pb['description']}\n\n{H.bullets(facts)}\n\n{H.dict_table(rows, cols)}\n\n"
        "CG cost ratio (one hg.implicit call with CG(maxiter=k, tol=0) / one gradient of f):\n\n"
        + H.dict_table(pb["cg_cost_ratio"], cost)
        + (warned if notes else "")
    )


def render(d: dict[str, Any]) -> list[str]:
    a = d["args"]
    notes = [
        f"solvers in {a.get('dtype', 'float64')}, references in float64; budgets k = "
        f"{d['budgets']}; median of {d['repeats']} timed calls after one warm-up",
        "rel. err = ||h - h*|| / ||h*||; randomized solvers: median over seeds; hvps and status "
        "from return_info=True; theirs/ours: ratio of median wall or CPU times, interleaved",
    ]
    return [H.bullets(notes), *(render_problem(n, pb) for n, pb in d["problems"].items())]


def plot(data: dict[str, Any], out: Any) -> Any:
    """Relative error vs products and vs milliseconds, per problem; ours solid, seed dashed."""
    panels = []
    for j, xlabel in enumerate(("Hessian-vector products", "ms per hypergradient")):
        for name, pb in data["problems"].items():
            lines: dict[str, list] = {}
            for r, side in [(r, s) for r in pb["rows"] for s in ("ours", "theirs")]:
                m = r.get(side)
                if m and not m.get("error") and m.get("rel_err") is not None:
                    x = (max(m.get("num_hvps") or r["k"], 1), m["ms"])[j]
                    label = m["key"] if side == "ours" else f"hypergrad 0.0.1 {m['key']}"
                    lines.setdefault(label, []).append((x, max(m["rel_err"], 1e-17)))
            axes = {"xscale": "log", "yscale": "log", "ylabel": "relative error vs exact"}
            panel = {"lines": {k: sorted(v) for k, v in lines.items()}, "set": axes}
            panel["fmt"] = {k: "--x" for k in lines if k.startswith("hypergrad ")}
            panels.append(panel | {"set": axes | {"title": name, "xlabel": xlabel}})
    return H.figure(out / f"{NAME}.png", panels, len(data["problems"]))


def run(args: Any, rep: H.Report) -> dict[str, Any]:
    q, (hgrad, version) = args.quick, H.import_peer("hypergrad.approx_hypergrad", "hypergrad")
    rep.machine["hypergrad"] = version if hgrad else None
    builders = {
        "ridge": lambda: H.ridge(args.seed, 40 if q else 200, 10 if q else 50),
        "logreg": lambda: H.logreg(args.seed),
        "mlp": lambda: H.digits_mlp(args.seed, *((4, 100, (1e-2, 1e-1)) if q else ())),
    }
    out: dict[str, Any] = {}
    for name in args.problems:
        H.log(f"[{name}] inner problem and reference ...")
        pb = builders[name]()
        ref, dtype = reference(pb), getattr(torch, args.dtype)
        cast = pb.cast(dtype, torch.float64 if args.dtype == "float64" else None)
        res = benchmark(cast, ref, args.budgets, args.repeats, hgrad)
        ref.pop("h")
        out[name] = {"description": pb.description, "setup": pb.setup, **ref, **res}
    return {"budgets": args.budgets, "repeats": args.repeats, "problems": out}


OPTIONS = [
    H.option("--budgets", [10], [5, 10, 20, 50, 100], type=int, nargs="+", help="products"),
    H.option("--repeats", 1, 9, type=int, help="timed calls per solver"),
    H.option("--dtype", choices=("float64", "float32"), default="float64"),
    H.option("--problems", ["ridge", "logreg"], ["ridge", "logreg", "mlp"], nargs="+"),
]
main = H.entry(__doc__, NAME, TITLE, run, render, plot=plot, options=OPTIONS)

if __name__ == "__main__":
    main()
