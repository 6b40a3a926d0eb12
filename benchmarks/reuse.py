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
computes ``A x0`` for ``x0 = 0``).

``--size 100k``: tanh MLP 784-110-110-10 on MNIST (99,670 float32 weights and decays, 256 train
and 256 validation rows); reference: float64 NystromPCG to relative residual 1e-7; the bisection
runs on real products; 30 hyper-steps, as on digits.
"""

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


def make_methods(args: Any) -> dict[str, hg.Implicit]:
    pcg = hg.NystromPCG(rank=args.rank, tol=0.0, seed=0, refresh_every="auto")
    rcg = hg.RecycledCG(args.recycle, args.smallest, tol=0.0, harvest=args.harvest)
    return {
        "cold CG": hg.Implicit(hg.CG(tol=0.0)),
        "warm CG": hg.Implicit(hg.CG(tol=0.0), warm_start=True),
        "warm NystromPCG(auto refresh)": hg.Implicit(pcg, warm_start=True),
        "warm RecycledCG": hg.Implicit(rcg, warm_start=True),
    }


def damping(lo: float, hi: float) -> float:
    """``1e-3 lambda_max - lambda_min`` where the Hessian is not positive definite, else 0."""
    return 1e-3 * hi - lo if lo <= 1e-8 * hi else 0.0


def system(H: hg.LinearOperator, d: float) -> hg.LinearOperator:
    return hg.DampedOperator(H, d) if d else H  # as hg.Implicit(damping=d) builds it


def reference(pb: H.Bilevel, big: bool) -> dict[str, Any]:
    """The system the bisection runs on (``op``), its damping, ``b = grad_theta g`` and the
    exact solution ``x`` in float64: digits, a dense solve; 100k, Lanczos extremes, then a
    NystromPCG solve to relative residual 1e-7 (``op``: the float32 products of the real call)."""
    p64 = pb.cast(F64)
    ps = tuple(p.detach().requires_grad_(True) for p in p64.params)
    b = H.flat(torch.autograd.grad(p64.outer_loss(ps, p64.hparams), ps))
    if big:
        H64 = hg.HessianOperator(p64.inner_loss, p64.params, p64.hparams)
        ext = hg.solvers.lanczos_extremes(H64, 100, torch.Generator().manual_seed(0))
        lam = (float(ext.lambda_min), float(ext.lambda_max))
        pcg, d = hg.NystromPCG(rank=100, maxiter=5000, tol=1e-7, seed=0), damping(*lam)
        x = pcg.solve(system(H64, d), b).value
        op = system(hg.HessianOperator(pb.inner_loss, pb.params, pb.hparams), d)
    else:
        A = H.dense_hessian(pb)
        ev = torch.linalg.eigvalsh(A)
        lam = (float(ev[0]), float(ev[-1]))
        d = damping(*lam)
        x = torch.linalg.solve(A + d * torch.eye(len(A), dtype=F64), b)
        op = system(hg.MatrixOperator(A), d)
    return {"op": op, "b": b.to(op.dtype), "x": x, "damping": d, "lambda": lam}


def budget(
    method: hg.Implicit, ref: dict, err: Callable[[torch.Tensor], float], target: float, cap: int
) -> tuple[int, int, float]:
    """Smallest budget reaching ``target`` on ``ref["op"]``: (budget, products, error)."""
    solver, op, x0 = method.solver, ref["op"], method.state_dict().get("x")

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


def make_problem(args: Any) -> H.Bilevel:
    if args.size == "digits":
        return H.digits_mlp(args.seed, args.hidden, args.lbfgs, rounds=1, require_pd=False)
    pb = H.mnist_mlp(train_iters=args.lbfgs, seed=args.seed)  # float32, then per-weight decays
    g, lo, hi = torch.Generator().manual_seed(args.seed), math.log(1e-3), math.log(1e-2)
    hp = tuple(lo + (hi - lo) * torch.rand(t.shape, generator=g, dtype=F64) for t in pb.params)
    return replace(pb, hparams=tuple(h.to(pb.params[0].dtype) for h in hp))


def hyper_steps(args: Any) -> list[dict[str, Any]]:
    pb = make_problem(args)
    theta, raw = H.flat(pb.params), H.flat(pb.hparams).clone().requires_grad_(True)
    adam, methods = torch.optim.Adam([raw], lr=args.outer_lr), make_methods(args)
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
        problem = hg.Problem(cur.inner_loss, cur.outer_loss, cur.params, cur.hparams)
        cases = []
        for name, m in methods.items():
            m.damping = ref["damping"]
            k, hvps, e = budget(m, ref, err, args.target, args.cap)
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
        del ref  # the 100k Hessian operators hold graphs
        adam.step()
        H.log(f"hyper-step {step}: " + ", ".join(f"{n} {row[n]['hvps']}" for n in methods))
        rows.append(row)
    return rows


def summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    base = rows[0].get("TorchOpt solve_cg") and "TorchOpt solve_cg" or "cold CG"
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
        "## Products per hyper-step\n\n" + H.dict_table(per, per_cols + "|damping:.2e"),
        "## Milliseconds per hyper-step (median of the interleaved rounds)\n\n"
        + H.dict_table(ms, ms_cols),
    ]


def plot(d: dict[str, Any], out: Any) -> Any:
    """Products and milliseconds per hyper-step, one line per strategy."""
    rows, (fig, axes) = d["rows"], H.subplots(1, 2, 5.5, 3.8)
    steps = [r["step"] for r in rows]
    for n in strategies(rows):
        style = "k--" if n.startswith("TorchOpt") else "-"
        axes[0, 0].plot(steps, [r[n]["hvps"] for r in rows], style, label=n)
        axes[0, 1].plot(steps, [r[n].get("ms") or math.nan for r in rows], style, label=n)
    axes[0, 0].set(xlabel="hyper-step", ylabel="products to the target", yscale="log")
    axes[0, 1].set(xlabel="hyper-step", ylabel="ms per hypergradient", yscale="log")
    axes[0, 0].legend(fontsize=7)
    name = NAME + ("_100k" if d["settings"].get("size") == "100k" else "")
    return H.save_figure(fig, out / f"{name}.png")


DEFAULTS = {"steps": (3, 30, 30), "hidden": (4, 16, 16), "rounds": (1, 3, 3)}  # quick, full, 100k
DEFAULTS |= {"lbfgs": (50, 200, 300), "rank": (4, 40, 40), "recycle": (8, 200, 16)}
DEFAULTS |= {"harvest": (32, 64, 8), "smallest": (2, 20, 4)}
SETTINGS = ("steps", "target", "cap", "rank", "outer_lr", "rounds", "inner", "lbfgs", "size")
SETTINGS += ("recycle", "smallest", "harvest")


def main(argv: Sequence[str] | None = None) -> int:
    p = H.cli(__doc__)
    p.add_argument("--steps", type=int, help="hyper-steps (default 30, quick 3)")
    p.add_argument("--hidden", type=int, help="hidden units (default 16, quick 4)")
    p.add_argument("--lbfgs", type=int, help="initial L-BFGS iterations (200; 100k: 300; quick 50)")
    p.add_argument("--inner", type=int, default=10, help="L-BFGS iterations per hyper-step")
    p.add_argument("--rounds", type=int, help="timed rounds per hyper-step (default 3, quick 1)")
    p.add_argument("--rank", type=int, help="Nystrom rank (default 40, quick 4)")
    p.add_argument("--target", type=float, default=1e-2, help="relative error (default 1e-2)")
    p.add_argument("--cap", type=int, default=4000, help="largest CG budget tried")
    p.add_argument("--outer-lr", type=float, default=0.05, help="Adam lr on the log decays")
    p.add_argument("--size", choices=("digits", "100k"), default="digits", help="the MLP")
    p.add_argument("--recycle", type=int, help="RecycledCG rank (200; 100k: 16; quick 8)")
    p.add_argument("--smallest", type=int, help="RecycledCG smallest (20; 100k: 4; quick 2)")
    p.add_argument("--harvest", type=int, help="RecycledCG harvest (64; 100k: 8)")
    args = p.parse_args(argv)
    big = args.size == "100k"
    name, title = NAME + ("_100k" if big else ""), TITLE + (", 100k MLP" if big else "")
    if H.replot(args, name, title, render, plot):
        return 0
    H.start(args)
    H.defaults(args, **{k: (q, big_v if big else full) for k, (q, full, big_v) in DEFAULTS.items()})
    rep, rows = H.Report(name, title, args), hyper_steps(args)
    pb_text = f"tanh MLP 64-{args.hidden}-10 on digits, one log decay per parameter"
    if big:
        pb_text = "tanh MLP 784-110-110-10 on MNIST (99,670 float32 weights), a decay each"
    data = {"settings": {k: getattr(args, k) for k in SETTINGS}, "problem": pb_text, "rows": rows}
    rep.write(data | {"summary": summary(rows)}, render, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
