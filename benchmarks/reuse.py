"""Reuse across hyper-steps: products and seconds to a 1e-2 hypergradient, hyper-step by step.

30 hyper-steps of per-weight decay on the digits MLP (tanh 64-16-10, 1,210 weights and as many
log decays): each moves the decays by Adam along the exact hypergradient and retrains the weights
by ``--inner`` (10) L-BFGS iterations from the previous ones (a HyperOptimizer's window), so
consecutive hyper-steps solve nearly the same system. Reference: a dense float64 solve (damped by
``1e-3 lambda_max - lambda_min`` where the Hessian is not positive definite). Per strategy, a
bisection on the dense matrix (state restored between trials) finds the smallest CG budget within
``--target`` (relative error); the real call with that budget (autograd products) is then timed
in interleaved rounds and advances the strategy's state. Strategies: cold ``CG`` (as TorchOpt and
Betty), warm ``CG`` (``Implicit(warm_start=True)``), warm ``NystromPCG(refresh_every="auto")``,
warm ``RecycledCG`` (Ritz pairs of past solves as preconditioner); TorchOpt's cold ``solve_cg``
through ``custom_root`` at the cold CG budget, when importable (its products counted: it also
computes ``A x0`` for ``x0 = 0``). ``--replays`` (4): warm RecycledCG again on the dense
systems with every ``b`` perturbed by 1e-12, products only: its total moves by up to 20%
from such a change, so the table reports the spread, not one draw.

``--size 100k``: tanh MLP 784-110-110-10 on MNIST (99,670 float32 weights and decays, 256 train
and 256 validation rows); reference: float64 NystromPCG to relative residual 1e-7; the bisection
runs on real products; 30 hyper-steps, as on digits.
"""

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

import harness as H
import hypergradient as hg
from vs_torchopt import Counted, torchopt, torchopt_implicit

F64, NAME, TITLE = torch.float64, "reuse", "Reuse across hyper-steps: products and seconds to 1e-2"


def reference(pb: H.Bilevel, big: bool) -> dict[str, Any]:
    """The system the bisection runs on (``op``), its damping (``1e-3 lambda_max - lambda_min``
    where the Hessian is not positive definite), ``b = grad_theta g`` and the exact solution
    ``x`` in float64: digits, a dense solve; 100k, Lanczos extremes, then a NystromPCG solve to
    relative residual 1e-7 (``op``: the float32 products of the real call)."""
    p64 = pb.cast(F64)
    ps = tuple(p.detach().requires_grad_(True) for p in p64.params)
    b = H.flat(torch.autograd.grad(p64.outer_loss(ps, p64.hparams), ps))
    if big:
        A = hg.HessianOperator(p64.inner_loss, p64.params, p64.hparams)
        ext = hg.solvers.lanczos_extremes(A, 100, torch.Generator().manual_seed(0))
        lo, hi = float(ext.lambda_min), float(ext.lambda_max)
    else:
        A = H.dense_hessian(pb)
        ev = torch.linalg.eigvalsh(A)
        lo, hi = float(ev[0]), float(ev[-1])
    d = 1e-3 * hi - lo if lo <= 1e-8 * hi else 0.0
    system = lambda A: hg.DampedOperator(A, d) if d else A  # noqa: E731 - as hg.Implicit builds it
    if big:
        x = hg.NystromPCG(rank=100, maxiter=5000, tol=1e-7, seed=0).solve(system(A), b).value
        op = system(hg.HessianOperator(pb.inner_loss, pb.params, pb.hparams))
    else:
        x = torch.linalg.solve(A + d * torch.eye(len(A), dtype=F64), b)
        op = system(hg.MatrixOperator(A))
    return {"op": op, "b": b.to(op.dtype), "x": x, "damping": d, "lambda": (lo, hi)}


def budget(
    solver: Any, x0: Any, ref: dict, err: Callable[[torch.Tensor], float], target: float, cap: int
) -> tuple[int, int, float]:
    """Smallest budget of ``solver`` from ``x0`` reaching ``target`` on ``ref["op"]`` (its state
    restored after each trial): (budget, products, error)."""
    op = ref["op"]

    def trial(k: int) -> tuple[int, float]:
        snap = solver.snapshot()
        solver.maxiter = k
        sol = solver.solve(op, ref["b"], None if x0 is None else x0.to(op.dtype))
        solver.restore(snap)
        return sol.num_hvps, err(sol.value)

    lo, hi = 0, 1
    while trial(hi)[1] > target and hi < cap:
        lo, hi = hi, min(2 * hi, cap)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if trial(mid)[1] <= target else (mid, hi)
    return (hi, *trial(hi))


def hyper_steps(args: Any, dense: list) -> list[dict[str, Any]]:
    """The hyper-steps' rows; on digits each step's dense system is appended to ``dense``."""
    if args.size == "digits":
        pb = H.digits_mlp(args.seed, args.hidden, args.lbfgs, rounds=1, require_pd=False)
    else:  # float32, then per-weight decays
        pb = H.mnist_mlp(train_iters=args.lbfgs, seed=args.seed)
        g, lo, hi = torch.Generator().manual_seed(args.seed), math.log(1e-3), math.log(1e-2)
        hp = tuple(lo + (hi - lo) * torch.rand(t.shape, generator=g, dtype=F64) for t in pb.params)
        pb = replace(pb, hparams=tuple(h.to(pb.params[0].dtype) for h in hp))
    theta, raw = H.flat(pb.params), H.flat(pb.hparams).clone().requires_grad_(True)
    adam, cg = torch.optim.Adam([raw], lr=args.outer_lr), lambda: hg.CG(tol=0.0)  # noqa: E731
    pcg = hg.NystromPCG(rank=args.rank, tol=0.0, seed=0, refresh_every="auto")
    rcg = hg.RecycledCG(args.recycle, args.smallest, tol=0.0, harvest=args.harvest)
    methods = {"cold CG": hg.Implicit(cg()), "warm CG": hg.Implicit(cg(), warm_start=True)}
    methods["warm NystromPCG(auto refresh)"] = hg.Implicit(pcg, warm_start=True)
    methods["warm RecycledCG"] = hg.Implicit(rcg, warm_start=True)
    to, rows = torchopt(), []
    for step in range(args.steps):
        hp = H.unflat(raw.detach(), pb.hparams)
        if step:
            f = lambda t, hp=hp: pb.inner_loss(H.unflat(t, pb.params), hp)  # noqa: E731
            theta = H.lbfgs(f, theta, args.inner)
        cur = replace(pb, params=H.unflat(theta, pb.params), hparams=hp)
        ref = reference(cur, args.size == "100k")
        w = (H.flat(cur.hparams).exp() * H.flat(cur.params)).to(F64)  # h = -exp(h) theta x
        exact = -w * ref["x"]
        err = lambda x, w=w, e=exact: H.relative_error(-w * x.to(F64), e)  # noqa: E731
        row: dict[str, Any] = {"step": step, "damping": ref["damping"], "lambda": ref["lambda"]}
        row["val_loss"] = float(cur.outer_loss(cur.params, cur.hparams))
        if args.size == "digits":
            dense.append((ref, err))
        problem = hg.Problem(cur.inner_loss, cur.outer_loss, cur.params, cur.hparams)
        cases = []
        for name, m in methods.items():
            m.damping = ref["damping"]
            k, hvps, e = budget(m.solver, m.state_dict().get("x"), ref, err, args.target, args.cap)
            m.solver.maxiter = k
            row[name] = {"budget": k, "hvps": hvps, "dense_error": e}
            cases.append(H.Case(name, lambda s, m=m, pr=problem: H.flat(m(pr)[0])))
        if to is not None:
            k, ridge = row["cold CG"]["budget"], ref["damping"] or None
            solve = Counted(to.linear_solve.solve_cg(maxiter=k, rtol=0.0, atol=0.0, ridge=ridge))
            cases.append(H.Case("TorchOpt solve_cg", torchopt_implicit(cur, solve)))
            row["TorchOpt solve_cg"] = {"budget": k}
        states = {n: m.state_dict() for n, m in methods.items()}

        def rewind(states: dict = states) -> None:  # each round starts from the same state
            for n, m in methods.items():
                m.load_state_dict(states[n])

        for c in cases:
            c.prepare = rewind
        for t in H.interleave(cases, args.rounds, keep=lambda h: h):
            e = H.relative_error(t.kept[-1].to(F64), exact) if t.kept else None
            row[t.key] |= {"ms": t.ms, "error": e, "failed": t.error}
        if to is not None:  # counted: its CG also computes A x0 for x0 = 0
            row["TorchOpt solve_cg"]["hvps"] = solve.last
        rewind()
        for m in methods.values():  # the state after this hyper-step: one call from it
            m(problem)
        raw.grad = exact.reshape(raw.shape).to(raw.dtype)
        del ref  # the 100k Hessian operators hold graphs (digits: kept in ``dense``)
        adam.step()
        H.log(f"hyper-step {step}: " + ", ".join(f"{n} {row[n]['hvps']}" for n in methods))
        rows.append(row)
    return rows


def replays(dense: list, args: Any) -> list[dict[str, Any]]:
    """Warm RecycledCG on the dense sequence again, every ``b`` times ``1 + 1e-12 N(0, 1)``
    (replay ``k`` seeded ``k``): the budgets (bisection as above) and their products. The
    recycled space makes the sequence chaotic: one run is one draw of its total."""
    out = []
    for k in range(1, args.replays + 1):
        g, x0, per = torch.Generator().manual_seed(k), None, []
        solver = hg.RecycledCG(args.recycle, args.smallest, tol=0.0, harvest=args.harvest)
        for ref, err in dense:
            b = ref["b"] * (1 + 1e-12 * torch.randn(ref["b"].shape, generator=g, dtype=F64))
            solver.maxiter = budget(solver, x0, ref | {"b": b}, err, args.target, args.cap)[0]
            sol = solver.solve(ref["op"], b, x0)
            x0 = sol.value
            per.append(sol.num_hvps)
        out.append({"replay": k, "hvps": sum(per), "per_step": per})
    return out


def baseline(rows: Sequence[dict[str, Any]]) -> str:
    """TorchOpt's cold ``solve_cg`` when it ran, else hg's cold CG."""
    return "TorchOpt solve_cg" if rows[0].get("TorchOpt solve_cg") else "cold CG"


def summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    base = baseline(rows)
    bh, bms = sum(r[base]["hvps"] for r in rows), sum(r[base].get("ms") or 0 for r in rows)
    out = []
    for n in strategies(rows):
        hv, total_ms = [r[n]["hvps"] for r in rows], sum(r[n].get("ms") or 0.0 for r in rows)
        x = {"strategy": n, "hvps": sum(hv), "seconds": total_ms / 1e3}
        x["worst_error"] = max(r[n].get("error") or 0.0 for r in rows)
        x |= {"fewer_products": bh / max(sum(hv), 1), "less_time": bms / max(total_ms, 1e-9)}
        out.append(x | {"hvps_last10": H.median(hv[-10:])})
    return out


def strategies(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [n for n in rows[0] if isinstance(rows[0][n], dict)]


def render(d: dict[str, Any]) -> list[str]:
    s, rows = d["settings"], d["rows"]
    notes = [
        f"{s['steps']} hyper-steps, target relative error {s['target']:g}, CG cap {s['cap']}, "
        f"Nystrom rank {s['rank']}, RecycledCG rank {s.get('recycle')} + smallest "
        f"{s.get('smallest')} (harvest {s.get('harvest')}), outer Adam lr {s['outer_lr']}, "
        f"{s['inner']} L-BFGS iterations per hyper-step, {s['rounds']} timed round(s) per "
        f"hyper-step; load average at the start {d['machine']['load_average']}",
        "fewer_products, less_time: the baseline's totals (TorchOpt's cold solve_cg if "
        "importable, else hg's cold CG) over the strategy's; products (counted) include sketches, "
        "warm-start residuals and TorchOpt's A x0; worst_error: largest error of the timed "
        "real-product call",
        "validation loss (the outer loop follows the exact hypergradient; every strategy is "
        f"within the target of it at every step): {rows[0].get('val_loss', 0):.4f} at step 0, "
        f"{rows[-1].get('val_loss', 0):.4f} at the last step",
    ]
    cols = "strategy|hvps:d|hvps_last10:.0f|seconds:.3f|fewer_products:.2f|less_time:.2f"
    cols += "|worst_error:.2e"
    names = strategies(rows)
    per = [r | {n: r[n]["hvps"] for n in names} for r in rows]  # step, damping, products
    ms = [r | {n: r[n].get("ms") for n in names} for r in rows]
    per_cols, ms_cols = ("step:d|" + "|".join(f"{n}:{f}" for n in names) for f in ("d", ".1f"))
    return [
        H.bullets(notes + [f"problem: {d['problem']}"]),
        "## Totals over the hyper-steps\n\n" + H.dict_table(d["summary"], cols),
        *render_replays(d),
        "## Products per hyper-step\n\n" + H.dict_table(per, per_cols + "|damping:.2e"),
        "## Milliseconds per hyper-step (median of the interleaved rounds)\n\n"
        + H.dict_table(ms, ms_cols),
    ]


def render_replays(d: dict[str, Any]) -> list[str]:
    """The replays' totals against the baseline's (none: no section)."""
    reps = d.get("replays") or []
    if not reps:
        return []
    name = baseline(d["rows"])
    base = next(s for s in d["summary"] if s["strategy"] == name)
    rows = [r | {"fewer_products": base["hvps"] / max(r["hvps"], 1)} for r in reps]
    mean = sum(r["hvps"] for r in reps) / len(reps)
    text = (
        f"warm RecycledCG on the same dense systems, each b times 1 + 1e-12 N(0, 1) (replay k "
        f"seeded k), products only: mean {mean:.1f}, {base['hvps'] / mean:.2f}x fewer than "
        f"{base['strategy']}'s {base['hvps']}; one run of a recycled sequence is one draw "
        "(the space's rounding changes which pairs are kept)"
    )
    table = H.dict_table(rows, "replay:d|hvps:d|fewer_products:.2f")
    return ["## RecycledCG over perturbed replays\n\n" + H.bullets([text]) + "\n\n" + table]


YLABELS = {"hvps": "products to the target", "ms": "ms per hypergradient"}


def plot(d: dict[str, Any], out: Any) -> Any:
    """Products and milliseconds per hyper-step, one line per strategy."""
    rows, names, big = d["rows"], strategies(d["rows"]), d["settings"].get("size") == "100k"
    fmt = {n: "k--" if n.startswith("TorchOpt") else "-" for n in names}
    line = lambda k: {n: [(r["step"], r[n].get(k) or math.nan) for r in rows] for n in names}  # noqa: E731
    axes = {"xlabel": "hyper-step", "yscale": "log"}
    panels = [
        {"lines": line(k), "fmt": fmt, "set": axes | {"ylabel": y}} for k, y in YLABELS.items()
    ]
    return H.figure(out / f"{NAME}{'_100k' * big}.png", panels, 2, (5.5, 3.8))


OPTIONS = [  # quick, full defaults; None: the MLP's (digits, 100k) in DEFAULTS
    H.option("--steps", 3, 30, type=int, help="hyper-steps"),
    H.option("--hidden", 4, 16, type=int, help="hidden units"),
    H.option("--lbfgs", 50, None, type=int, help="initial L-BFGS iterations (200; 100k: 300)"),
    H.option("--inner", type=int, default=10, help="L-BFGS iterations per hyper-step"),
    H.option("--rounds", 1, 3, type=int, help="timed rounds per hyper-step"),
    H.option("--rank", 4, 40, type=int, help="Nystrom rank"),
    H.option("--target", type=float, default=1e-2, help="relative error (default 1e-2)"),
    H.option("--cap", type=int, default=4000, help="largest CG budget tried"),
    H.option("--outer-lr", type=float, default=0.05, help="Adam lr on the log decays"),
    H.option("--size", choices=("digits", "100k"), default="digits", help="the MLP"),
    H.option("--recycle", 8, None, type=int, help="RecycledCG rank (200; 100k: 16)"),
    H.option("--smallest", 2, None, type=int, help="RecycledCG smallest (20; 100k: 4)"),
    H.option("--harvest", 32, None, type=int, help="RecycledCG harvest (64; 100k: 8)"),
    H.option("--replays", 1, 4, type=int, help="perturbed replays of RecycledCG (digits)"),
]
DEFAULTS = {"lbfgs": (200, 300), "recycle": (200, 16), "smallest": (20, 4), "harvest": (64, 8)}
SETTINGS = ("steps", "target", "cap", "rank", "outer_lr", "rounds", "inner", "lbfgs", "size")
SETTINGS += ("recycle", "smallest", "harvest", "replays")


def run(args: Any, rep: H.Report) -> dict[str, Any]:
    big = args.size == "100k"
    H.defaults(args, **{k: (v[big], v[big]) for k, v in DEFAULTS.items()})  # the MLP's
    pb = f"tanh MLP 64-{args.hidden}-10 on digits, one log decay per parameter"
    if big:
        pb = "tanh MLP 784-110-110-10 on MNIST (99,670 float32 weights), a decay each"
    settings, dense = {k: getattr(args, k) for k in SETTINGS}, []
    rows = hyper_steps(args, dense)
    out = {"settings": settings, "problem": pb, "rows": rows, "summary": summary(rows)}
    return out | ({"replays": replays(dense, args)} if dense else {})


def main(argv: Sequence[str] | None = None) -> int:
    """``reuse`` or, with ``--size 100k``, ``reuse_100k``; returns 0."""
    size = argparse.ArgumentParser(add_help=False)
    size.add_argument("--size")
    big = size.parse_known_args(argv)[0].size == "100k"
    name, title = NAME + "_100k" * big, TITLE + ", 100k MLP" * big
    H.bench_main(__doc__, name, title, run, render, plot=plot, options=OPTIONS, argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
