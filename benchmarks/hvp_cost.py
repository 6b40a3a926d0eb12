"""Cost of one Hessian-vector product, in gradients of the inner loss.

``--compile`` (issue 11, goal 6): ``torch.compile`` of the products ``vjp(grad f)(v)`` and
``jvp(grad f)(v)``, weights, decays and ``v`` as inputs (one graph serves every hyper-step),
against ``hg.HessianOperator``'s retained graph; ``break_even``: products to repay the compile."""

import time
from collections.abc import Sequence
from typing import Any

import torch

import harness as H
import hypergradient as hg

NAME, TITLE = "hvp_cost", "Cost of a Hessian-vector product"


def models(quick: bool) -> list[tuple[str, H.Bilevel]]:
    """Float32 models at random weights (the cost does not depend on training)."""
    gen = torch.Generator().manual_seed(0)
    out = [("logreg (breast cancer, 31 params)", H.logreg(0).cast(torch.float32))]
    X, y = H.load_sklearn("digits", torch.float32, torch.long)
    sets = [("digits", H.standardize(X, eps=1e-6), y, 8 if quick else 32)]
    if not quick:
        Xm, ym = H.mnist()
        sets.append(("mnist", H.standardize(Xm[:2000], eps=1e-6), ym[:2000], 256))
    for data, X, y, h in sets:
        init = H.mlp_init((X.shape[1], h, h, 10), gen, torch.float32)
        P, decays = sum(t.numel() for t in init), tuple(torch.full_like(t, -6.0) for t in init)
        name = f"tanh MLP {X.shape[1]}-{h}-{h}-10 on {data} ({P:,} params, {len(y)} examples)"
        out.append((name, H.Bilevel(name, name, *H.mlp_losses((X, y), (X, y)), init, decays)))
    return out


def measure(pb: H.Bilevel, rounds: int, ks: Sequence[int]) -> list[dict[str, Any]]:
    f, w, lam = pb.inner_loss, pb.params, pb.hparams
    v = tuple(torch.randn_like(t) for t in w)
    op, vf, wl = hg.HessianOperator(f, w, lam), H.flat(v), H.leaves(w)
    outer = lambda p, h: 0.5 * sum((t**2).sum() for t in p)  # noqa: E731
    grad_f = lambda q: torch.func.grad(lambda q: f(q, lam))(q)  # noqa: E731
    calls = {
        "grad": lambda s: torch.autograd.grad(f(wl, lam), wl),
        "build": lambda s: hg.HessianOperator(f, w, lam).release(),
        "hvp (retained graph)": lambda s: op.matvec(vf),
        "jvp(grad) fresh": lambda s: torch.func.jvp(grad_f, (w,), (v,)),
        "vjp(grad) fresh": lambda s: torch.func.vjp(grad_f, w)[1](v),
    }
    # Neumann spends exactly k products whatever the curvature (random weights: H may be
    # indefinite and CG would stop early); the floor uses the products reported.
    cases = [H.Case(k, c) for k, c in calls.items()]
    for k in ks:
        neumann = hg.Neumann(k, alpha=1e-3)
        call = lambda s, n=neumann: hg.implicit(f, outer, w, lam, n)  # noqa: E731
        hvps = lambda n=neumann: hg.implicit(f, outer, w, lam, n, return_info=True)[1].num_hvps  # noqa: E731
        cases.append(H.Case(f"implicit, {k} products", call, hvps))
    res = H.interleave(cases, rounds)
    floor = lambda t: t.warm + 3 if t.key.startswith("implicit") else None  # noqa: E731
    rows = [{"what": t.key, "ms": t.ms, "gradients": t.ms / res[0].ms} for t in res]
    return [r | {"floor": floor(t)} for r, t in zip(rows, res)]


def compiled_products(pb: H.Bilevel, rounds: int) -> list[dict[str, Any]]:
    """Goal 6 for the product graph: compile time, ms per product against the retained
    graph's, relative difference and the products that pay the compile time back."""
    f, w, lam = pb.inner_loss, H.leaves(pb.params), H.leaves(pb.hparams)
    op, sizes = hg.HessianOperator(f, w, lam), [t.numel() for t in w]
    w, lam = tuple(t.detach() for t in w), tuple(t.detach() for t in lam)  # no graph needed
    v = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(1), dtype=w[0].dtype)
    parts = lambda v: tuple(x.view(t.shape) for x, t in zip(v.split(sizes), w))  # noqa: E731
    grad = lambda h: torch.func.grad(lambda q: f(q, h))  # noqa: E731
    products = {  # reverse over reverse, forward over reverse
        "compiled vjp(grad)": lambda p, h, v: torch.func.vjp(grad(h), p)[1](parts(v))[0],
        "compiled jvp(grad)": lambda p, h, v: torch.func.jvp(grad(h), (p,), (parts(v),))[1],
    }
    ref, out = op.matvec(v), []
    cases = [H.Case("retained graph (eager)", lambda s: op.matvec(v))]
    for what, fn in products.items():
        started, compiled = time.perf_counter(), torch.compile(fn, dynamic=False)
        got = H.flat(compiled(w, lam, v))
        row = {"what": what, "compile_s": time.perf_counter() - started}
        out.append(row | {"rel_diff": H.relative_error(got, ref)})
        cases.append(H.Case(what, lambda s, c=compiled: c(w, lam, v)))
    res = H.interleave(cases, rounds)
    eager, rows = res[0].ms, [{"what": res[0].key, "ms": res[0].ms, "vs_eager": 1.0}]
    for row, t in zip(out, res[1:]):
        gain, row = eager - t.ms, row | {"ms": t.ms, "vs_eager": t.ms / eager}
        rows.append(row | {"break_even": 1e3 * row["compile_s"] / gain if gain > 0 else None})
    return rows


def render(d: dict[str, Any]) -> list[str]:
    cols = "what|ms:.3f|gradients:.2f|floor"
    out = [f"## {r['problem']}\n\n" + H.dict_table(r["rows"], cols) for r in d["results"]]
    if d.get("compiled"):
        cols = "what|compile_s:.1f|ms:.3f|vs_eager:.2f|rel_diff:.1e|break_even:,.0f"
        out.append(
            "## torch.compile of the product graph (issue 11, goal 6)\n\nms per product, "
            "interleaved; vs_eager: compiled / retained graph; break_even: products after "
            "which the compile time is paid back (empty: never)."
        )
        out += [f"### {r['problem']}\n\n" + H.dict_table(r["rows"], cols) for r in d["compiled"]]
    return out


def plot(data: dict[str, Any], out: Any) -> Any:
    """Cost of one product and of whole hypergradients, in gradients of f."""
    panels = []
    for r in data["results"]:
        rows = [x for x in r["rows"] if x["what"] != "grad"]
        floors = [(x["floor"], i) for i, x in enumerate(rows) if x.get("floor")]
        axes = {"xscale": "log", "xlabel": "cost in gradients of f"}
        axes["title"] = r["problem"].replace(" (", "\n(")
        panel = {"bars": {"": [x["gradients"] for x in rows]}, "ticks": [x["what"] for x in rows]}
        lines = {"lines": {"k + 3": floors}, "fmt": {"k + 3": "k|"}, "ms": 14}
        panels.append(panel | lines | {"barh": True, "set": axes})
    return H.figure(out / f"{NAME}.png", panels, len(panels))


def run(args: Any, rep: H.Report) -> dict[str, Any]:
    r, ks, pbs = *((3, [10]) if args.quick else (30, [10, 50])), models(args.quick)
    out = {"results": [{"problem": n, "rows": measure(pb, r, ks)} for n, pb in pbs]}
    if args.compile:
        out["compiled"] = [{"problem": n, "rows": compiled_products(pb, r)} for n, pb in pbs]
    return out


OPTIONS = [H.option("--compile", action="store_true", help="goal 6: compiled product graphs")]
main = H.entry(__doc__, NAME, TITLE, run, render, plot=plot, options=OPTIONS)

if __name__ == "__main__":
    main()
