"""Accuracy against cost on benchopt's simulated quadratic bilevel problem (closed forms).

Part 1: the implicit solvers at theta* against the closed-form h*, budgets of k products.
Part 2: unrolled / truncated / forward-mode / DrMAD through T SGD steps against the
closed-form hypergradient of the unrolled loop. Also: r products batched vs sequential.
Problem, solvers and settings: benchmarks/README.md.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

import harness as H
import hypergradient as hg
from harness import Case, interleave, log, median, ms, problems, sci, table
from harness import report as rp
from harness.problems import F64, Quadratic, cosine, relative_error

NAME = "quadratic_bilevel"
TITLE = "Quadratic bilevel problem (benchopt's simulated quadratic): accuracy against cost"

POWER_ITERS, NYSTROM_MAX_RANK = 20, 500
TRUNCATIONS = (1, 2, 5, 10, 20, 50, 100, 200)


def run(cases: list[Case], repeats: int, ref: torch.Tensor) -> list[dict[str, Any]]:
    """Interleaved; more timed calls for cheap groups (short calls are the noisiest)."""
    n = lambda w: max(repeats, 7) if w < 30 else max(repeats, 5) if w < 150 else repeats  # noqa: E731
    out = []
    for t in interleave(cases, n, keep=lambda h: (relative_error(h, ref), cosine(h, ref))):
        diag = t.warm[1] if t.warm else {}
        x = diag.get("num_hvps") if isinstance(diag.get("num_hvps"), int) else t.meta.pop("x")
        t.meta.pop("x", None)
        out.append(
            {
                "key": t.key,
                "x": x,
                "rel_err": median([e for e, _ in t.kept]),
                "cos": median([c for _, c in t.kept]),
                "rel_err_all": [e for e, _ in t.kept],
                "ms": t.ms,
                "cpu_ms": t.cpu_ms,
                "ms_all": t.ms_all,
                "cpu_ms_all": t.cpu_ms_all,
                "diagnostics": diag,
                "warnings": t.warnings,
                "error": t.error,
                "meta": t.meta,
            }
        )
    return out


def implicit_case(
    pb: Quadratic, key: str, x: float, make: Callable[[int], hg.Solver], **meta: Any
) -> Case:
    def info() -> tuple:
        h, inf = hg.implicit(pb.f, pb.g, pb.theta_star, pb.phi, make(10_000), return_info=True)
        d = {
            "num_hvps": inf.num_hvps,
            "status": str(inf.status),
            "iterations": inf.iterations,
            "relative_residual": inf.relative_residual,
            **({"alpha": inf.stats["alpha"]} if "alpha" in inf.stats else {}),
        }
        return h, d

    return Case(
        key,
        lambda s: hg.implicit(pb.f, pb.g, pb.theta_star, pb.phi, make(s)),
        info,
        meta={"x": x, **meta},
    )


def implicit_part(pb: Quadratic, budgets: Sequence[int], repeats: int) -> tuple[list, dict]:
    lmin, lmax, rmed = float(pb.evals[0]), float(pb.evals[-1]), float(pb.evals.median())
    extra = {"lambda_min": lmin, "lambda_max": lmax, "rho_median": rmed, "rho_low": lmin / 100}
    log(f"  [{pb.name}] Identity, Exact")
    res = run(
        [
            implicit_case(pb, "Identity(1/L)", 0, lambda s: hg.Identity(scale=1.0 / lmax)),
            implicit_case(pb, "Exact()", pb.d, lambda s: hg.Exact()),
        ],
        repeats,
        pb.h_star,
    )
    for k in [k for k in budgets if k <= 5 * pb.d]:
        log(f"  [{pb.name}] k = {k}")
        group = [
            implicit_case(pb, "CG", k, lambda s, k=k: hg.CG(maxiter=k, tol=0.0), k=k),
            implicit_case(
                pb, "Neumann auto", k + POWER_ITERS, lambda s, k=k: hg.Neumann(k, alpha="auto"), k=k
            ),
        ]
        if k <= min(pb.d, NYSTROM_MAX_RANK):
            for sketch in ("column", "gaussian"):
                for tag, rho in (("median", rmed), ("lmin/100", lmin / 100)):

                    def make(s: int, k: int = k, rho: float = rho, sk: str = sketch) -> hg.Solver:
                        return hg.Nystrom(rank=k, rho=rho, sketch=sk, seed=s)

                    group.append(implicit_case(pb, f"Nystrom {sketch}, rho={tag}", k, make, k=k))
        if k >= 2:
            r, it = k // 2, k - k // 2
            group.append(
                implicit_case(
                    pb,
                    "NystromPCG",
                    k,
                    lambda s, r=r, it=it: hg.NystromPCG(rank=r, maxiter=it, tol=0.0, seed=s),
                    k=k,
                )
            )
        res += run(group, repeats, pb.h_star)
    return res, extra


def batched_vs_sequential(pb: Quadratic, r: int, repeats: int) -> dict[str, Any]:
    """Time of r products: batched (``matmat``, vmapped backward) vs r ``matvec`` calls."""
    op = hg.HessianOperator(pb.f, pb.theta_star, pb.phi)
    V = torch.randn(r, pb.d, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = interleave(
        [
            Case("b", lambda s: op.matmat(V)),
            Case("s", lambda s: torch.stack([op.matvec(v) for v in V])),
        ],
        repeats,
    )
    diff = float((t[0].warm - t[1].warm).abs().max() / t[1].warm.abs().max())
    op.release()
    return {
        "r": r,
        "batched_ms": t[0].ms,
        "sequential_ms": t[1].ms,
        "ratio": t[0].ms / t[1].ms,
        "max_rel_diff": diff,
    }


def trajectory_part(pb: Quadratic, horizons: Sequence[int], repeats: int) -> tuple[list, dict]:
    eta = 1.0 / float(pb.evals[-1])
    opt, theta0, res, checks = hg.optim.sgd(lr=eta), torch.zeros(pb.d, dtype=F64), [], {"eta": eta}
    for T in horizons:
        ref, theta_T = pb.unrolled_reference(T, eta, theta0)
        gap = relative_error(ref, pb.h_star)
        log(f"  [{pb.name}] T = {T}")

        def case(
            key: str, x: float, fn: Callable, T=T, theta_T=theta_T, gap=gap, **kw: Any
        ) -> Case:
            def info() -> tuple:
                h, inf = fn(pb.f, pb.g, theta0, pb.phi, T, opt, return_info=True, **kw)
                return h, {
                    "reverse_steps": inf.reverse_steps,
                    "stored_states": inf.stored_states,
                    "theta_T_rel_err": relative_error(inf.params, theta_T),
                }

            meta = {
                "x": x,
                "T": T,
                "T_step_vs_implicit": gap,
                **({"K": kw["truncate"]} if kw else {}),
            }
            return Case(
                key, lambda s: fn(pb.f, pb.g, theta0, pb.phi, T, opt, **kw), info, meta=meta
            )

        group = [
            case("unrolled", T, hg.unrolled),
            case("forward_mode", T, hg.forward_mode),
            case("drmad", T, hg.drmad),
        ]
        if T == max(horizons):
            group += [
                case(f"truncated (T={T})", K, hg.unrolled, truncate=K) for K in TRUNCATIONS if K < T
            ]
        for r in run(group, repeats, ref):
            r["x"] = r["meta"].get("K", T)
            res.append(r)
        checks[f"T={T}: hg.unrolled vs closed form"] = relative_error(
            hg.unrolled(pb.f, pb.g, theta0, pb.phi, T, opt), ref
        )
    return res, checks


def _implicit_tables(res: list[dict], budgets: list[int]) -> list[str]:
    keys = list(dict.fromkeys(r["key"] for r in res if "k" in r["meta"]))
    by = {(r["key"], r["meta"].get("k")): r for r in res}
    ks = [k for k in budgets if any((key, k) in by for key in keys)]
    lines = []
    for title, fmt in (
        ("relative error ||h - h*|| / ||h*||", lambda r: sci(r["rel_err"])),
        ("cosine(h, h*)", lambda r: rp.fix(r["cos"], 6)),
        ("median wall ms per hg.implicit call", lambda r: ms(r["ms"])),
        ("products reported (info.num_hvps)", lambda r: str(r["diagnostics"].get("num_hvps", ""))),
    ):
        cells = [
            [key]
            + [
                ""
                if (key, k) not in by
                else "error"
                if by[(key, k)]["error"]
                else fmt(by[(key, k)])
                for k in ks
            ]
            for key in keys
        ]
        lines += [
            "",
            f"{title}, by budget k:",
            "",
            table(["solver"] + [f"k={k}:" for k in ks], cells),
        ]
    return lines


def markdown(name: str, e: dict[str, Any], budgets: list[int]) -> str:
    ex, bvs, tc = e["implicit_extra"], e["batched_vs_sequential"], e["trajectory_checks"]
    lines = [
        f"## {name}: d = {e['d']}, p = {e['p']}, cond(A) = {e['cond']:g}",
        "",
        rp.bullets(
            [
                f"A: eigenvalues in [{ex['lambda_min']:.3g}, {ex['lambda_max']:.3g}]; ||h*|| = "
                f"{e['h_star_norm']:.4g}; "
                f"||direct term|| / ||h*|| = {e['direct_ratio']:.3g}; ||theta*|| = "
                f"{e['theta_star_norm']:.4g}",
                f"checks: {'; '.join(f'{k} = {v:.2e}' for k, v in e['checks'].items())}",
                f"Nystrom rho: median eigenvalue = {ex['rho_median']:.3g}, lambda_min / 100 = "
                f"{ex['rho_low']:.3g}; "
                f"Neumann auto spends k + {POWER_ITERS} products",
            ]
            + [
                f"{r['key']}: {r['diagnostics'].get('num_hvps', '')} products, rel. err "
                f"{sci(r['rel_err'])}, cos "
                f"{rp.fix(r['cos'], 6)}, {ms(r['ms'])} ms"
                for r in e["implicit_results"]
                if "k" not in r["meta"]
            ]
            + [
                f"{bvs['r']} Hessian-vector products: batched (HessianOperator.matmat, used by "
                "Nystrom and Exact) "
                f"{ms(bvs['batched_ms'])} ms, sequential matvec {ms(bvs['sequential_ms'])} ms "
                "(ratio "
                f"{bvs['ratio']:.2f}; results agree to {bvs['max_rel_diff']:.1e})"
            ]
        ),
        "",
        "### Implicit solvers at theta*",
    ]
    lines += _implicit_tables(e["implicit_results"], budgets)
    notes = sorted(
        {
            f"{r['key']} k={r['meta'].get('k')}: status {r['diagnostics'].get('status')}"
            for r in e["implicit_results"]
            if r["diagnostics"].get("status") in ("negative_curvature", "diverged")
        }
        | {
            f"{r['key']} k={r['meta'].get('k')}: {r['error']}"
            for r in e["implicit_results"]
            if r["error"]
        }
    )
    if notes:
        lines += ["", "Solver statuses and errors:", "", rp.bullets(notes)]
    rows = [
        [
            r["key"],
            r["meta"]["T"],
            f"— ({r['meta']['T']} x {e['p']} tangents)"
            if r["key"] == "forward_mode"
            else r["diagnostics"].get("reverse_steps", ""),
            f"{r['meta']['T_step_vs_implicit']:.3g}",
            "error" if r["error"] else sci(r["rel_err"]),
            rp.fix(r["cos"], 6),
            ms(r["ms"]),
            ms(r["cpu_ms"]),
        ]
        for r in e["trajectory_results"]
    ]
    lines += [
        "",
        f"### Trajectory methods: T steps of SGD (lr = {tc['eta']:.3g}) from theta_0 = 0",
        "",
        "Reference: the closed-form hypergradient of the unrolled loop of the same T. "
        + "; ".join(f"{k} = {v:.2e}" for k, v in tc.items() if k != "eta"),
        "",
        table(
            [
                "method",
                "T:",
                "reverse steps:",
                "||h_T - h*|| / ||h*||:",
                "rel. err:",
                "cos:",
                "ms:",
                "CPU ms:",
            ],
            rows,
        ),
    ]
    return "\n".join(lines)


STYLES = {
    "CG": "C0o-",
    "Neumann auto": "C1s-",
    "Nystrom column, rho=median": "C2^-",
    "Nystrom column, rho=lmin/100": "C2v--",
    "Nystrom gaussian, rho=median": "C3^-",
    "Nystrom gaussian, rho=lmin/100": "C3v--",
    "NystromPCG": "C4D-",
    "Exact()": "k*",
    "unrolled": "C0o-",
    "forward_mode": "C1s-",
    "drmad": "C3D-",
}


def plot(data: dict[str, Any], out: Any) -> Any:
    plt, paths = rp.pyplot(), []
    for which, title in (
        ("implicit", "Implicit solvers at theta*: relative error vs products and vs time"),
        ("trajectory", "Trajectory methods (SGD from theta_0 = 0): relative error vs steps/time"),
    ):
        names = list(data["problems"])
        fig, axes = plt.subplots(len(names), 2, figsize=(13, 3.9 * len(names)), squeeze=False)
        for row, name in enumerate(names):
            res = [r for r in data["problems"][name][f"{which}_results"] if not r["error"]]
            for col, xkey in enumerate(("x", "ms")):
                ax = axes[row][col]
                for key in dict.fromkeys(r["key"] for r in res):
                    pts = sorted((r for r in res if r["key"] == key), key=lambda r: r["x"])
                    ys = [max(r["rel_err"] or 1e-17, 1e-17) for r in pts]
                    if key == "Identity(1/L)" and xkey == "x":
                        ax.axhline(ys[0], color="C7", ls=":", label=f"{key} (0 products)")
                    else:
                        ax.plot(
                            [r[xkey] for r in pts],
                            ys,
                            STYLES.get(key, "C5x" if key != "Identity(1/L)" else "C7x"),
                            ms=4,
                            label=key,
                        )
                what = (
                    "products (num_hvps)"
                    if which == "implicit"
                    else "steps differentiated (truncated: K; others: T)"
                )
                ax.set(
                    xscale="log",
                    yscale="log",
                    ylabel="relative error",
                    title=f"{name}: error vs {'cost' if col == 0 else 'time'}",
                    xlabel=what if col == 0 else "wall ms per call",
                )
                ax.grid(True, which="both", alpha=0.3)
            axes[row][1].legend(fontsize=7)
        fig.suptitle(title)
        paths.append(rp.save_figure(fig, out / f"quadratic_bilevel_{which}.png"))
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


def main(argv: Sequence[str] | None = None) -> int:
    p = H.cli(__doc__)
    p.add_argument("--repeats", type=int, help="timed calls per method (default 3, quick 1)")
    args = p.parse_args(argv)
    if H.replot(args, NAME, TITLE, render, plot):
        return 0
    H.start(args)
    q, rep = args.quick, H.Report(NAME, TITLE, args)
    specs = ((20, 10.0),) if q else ((100, 10.0), (100, 1e4), (1000, 1e2), (1000, 1e4))
    budgets = [1, 2] if q else [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    horizons, repeats = ((3,), args.repeats or 1) if q else ((10, 30, 100), args.repeats or 3)
    out: dict[str, Any] = {}
    for d, cond in specs:
        pb = problems.quadratic(d, cond, args.seed)
        log(f"[{pb.name}] reference and checks ...")
        grad_f = torch.func.grad(pb.f)(pb.theta_star, pb.phi)
        exact = hg.implicit(pb.f, pb.g, pb.theta_star, pb.phi, hg.Exact())
        e = {"d": d, "p": pb.p, "cond": cond, "h_star_norm": float(pb.h_star.norm())}
        e |= {"direct_ratio": float(pb.direct.norm() / pb.h_star.norm())}
        e |= {"theta_star_norm": float(pb.theta_star.norm())}
        e["checks"] = {"hg.Exact vs closed form": relative_error(exact, pb.h_star)}
        e["checks"] |= {"||grad_theta f(theta*)||": float(grad_f.norm())}
        e["checks"] |= {"cond(A) measured": float(pb.evals[-1] / pb.evals[0])}
        e["implicit_results"], e["implicit_extra"] = implicit_part(pb, budgets, repeats)
        e["batched_vs_sequential"] = batched_vs_sequential(pb, min(pb.d, 100), max(repeats, 5))
        e["trajectory_results"], e["trajectory_checks"] = trajectory_part(pb, horizons, repeats)
        out[pb.name] = e
    settings = {"budgets": budgets, "horizons": list(horizons), "repeats": repeats, "p": 10}
    settings |= {"mu": 0.1, "L_cross": 1.0, "nystrom_max_rank": NYSTROM_MAX_RANK}
    rep.write(
        {"settings": settings | {"truncations": list(TRUNCATIONS)}, "problems": out}, render, plot
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
