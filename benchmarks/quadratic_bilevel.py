"""Accuracy against cost on benchopt's simulated quadratic bilevel problem (closed forms)."""

from collections.abc import Callable, Sequence
from typing import Any

import torch

import harness as H
import hypergradient as hg

F64, NAME = torch.float64, "quadratic_bilevel"
TITLE = "Quadratic bilevel problem (benchopt's simulated quadratic): accuracy against cost"
POWER_ITERS, NYSTROM_MAX_RANK = 20, 500
TRUNCATIONS = (1, 2, 5, 10, 20, 50, 100, 200)


def timed(cases: list[H.Case], repeats: int, ref: torch.Tensor) -> list[dict[str, Any]]:
    """Interleaved; more timed calls for cheap groups (short calls are the noisiest)."""
    n = lambda w: max(repeats, 7) if w < 30 else max(repeats, 5) if w < 150 else repeats  # noqa: E731
    out = []
    for t, r in H.scored(cases, n, ref):
        diag, x = t.warm[1] if t.warm else {}, t.meta.pop("x")
        x = diag["num_hvps"] if isinstance(diag.get("num_hvps"), int) else x
        out.append(r | {"x": x, "diagnostics": diag, "meta": t.meta})
    return out


def implicit_case(pb: H.Quadratic, key: str, x: float, make: Callable, **meta: Any) -> H.Case:
    def info() -> tuple:
        h, inf = hg.implicit(pb.f, pb.g, pb.theta_star, pb.phi, make(10_000), return_info=True)
        d = {"num_hvps": inf.num_hvps, "status": str(inf.status), "iterations": inf.iterations}
        d["relative_residual"] = inf.relative_residual
        return h, d | ({"alpha": inf.stats["alpha"]} if "alpha" in inf.stats else {})

    call = lambda s: hg.implicit(pb.f, pb.g, pb.theta_star, pb.phi, make(s))  # noqa: E731
    return H.Case(key, call, info, meta={"x": x, **meta})


def implicit_part(pb: H.Quadratic, budgets: Sequence[int], repeats: int) -> tuple[list, dict]:
    lmin, lmax, rmed = float(pb.evals[0]), float(pb.evals[-1]), float(pb.evals.median())
    extra = {"lambda_min": lmin, "lambda_max": lmax, "rho_median": rmed, "rho_low": lmin / 100}
    H.log(f"  [{pb.name}] Identity, Exact")
    ident = implicit_case(pb, "Identity(1/L)", 0, lambda s: hg.Identity(scale=1.0 / lmax))
    exact = implicit_case(pb, "Exact()", pb.d, lambda s: hg.Exact())
    res = timed([ident, exact], repeats, pb.h_star)
    for k in [k for k in budgets if k <= 5 * pb.d]:
        H.log(f"  [{pb.name}] k = {k}")
        group = [implicit_case(pb, "CG", k, lambda s, k=k: hg.CG(maxiter=k, tol=0.0), k=k)]
        auto = lambda s, k=k: hg.Neumann(k, alpha="auto")  # noqa: E731
        group.append(implicit_case(pb, "Neumann auto", k + POWER_ITERS, auto, k=k))
        for sketch in ("column", "gaussian") if k <= min(pb.d, NYSTROM_MAX_RANK) else ():
            for tag, rho in (("median", rmed), ("lmin/100", lmin / 100)):
                nys = lambda s, k=k, rho=rho, sk=sketch: hg.Nystrom(k, rho, sk, seed=s)  # noqa: E731
                group.append(implicit_case(pb, f"Nystrom {sketch}, rho={tag}", k, nys, k=k))
        if k >= 2:
            pcg = lambda s, r=k // 2, it=k - k // 2: hg.NystromPCG(r, maxiter=it, tol=0.0, seed=s)  # noqa: E731
            group.append(implicit_case(pb, "NystromPCG", k, pcg, k=k))
        res += timed(group, repeats, pb.h_star)
    return res, extra


def batched_vs_sequential(pb: H.Quadratic, r: int, repeats: int) -> dict[str, Any]:
    """Time of r products: batched (``matmat``, vmapped backward) vs r ``matvec`` calls."""
    op = hg.HessianOperator(pb.f, pb.theta_star, pb.phi)
    V = torch.randn(r, pb.d, generator=torch.Generator().manual_seed(1), dtype=F64)
    cases = [H.Case("b", lambda s: op.matmat(V))]
    cases.append(H.Case("s", lambda s: torch.stack([op.matvec(v) for v in V])))
    b, s = H.interleave(cases, repeats)
    op.release()
    diff = float((b.warm - s.warm).abs().max() / s.warm.abs().max())
    out = {"r": r, "batched_ms": b.ms, "sequential_ms": s.ms, "ratio": b.ms / s.ms}
    return out | {"max_rel_diff": diff}


def trajectory_part(pb: H.Quadratic, horizons: Sequence[int], repeats: int) -> tuple[list, dict]:
    eta = 1.0 / float(pb.evals[-1])
    opt, theta0, res, checks = hg.optim.sgd(lr=eta), torch.zeros(pb.d, dtype=F64), [], {"eta": eta}
    for T in horizons:
        ref, theta_T = pb.unrolled_reference(T, eta, theta0)
        H.log(f"  [{pb.name}] T = {T}")
        meta = {"T": T, "T_step_vs_implicit": H.relative_error(ref, pb.h_star)}

        def case(key: str, fn: Callable, T=T, theta_T=theta_T, meta=meta, **kw: Any) -> H.Case:
            def info() -> tuple:
                h, inf = fn(pb.f, pb.g, theta0, pb.phi, T, opt, return_info=True, **kw)
                d = {"reverse_steps": inf.reverse_steps, "stored_states": inf.stored_states}
                return h, d | {"theta_T_rel_err": H.relative_error(inf.params, theta_T)}

            m = meta | {"x": kw.get("truncate", T)} | ({"K": kw["truncate"]} if kw else {})
            return H.Case(key, lambda s: fn(pb.f, pb.g, theta0, pb.phi, T, opt, **kw), info, meta=m)

        group = [case("unrolled", hg.unrolled), case("forward_mode", hg.forward_mode)]
        group.append(case("drmad", hg.drmad))
        if T == max(horizons):
            key = f"truncated (T={T})"
            group += [case(key, hg.unrolled, truncate=K) for K in TRUNCATIONS if K < T]
        res += timed(group, repeats, ref)
        unrolled = hg.unrolled(pb.f, pb.g, theta0, pb.phi, T, opt)
        checks[f"T={T}: hg.unrolled vs closed form"] = H.relative_error(unrolled, ref)
    return res, checks


TABLES = {"relative error by budget k": "rel_err:.2e", "cosine by budget k": "cos:.6f"}
TABLES |= {"ms by budget k": "ms:.3g", "products reported (num_hvps)": "num_hvps:d"}


def markdown(name: str, e: dict[str, Any], budgets: list[int]) -> str:
    ex, bvs, tc = e["implicit_extra"], e["batched_vs_sequential"], e["trajectory_checks"]
    res, tables = e["implicit_results"], []
    facts = [
        f"A: eigenvalues in [{ex['lambda_min']:.3g}, {ex['lambda_max']:.3g}]; ||h*|| = "
        f"{e['h_star_norm']:.4g}; ||direct term|| / ||h*|| = {e['direct_ratio']:.3g}; "
        f"||theta*|| = {e['theta_star_norm']:.4g}; checks: {H.facts(e['checks'])}",
        f"Nystrom rho: median eigenvalue {ex['rho_median']:.3g}, lambda_min / 100 = "
        f"{ex['rho_low']:.3g}; Neumann auto spends k + {POWER_ITERS} products",
        f"{bvs['r']} Hessian-vector products: batched (HessianOperator.matmat) "
        f"{H.ms(bvs['batched_ms'])} ms, sequential matvec {H.ms(bvs['sequential_ms'])} ms (ratio "
        f"{bvs['ratio']:.2f}; results agree to {bvs['max_rel_diff']:.1e})",
    ]
    facts += [
        f"{r['key']}: {r['diagnostics'].get('num_hvps', '')} products, rel. err "
        f"{H.sci(r['rel_err'])}, cos {H.fix(r['cos'], 6)}, {H.ms(r['ms'])} ms"
        for r in res
        if "k" not in r["meta"]
    ]
    facts += sorted(
        f"{r['key']} k={r['meta'].get('k')}: {r['error'] or r['diagnostics'].get('status')}"
        for r in res
        if r["error"] or r["diagnostics"].get("status") in ("negative_curvature", "diverged")
    )
    keys = list(dict.fromkeys(r["key"] for r in res if "k" in r["meta"]))
    by = {(r["key"], r["meta"].get("k")): r for r in res}
    ks = [k for k in budgets if any((key, k) in by for key in keys)]
    for title, col in TABLES.items():
        key, spec = col.split(":")
        get = lambda r, key=key: r[key] if key in r else r["diagnostics"].get(key)  # noqa: E731
        cell = lambda s, get=get: {f"k={k}": get(by[s, k]) for k in ks if (s, k) in by}  # noqa: E731
        rows = [{"solver": s} | cell(s) for s in keys]
        table = H.dict_table(rows, "|".join(["solver"] + [f"k={k}:{spec}" for k in ks]))
        tables.append(f"{title}:\n\n{table}")
    traj = []
    for r in e["trajectory_results"]:
        rev = f"{r['meta']['T']} x {e['p']} tangents" if r["key"] == "forward_mode" else None
        x = {"method": r["key"], "T": r["meta"]["T"], "gap": r["meta"]["T_step_vs_implicit"]}
        traj.append(r | x | {"reverse_steps": rev or r["diagnostics"].get("reverse_steps")})
    cols = "method|T:d|reverse_steps|gap:.3g|rel_err:.2e|cos:.6f|ms:.3g|cpu_ms:.3g|error"
    return (
        f"## {name}: d = {e['d']}, p = {e['p']}, cond(A) = {e['cond']:g}\n\n{H.bullets(facts)}\n\n"
        "### Implicit solvers at theta*\n\n" + "\n\n".join(tables) + "\n\n"
        f"### Trajectory methods: T steps of SGD (lr = {tc['eta']:.3g}) from theta_0 = 0\n\n"
        f"Against the closed-form hypergradient of the same T steps ({H.facts(tc, ('eta',))}); "
        f"gap = ||h_T - h*|| / ||h*||.\n\n{H.dict_table(traj, cols)}"
    )


STYLES = {"CG": "C0o-", "Neumann auto": "C1s-", "NystromPCG": "C4D-", "Exact()": "k*"}
STYLES |= {"Nystrom column, rho=median": "C2^-", "Nystrom column, rho=lmin/100": "C2v--"}
STYLES |= {"Nystrom gaussian, rho=median": "C3^-", "Nystrom gaussian, rho=lmin/100": "C3v--"}
STYLES |= {"unrolled": "C0o-", "forward_mode": "C1s-", "drmad": "C3D-", "Identity(1/L)": "C7x"}
XLABELS = {"implicit": "products (num_hvps)", "trajectory": "steps (truncated: K)"}


def plot(data: dict[str, Any], out: Any) -> Any:
    """Relative error against products (or steps) and against time, per problem."""
    paths = []
    for which, what in XLABELS.items():
        panels = []
        for name, e in data["problems"].items():
            res = [r for r in e[f"{which}_results"] if not r["error"]]
            for xkey in ("x", "ms"):
                lines: dict[str, list] = {}
                for r in sorted(res, key=lambda r: r["x"]):
                    pt = (r[xkey], max(r["rel_err"] or 1e-17, 1e-17))
                    lines.setdefault(r["key"], []).append(pt)
                ident = lines.pop("Identity(1/L)", []) if xkey == "x" else []
                axes = {"xscale": "log", "yscale": "log", "ylabel": "relative error"}
                axes |= {"title": name, "xlabel": what if xkey == "x" else "wall ms per call"}
                hlines = {"Identity(1/L) (0 products)": ident[0][1]} if ident else {}
                panels.append({"lines": lines, "fmt": STYLES, "set": axes, "hlines": hlines})
        title = f"{which}: relative error against the closed form"
        paths.append(H.figure(out / f"{NAME}_{which}.png", panels, 2, (6.5, 3.9), title))
    return paths


def render(d: dict[str, Any]) -> list[str]:
    st = d["settings"]
    notes = [
        f"float64; median of n timed calls after a warm-up, interleaved (n = {st['repeats']}, 5 "
        "for groups of calls under 150 ms, 7 under 30 ms); randomized solvers: median over seeds",
        "h* = d_phi g - C A^-1 grad_theta g at theta* = -A^-1 (C'phi + a) (two dense solves); "
        f"p = {st['p']}; rel. err = ||h - h*|| / ||h*||; errors below 1e-17 drawn at 1e-17",
    ]
    return [H.bullets(notes)] + [markdown(n, e, st["budgets"]) for n, e in d["problems"].items()]


def problem(d: int, cond: float, seed: int, budgets: list, horizons: tuple, repeats: int) -> tuple:
    pb = H.quadratic(d, cond, seed)
    H.log(f"[{pb.name}] reference and checks ...")
    grad_f = torch.func.grad(pb.f)(pb.theta_star, pb.phi)
    exact = hg.implicit(pb.f, pb.g, pb.theta_star, pb.phi, hg.Exact())
    e = {"d": d, "p": pb.p, "cond": cond, "h_star_norm": float(pb.h_star.norm())}
    e |= {"direct_ratio": float(pb.direct.norm() / pb.h_star.norm())}
    e |= {"theta_star_norm": float(pb.theta_star.norm())}
    e["checks"] = {"hg.Exact vs closed form": H.relative_error(exact, pb.h_star)}
    e["checks"] |= {"||grad_theta f(theta*)||": float(grad_f.norm())}
    e["checks"] |= {"cond(A) measured": float(pb.evals[-1] / pb.evals[0])}
    e["implicit_results"], e["implicit_extra"] = implicit_part(pb, budgets, repeats)
    e["batched_vs_sequential"] = batched_vs_sequential(pb, min(pb.d, 100), max(repeats, 5))
    e["trajectory_results"], e["trajectory_checks"] = trajectory_part(pb, horizons, repeats)
    return pb.name, e


def run(args: Any, rep: H.Report) -> dict[str, Any]:
    q = args.quick
    specs = ((20, 10.0),) if q else ((100, 10.0), (100, 1e4), (1000, 1e2), (1000, 1e4))
    budgets = [1, 2] if q else [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    horizons, reps = ((3,), args.repeats) if q else ((10, 30, 100), args.repeats)
    out = dict(problem(d, cond, args.seed, budgets, horizons, reps) for d, cond in specs)
    settings = {"budgets": budgets, "horizons": list(horizons), "repeats": reps, "p": 10}
    settings |= {"mu": 0.1, "L_cross": 1.0, "nystrom_max_rank": NYSTROM_MAX_RANK}
    return {"settings": settings | {"truncations": list(TRUNCATIONS)}, "problems": out}


OPTIONS = [H.option("--repeats", 1, 3, type=int, help="timed calls per method")]
main = H.entry(__doc__, NAME, TITLE, run, render, plot=plot, options=OPTIONS)

if __name__ == "__main__":
    main()
