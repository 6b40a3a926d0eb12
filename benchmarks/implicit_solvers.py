"""Accuracy and cost of the implicit-hypergradient solvers, against an exact reference.

Ridge (closed form), logistic regression and a digits MLP (dense float64 solves) at budgets of
k Hessian-vector products, side by side with hypergrad 0.0.1 when it is installed. What each
solver is given and how the references and times are computed: benchmarks/README.md.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

import hypergradient as hg
from harness import Case, Report, cli, interleave, log, median, ms, problems, runner, sci, start
from harness import report as rp
from harness.problems import F64, Bilevel, cosine, flat, relative_error


def reference(pb: Bilevel) -> dict[str, Any]:
    """``h*`` (closed form or ``hg.Exact()``), checked against plain torch; the spectrum."""
    t0 = time.perf_counter()
    h, info = hg.implicit(*_args(pb), solver=hg.Exact(chunk_size=64), return_info=True)
    exact_ms, h = 1e3 * (time.perf_counter() - t0), flat(h)
    H = problems.dense_hessian(pb)
    dense, evals = problems.dense_hypergradient(pb, H), torch.linalg.eigvalsh(H)
    checks = {
        "hg.Exact vs torch dense (rel. diff)": relative_error(h, dense),
        "hg.Exact inner_grad_norm": info.inner_grad_norm,
        "hg.Exact relative_residual": float(info.relative_residual or 0.0),
    }
    if pb.closed_form is not None:
        checks["hg.Exact vs closed form (rel. diff)"] = relative_error(h, pb.closed_form)
        checks["torch dense vs closed form (rel. diff)"] = relative_error(dense, pb.closed_form)
        h = pb.closed_form
    lam = [float(evals[0]), float(evals.median()), float(evals[-1])]
    return {
        "h": h,
        "lambda_min": lam[0],
        "lambda_median": lam[1],
        "lambda_max": lam[2],
        "reference_norm": float(h.norm()),
        "reference_checks": checks,
        "exact_ms": exact_ms,
    }


def _args(pb: Bilevel) -> tuple:
    return pb.inner_loss, pb.outer_loss, pb.params, pb.hparams


def ours(pb: Bilevel, key: str, make: Callable[[int], hg.Solver]) -> Case:
    def info() -> tuple:
        h, inf = hg.implicit(*_args(pb), solver=make(10_000), return_info=True)
        return flat(h), inf.num_hvps, str(inf.status)

    return Case(
        key,
        lambda s: flat(hg.implicit(*_args(pb), solver=make(s))),
        info,
        meta={"impl": "hypergradient"},
    )


def theirs(pb: Bilevel, key: str, fn: Callable, k: int, arg: float, seeded: bool) -> Case:
    def call(s: int) -> torch.Tensor:
        if seeded:  # hypergrad's nystrom samples with the global generator
            torch.manual_seed(s)
        return flat([t.detach() for t in fn(*_args(pb), k, arg)])

    return Case(key, call, lambda: (call(10_000), k, ""), meta={"impl": "hypergrad"})


def gradient(pb: Bilevel) -> Case:
    ps = tuple(p.detach().clone().requires_grad_(True) for p in pb.params)
    call = lambda s: torch.autograd.grad(pb.inner_loss(ps, pb.hparams), ps)[0]  # noqa: E731
    return Case(
        "gradient of f",
        call,
        lambda: (None, None, ""),
        inner=runner.calls_per_sample(lambda: call(0)),
        meta={"impl": "autograd"},
    )


def measure(cases: list[Case], repeats: int, h_ref: torch.Tensor) -> list[dict[str, Any]]:
    """Interleaved timing; per case the measurement dict of the JSON (errors per seed)."""
    out = []
    for t in interleave(cases, repeats, keep=lambda h: h if h.numel() > 1 else None):
        rel = [relative_error(h, h_ref) for h in t.kept if h is not None]
        cos = [cosine(h, h_ref) for h in t.kept if h is not None]
        warm = t.warm or (None, None, "")
        out.append(
            {
                "key": t.key,
                "impl": t.meta["impl"],
                "rel_err": median(rel) if rel else None,
                "cos": median(cos) if cos else None,
                "rel_err_all": rel,
                "num_hvps": warm[1],
                "status": warm[2],
                "ms": t.ms,
                "ms_all": t.ms_all,
                "cpu_ms": t.cpu_ms,
                "cpu_ms_all": t.cpu_ms_all,
                "warnings": t.warnings,
                "warned_calls": t.warned_calls,
                "error": t.error,
            }
        )
    return out


def benchmark(pb: Bilevel, ref: dict, budgets: Sequence[int], repeats: int, hgrad: Any) -> dict:
    alpha, rhos, rows, costs = 1.0 / ref["lambda_max"], [0.1, ref["lambda_median"]], [], []

    def row(k: int, solver: str, o: Any, t: Any = None, label: str = "") -> None:
        rows.append(
            {"k": k, "solver": solver, "ours": o, "theirs_label": label or None, "theirs": t}
        )

    for k in budgets:
        log(f"  [{pb.name}] k = {k}")
        group = [ours(pb, "CG", lambda s, k=k: hg.CG(maxiter=k, tol=0))]
        if hgrad is not None:
            group += [
                theirs(pb, f"conjugate_gradient(lr={lr:g})", hgrad.conjugate_gradient, k, lr, False)
                for lr in (1.0, 0.1)
            ]
        cg, *th, grad = measure([*group, gradient(pb)], repeats, ref["h"])
        row(k, f"CG(maxiter={k}, tol=0)", cg, *(th[:1] + ["conjugate_gradient lr=1"] if th else []))
        if th:
            row(k, "〃", None, th[1], "conjugate_gradient lr=0.1")
        if cg["ms"] and grad["ms"]:
            costs.append(
                {
                    "k": k,
                    "cg_ms": cg["ms"],
                    "grad_ms": grad["ms"],
                    "ratio": cg["ms"] / grad["ms"],
                    "cg_cpu_ms": cg["cpu_ms"],
                    "grad_cpu_ms": grad["cpu_ms"],
                    "cpu_ratio": cg["cpu_ms"] / grad["cpu_ms"],
                    "floor": k + 3,
                    "num_hvps": cg["num_hvps"],
                }
            )
        (m,) = measure(
            [ours(pb, "Neumann auto", lambda s, k=k: hg.Neumann(k, "auto"))], repeats, ref["h"]
        )
        row(k, f'Neumann({k}, alpha="auto")', m)
        group = [ours(pb, "Neumann 1/L", lambda s, k=k: hg.Neumann(k, alpha=alpha))]
        if hgrad is not None:
            group.append(theirs(pb, "neumann", hgrad.neumann, k, alpha, False))
        o, *t = measure(group, repeats, ref["h"])
        row(
            k,
            f"Neumann({k}, alpha=1/L={alpha:.3g})",
            o,
            *(t + [f"neumann lr={alpha:.3g}"] if t else []),
        )
        for rho in rhos:
            nys = lambda s, k=k, rho=rho: hg.Nystrom(rank=k, rho=rho, sketch="column", seed=s)  # noqa: E731
            group = [ours(pb, "Nystrom col", nys)]
            if hgrad is not None:
                group.append(theirs(pb, "nystrom", hgrad.nystrom, k, rho, True))
            o, *t = measure(group, repeats, ref["h"])
            row(
                k,
                f"Nystrom(rank={k}, rho={rho:.3g}, column)",
                o,
                *(t + [f"nystrom rank={k} rho={rho:.3g}"] if t else []),
            )
        for rho in rhos:
            gauss = lambda s, k=k, rho=rho: hg.Nystrom(rank=k, rho=rho, sketch="gaussian", seed=s)  # noqa: E731
            (o,) = measure([ours(pb, "Nystrom gauss", gauss)], repeats, ref["h"])
            row(k, f"Nystrom(rank={k}, rho={rho:.3g}, gaussian)", o)
        r, it = k // 2, k - k // 2
        pcg = lambda s, r=r, it=it: hg.NystromPCG(r, maxiter=it, tol=0, seed=s)  # noqa: E731
        (o,) = measure([ours(pb, "NystromPCG", pcg)], repeats, ref["h"])
        row(k, f"NystromPCG(rank={r}, maxiter={it}, tol=0)", o)
    (o,) = measure([ours(pb, "Identity", lambda s: hg.Identity(scale=alpha))], repeats, ref["h"])
    rows.insert(
        0,
        {
            "k": 0,
            "solver": f"Identity(scale=1/L={alpha:.3g})",
            "ours": o,
            "theirs_label": None,
            "theirs": None,
        },
    )
    return {
        "alpha": alpha,
        "rhos": rhos,
        "grad_ms": grad["ms"],
        "rows": rows,
        "cg_cost_ratio": costs,
    }


def _cells(m: dict | None) -> list[str]:
    if m is None:
        return [""] * 5
    if m["error"]:
        return ["", "", "error", "", ""]
    flag = (
        f" (warned in {m['warned_calls']}/{len(m['ms_all'])} timed calls)"
        if m["warned_calls"]
        else ""
    )
    return [
        "" if m["num_hvps"] is None else str(m["num_hvps"]),
        m["status"] + flag,
        sci(m["rel_err"]),
        rp.fix(m["cos"], 6),
        ms(m["ms"]),
    ]


def markdown(name: str, pb: dict[str, Any]) -> str:
    s, checks = pb["setup"], "; ".join(f"{k} = {v:.2e}" for k, v in pb["reference_checks"].items())
    bullets = [
        f"{s['num_params']} parameters, {s['num_hparams']} hyperparameters, "
        f"{s['n_train']} train / {s['n_val']} validation examples",
        f"inner solve: {s['inner_solver']}; final inner gradient norm {s['inner_grad_norm']:.2e}",
        f"exact Hessian: lambda_min = {pb['lambda_min']:.4g}, median eigenvalue = "
        f"{pb['lambda_median']:.4g}, lambda_max = {pb['lambda_max']:.4g}, condition number "
        f"{pb['lambda_max'] / pb['lambda_min']:.3g}",
        f"reference h* = {'closed form' if name == 'ridge' else 'hg.Exact()'}, ||h*|| = "
        f"{pb['reference_norm']:.4g}; hg.Exact() took {pb['exact_ms']:.0f} ms; checks: " + checks,
        f"Neumann fixed alpha = 1/lambda_max = {pb['alpha']:.4g}; Nystrom rho in {{0.1, "
        f"median eigenvalue = {pb['rhos'][1]:.3g}}}; one gradient of f = "
        f"{ms(pb['grad_ms'])} ms",
    ]
    if "train_accuracy" in s:
        bullets.append(
            f"trained MLP: train accuracy {s['train_accuracy']:.3f}, validation accuracy "
            f"{s['val_accuracy']:.3f}"
        )
    lines = [f"### {name}: {pb['description']}", "", rp.bullets(bullets), ""]
    head = ["k:", "solver (hypergradient)", "hvps:", "status", "rel. err:", "cos:", "ms:"]
    theirs = any(r["theirs"] for r in pb["rows"])
    if theirs:
        head += [
            "hypergrad 0.0.1",
            "rel. err:",
            "cos:",
            "ms:",
            "theirs/ours wall:",
            "theirs/ours CPU:",
        ]
    rows, base = [], None
    for r in pb["rows"]:
        base = r["ours"] or base
        cells = [r["k"], r["solver"], *_cells(r["ours"])]
        if theirs:
            t = r["theirs"]
            label = (r["theirs_label"] or "") + (" (error, see below)" if t and t["error"] else "")
            c = _cells(t)[2:] if t else ["", "", ""]
            cells += [
                label,
                *c,
                rp.ratio(t and t["ms"], base["ms"]) if t else "",
                rp.ratio(t and t["cpu_ms"], base["cpu_ms"]) if t else "",
            ]
        rows.append(cells)
    lines += [
        rp.table(head, rows),
        "",
        "CG cost ratio (time of one hg.implicit call with "
        "CG(maxiter=k, tol=0) / time of one gradient of f):",
        "",
    ]
    lines.append(
        rp.table(
            [
                "k:",
                "hvps:",
                "CG ms:",
                "gradient ms:",
                "ratio (wall):",
                "ratio (CPU):",
                "floor k+3:",
            ],
            [
                [
                    c["k"],
                    c["num_hvps"],
                    ms(c["cg_ms"]),
                    ms(c["grad_ms"]),
                    f"{c['ratio']:.1f}",
                    rp.fix(c["cpu_ratio"], 1),
                    c["floor"],
                ]
                for c in pb["cg_cost_ratio"]
            ],
        )
    )
    ms_ = [(r["solver"], m) for r in pb["rows"] for m in (r["ours"], r["theirs"]) if m]
    warned = sorted({f"{s}: {w}" for s, m in ms_ for w in m["warnings"]})
    errors = sorted({f"{m['key']}: {m['error']}" for _, m in ms_ if m["error"]})
    if warned:
        lines += [
            "",
            "Warnings raised by the warm-up calls (status is the warm-up's):",
            "",
            rp.bullets(warned),
        ]
    if errors:
        lines += ["", "Errors:", "", rp.bullets(errors)]
    return "\n".join(lines)


def plot(data: dict[str, Any], out: Any) -> Any:
    """Relative error vs products and vs milliseconds, per problem; ours solid, seed dashed."""
    probs = data["problems"]
    fig, axes = rp.pyplot().subplots(2, len(probs), figsize=(5.2 * len(probs), 8), squeeze=False)
    for col, (name, pb) in enumerate(probs.items()):
        series: dict[tuple[str, str], list] = {}
        for r in pb["rows"]:
            for side in ("ours", "theirs"):
                m = r.get(side)
                if m and not m.get("error") and m.get("rel_err") is not None:
                    pt = (max(m.get("num_hvps") or r["k"], 1), m["ms"], max(m["rel_err"], 1e-17))
                    series.setdefault((side, m["key"]), []).append(pt)
        for (side, key), pts in sorted(series.items()):
            pts.sort()
            label = key if side == "ours" else f"hypergrad 0.0.1 {key}"
            for j in (0, 1):
                axes[j][col].plot(
                    [p[j] for p in pts],
                    [p[2] for p in pts],
                    "-o" if side == "ours" else "--x",
                    ms=3,
                    label=label,
                )
        axes[0][col].set(title=name, xlabel="Hessian-vector products", xscale="log")
        axes[1][col].set(xlabel="ms per hypergradient", xscale="log")
        for ax in axes[:, col]:
            ax.set(yscale="log", ylabel="relative error vs exact")
            ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="lower left")
    return rp.save_figure(fig, out / "implicit_solvers.png")


def main(argv: Sequence[str] | None = None) -> int:
    p = cli(__doc__)
    p.add_argument("--budgets", type=int, nargs="+", help="products per hypergradient")
    p.add_argument("--repeats", type=int, help="timed calls per solver (default 9, quick 2)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--problems", nargs="+", choices=("ridge", "logreg", "mlp"))
    p.add_argument("--no-hypergrad", action="store_true", help="skip the seed library")
    args = p.parse_args(argv)
    if rp.replot(args, "implicit_solvers", plot):
        return 0
    start(args)
    budgets = args.budgets or ([5] if args.quick else [5, 10, 20, 50, 100])
    repeats = args.repeats or (1 if args.quick else 9)
    hgrad, version = (
        (None, "skipped (--no-hypergrad)")
        if args.no_hypergrad
        else runner.import_peer("hypergrad.approx_hypergrad", "hypergrad")
    )
    rep = Report(
        "implicit_solvers",
        "Implicit hypergradient solvers: accuracy and cost",
        args,
        hypergrad=version if hgrad else None,
    )
    rep.note(
        f"solvers run in {args.dtype}, references in float64; budgets k = "
        f"{', '.join(map(str, budgets))}; median of {repeats} timed calls after one warm-up",
        f"hypergrad {version} (seed library) run side by side"
        if hgrad
        else f"hypergrad (seed library) not importable, skipped: {version}",
        "rel. err = ||h - h*|| / ||h*||, cos = cosine(h, h*); randomized solvers: median "
        "over seeds 0..repeats-1; hvps and status from return_info=True; ms = median wall "
        "time of one call; theirs/ours = ratio of median wall or CPU times, interleaved",
    )
    builders = {
        "ridge": lambda: problems.ridge(args.seed),
        "logreg": lambda: problems.logreg(args.seed),
        "mlp": lambda: (
            problems.digits_mlp(args.seed, 4, 100, (1e-2, 1e-1))
            if args.quick
            else problems.digits_mlp(args.seed, 32, 1000)
        ),
    }
    names = args.problems or (["ridge", "logreg"] if args.quick else list(builders))
    out: dict[str, Any] = {}
    for name in names:
        log(f"[{name}] inner problem and reference ...")
        pb = builders[name]()
        ref = reference(pb)
        res = benchmark(
            pb.cast(getattr(torch, args.dtype), F64 if args.dtype == "float64" else None),
            ref,
            budgets,
            repeats,
            hgrad,
        )
        ref.pop("h")
        out[name] = {"description": pb.description, "setup": pb.setup, **ref, **res}
        rep.section(markdown(name, out[name]))
    rep.write({"budgets": budgets, "repeats": repeats, "problems": out}, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
