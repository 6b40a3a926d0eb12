"""Against TorchOpt 0.7.3 and plain autograd: implicit and unrolled hypergradients, cold start,
per-call overhead."""

from collections.abc import Callable, Sequence
from typing import Any

import torch

import harness as H
import hypergradient as hg
import unrolled_speed as U

F64, NAME = torch.float64, "vs_torchopt"
TITLE = "TorchOpt 0.7.3 and plain autograd vs hypergradient"
WHO = {"hg": "unrolled", "autograd": "hand", "torchopt": "torchopt"}  # unrolled_speed's names


def torchopt() -> Any:
    return H.import_peer("torchopt")[0]


class Counted:
    """A TorchOpt linear solver ``(matvec, b) -> x`` that counts the products it asks for:
    ``last``, those of its latest call (its CG computes ``A x0`` even for ``x0 = 0``, so
    ``maxiter = k`` costs ``k + 1``)."""

    def __init__(self, solve: Any) -> None:
        self.solve, self.last = solve, 0

    def __call__(self, matvec: Callable, b: Any, **kwargs: Any) -> Any:
        self.last = 0

        def counted(v: Any) -> Any:
            self.last += 1
            return matvec(v)

        return self.solve(counted, b, **kwargs)


def torchopt_implicit(pb: H.Bilevel, solve: Any) -> Callable[[int], torch.Tensor]:
    """TorchOpt's ``custom_root`` around a solver that returns the given optimum."""

    @torchopt().diff.implicit.custom_root(torch.func.grad(pb.inner_loss), argnums=1, solve=solve)
    def solver(params: Any, hparams: Any) -> Any:
        return params

    def call(s: int) -> torch.Tensor:
        hp = H.leaves(pb.hparams)
        sol = solver(tuple(p.detach() for p in pb.params), hp)
        return H.flat(torch.autograd.grad(pb.outer_loss(sol, hp), hp, allow_unused=True))

    return call


def implicit_problems(quick: bool, seed: int) -> list[tuple[H.Bilevel, torch.Tensor]]:
    """(problem, reference) pairs: ridge (closed form), logistic regression and the digits MLP
    (dense solves), a float32 MNIST MLP (~100k parameters; CG converged in float64)."""
    ridge = H.ridge(seed, 40, 10) if quick else H.ridge(seed)
    dense = [H.logreg(seed)] + ([] if quick else [H.digits_mlp(seed)])  # quick: no MLP (as logreg)
    out = [(ridge, ridge.closed_form)] + [(pb, H.dense_hypergradient(pb)) for pb in dense]
    big = H.mnist_mlp(4, 64, 64, F64, 0, 5) if quick else H.mnist_mlp(110, 256, 256, F64, 0, 200)
    big.damping = 0.1 if quick else 1e-2
    big.name = f"mnist_mlp ({big.num_params:,} params, float32)"
    ref = hg.implicit(*big.args, hg.CG(maxiter=2000, tol=1e-10), damping=big.damping)
    return out + [(big.cast(torch.float32), H.flat(ref))]


def ours(name: str, pb: H.Bilevel, solver: hg.Solver) -> H.Case:
    """``hg.implicit``, its info (products) in the warm-up output."""
    kw = {"damping": pb.damping, "residual": False}
    call = lambda i: hg.implicit(*pb.args, solver, return_info=i, **kw)  # noqa: E731
    return H.Case(f"hg {name}", lambda s: H.flat(call(False)), lambda: call(True))


def implicit_part(quick: bool, seed: int, budgets: Sequence[int], repeats: int) -> list[dict]:
    to, rows = torchopt(), []
    for pb, ref in implicit_problems(quick, seed):
        op = hg.HessianOperator(pb.inner_loss, pb.params, pb.hparams)
        lam = hg.estimate_lambda_max(op, iters=30, generator=torch.Generator().manual_seed(0))
        op.release()
        alpha, d = 1.0 / (float(lam) + pb.damping), pb.damping or None
        for k in budgets:
            H.log(f"[implicit] {pb.name}, k = {k}")
            solvers = {"CG": hg.CG(maxiter=k, tol=0.0), "Neumann": hg.Neumann(k, alpha=alpha)}
            cases = [ours(n, pb, sv) for n, sv in solvers.items()]
            peers: dict[str, Counted] = {}
            if to is not None:  # as many products as ours (TorchOpt's CG computes A x0 too)
                used = ours("CG", pb, solvers["CG"]).info()[1].num_hvps  # type: ignore[misc]
                cg = to.linear_solve.solve_cg(maxiter=used - 1, rtol=0.0, atol=0.0, ridge=d)
                ns = to.linear_solve.solve_inv(ns=True, maxiter=k, alpha=alpha, ridge=d)
                peers = {"CG": Counted(cg), "Neumann": Counted(ns)}
                cases += [
                    H.Case(f"torchopt {n}", torchopt_implicit(pb, s)) for n, s in peers.items()
                ]
            res = {t.key: t for t in H.interleave(cases, repeats, keep=lambda h: h)}
            for name in solvers:
                o, t = res[f"hg {name}"], res.get(f"torchopt {name}")
                err = lambda r, ref=ref: H.relative_error(r.kept[-1], ref) if r and r.kept else None  # noqa: E731
                row = {"problem": pb.name, "params": pb.num_params, "solver": name, "k": k}
                row |= {"hvps": o.warm[1].num_hvps if o.warm else None, "ours_ms": o.ms}
                row["theirs_hvps"] = peers[name].last if name in peers else None
                row |= {"theirs_ms": t.ms if t else None, "ours_rel_err": err(o)}
                row["theirs_rel_err"] = err(t)
                rows.append(row | {"error": o.error or (t.error if t else None)})
    return rows


def unrolled_part(quick: bool, T: int, repeats: int) -> list[dict]:
    """``unrolled_speed``'s competitors: time here, peak memory in a child process each."""
    methods, rows = ["hg", "autograd"] + ["torchopt"] * (torchopt() is not None), []
    for name in U.PROBLEMS:
        H.log(f"[unrolled] {name}, T = {T}")
        hidden = 4 if quick and name == "mlp" else 32
        calls = [U.competitor(WHO[m], name, T, hidden) for m in methods]
        res = H.interleave([H.Case(m, lambda s, c=c: c()) for m, c in zip(methods, calls)], repeats)
        for m, t in zip(methods, res):
            mem = {"seconds": None, "cpu_seconds": None, "peak_mb": None}
            if not quick or (name, m) == ("logreg", "hg"):  # quick: one child process
                mem = H.isolated(U.peak_child, WHO[m], name, T, hidden)
            diff = H.relative_error(t.warm, res[1].warm) if t.warm is not None else None
            row = {"problem": name, "T": T, "method": m, "ms": t.ms, "cpu_ms": t.cpu_ms}
            rows.append(row | {"vs_autograd_rel_diff": diff, "error": t.error} | mem)
    return rows


def cold_calls(what: str) -> dict[str, Callable[[], Any]]:
    """A first and a second call of ``what`` on logistic regression (built untimed, no
    torch.func), for the cold-start measurement."""
    pb = H.logreg(0, solve=False)
    if what == "hg.implicit":
        call = lambda: hg.implicit(*pb.args, hg.CG(maxiter=10, tol=0.0))  # noqa: E731
    elif what == "hg.unrolled":
        sgd = hg.optim.sgd(lr=0.5)
        call = lambda: hg.unrolled(*pb.args[:2], pb.params0, pb.hparams, 10, sgd)  # noqa: E731
    else:  # TorchOpt, imported before the clock starts
        to = torchopt()
        call = lambda: torchopt_implicit(pb, to.linear_solve.solve_cg(maxiter=10, rtol=0.0))(0)  # noqa: E731
    return {"first": call, "second": call}


def minimal_cg(f: Callable, g: Callable, params: tuple, hparams: tuple, k: int) -> torch.Tensor:
    """The reference loop: one retained double-backward graph, k CG products, mixed term."""
    ps, hs = H.leaves(params), H.leaves(hparams)
    gf = torch.autograd.grad(f(ps, hs), ps, create_graph=True)
    b = H.flat(torch.autograd.grad(g(ps, hs), ps))
    x, r = torch.zeros_like(b), b.clone()
    d, rs = r.clone(), r @ r
    for _ in range(k):
        Ad = H.flat(torch.autograd.grad(gf, ps, H.unflat(d, ps), retain_graph=True))
        a = rs / (d @ Ad)
        x, r = x + a * d, r - a * Ad
        rs, rs_old = r @ r, rs
        d = r + (rs / rs_old) * d
    return -H.flat(torch.autograd.grad(gf, hs, H.unflat(x, ps)))


def overhead_part(ks: Sequence[int], repeats: int) -> dict[str, Any]:
    """CG(k) at two budgets against the minimal loop: fixed cost and cost per product."""
    pb, cases = H.logreg(0), []
    for k in ks:
        ours = lambda s, k=k: hg.implicit(*pb.args, hg.CG(maxiter=k, tol=0.0))  # noqa: E731
        cases.append(H.Case(f"hg.implicit CG({k})", ours))
        cases.append(H.Case(f"minimal loop CG({k})", lambda s, k=k: minimal_cg(*pb.args, k)))
    for c in cases:
        c.inner = H.calls_per_sample(lambda c=c: c.call(0), 0.02)
    res = {t.key: t for t in H.interleave(cases, repeats)}
    out: dict[str, Any] = {"ks": list(ks), "ms": {k: t.ms for k, t in res.items()}}
    for who in ("hg.implicit", "minimal loop"):
        (k0, k1), t = ks, [res[f"{who} CG({k})"].ms for k in ks]
        slope = (t[1] - t[0]) / (k1 - k0)
        out[who] = {"fixed_ms": t[0] - slope * k0, "per_product_ms": slope}
    ours = H.flat(hg.implicit(*pb.args, hg.CG(maxiter=ks[0], tol=0.0)))
    out["rel_diff"] = H.relative_error(ours, minimal_cg(*pb.args, ks[0]))
    return out | {"ratio": res[f"hg.implicit CG({ks[0]})"].ms / res[f"minimal loop CG({ks[0]})"].ms}


def render(data: dict[str, Any]) -> list[str]:
    o, imp = data["overhead"], data["implicit"]
    imp = [r | {"theirs/ours": H.ratio(r["theirs_ms"], r["ours_ms"])} for r in imp]
    cold = [c | {"first call": w} for w, c in data["cold_start"].items()]
    fresh = data["overhead_fresh"]  # in the order they ran
    parts = {"this process": o} | {f"fresh child {i + 1}": c for i, c in enumerate(fresh)}
    ovh = [
        p[w] | {"process": where, "implementation": w, "ratio": p["ratio"]}
        for where, p in parts.items()
        for w in ("hg.implicit", "minimal loop")
    ]
    ovh = [r | {"per_product_us": 1e3 * r["per_product_ms"]} for r in ovh]
    icols = "problem|params:,|solver|k:d|hvps:d|theirs_hvps:d|ours_ms:.3g|theirs_ms:.3g|theirs/ours"
    icols += "|ours_rel_err:.2e|theirs_rel_err:.2e|error"
    ucols = "problem|T:d|method|ms:.3g|cpu_ms:.3g|peak_mb:.1f|vs_autograd_rel_diff:.2e|error"
    med = f": median of {len(fresh)} children {H.median([c['ratio'] for c in fresh]):.2f}"
    return [
        f"- TorchOpt {data['machine'].get('torchopt') or 'not importable: its columns are empty'}",
        "## 1. Implicit hypergradients at equal products (theirs = TorchOpt)\n\nhg with "
        "`residual=False`: by default a fixed budget (Neumann) pays one more product for "
        "`info.residual_norm`, which TorchOpt does not compute. hvps, theirs_hvps: the products "
        "each side asked for, counted; TorchOpt's CG gets `maxiter = hvps - 1` (it computes "
        "`A x0` for `x0 = 0`), so that both spend the same, also where hg's CG stops early at "
        "rounding level.\n\n" + H.dict_table(imp, icols),
        "## 2. Through T SGD steps (lr + per-feature decay)\n\nms: interleaved in this process; "
        "peak MB: peak RSS increase of the call, each method alone in a fresh process.\n\n"
        + H.dict_table(data["unrolled"], ucols),
        "## 3. Cold start (fresh interpreter, after `import torch, hypergradient`)\n\n"
        + H.dict_table(cold, "first call|import_s:.2f|first_s:.3f|second_s:.4f|dynamo_imported"),
        f"## 4. Per-call overhead, logistic regression (31 parameters)\n\nCG(k) for k = {o['ks']}; "
        f"ratio: hg / minimal at k = {o['ks'][0]} (results agree to {o['rel_diff']:.1e}), in this "
        "process after the other parts, and in fresh child processes (forked from a server that "
        "imported torch, torch.func, torch._dynamo and hypergradient; it varies between processes "
        f"on this shared machine){med}.\n\n"
        + H.dict_table(ovh, "process|implementation|fixed_ms:.3f|per_product_us:.0f|ratio:.2f"),
    ]


def run(args: Any, rep: H.Report) -> dict[str, Any]:
    q, to = args.quick, torchopt()
    rep.machine["torchopt"], repeats = getattr(to, "__version__", None), 1 if q else 9
    data = {"implicit": implicit_part(q, args.seed, [2] if q else [10, 50], repeats)}
    data["unrolled"] = unrolled_part(q, 3 if q else 100, repeats)
    whats = ["hg.implicit"] if q else ["hg.implicit", "hg.unrolled"] + ["torchopt"] * bool(to)
    for w, c in ((w, H.cold_start(NAME, w)) for w in whats):
        cold = {k: c[k] for k in ("import_s", "first_s", "second_s")}
        data.setdefault("cold_start", {})[w] = cold | {"dynamo_imported": c["dynamo"]}
    ks, reps = ([2, 6], 2) if q else ([10, 30], 41)
    data["overhead"] = overhead_part(ks, reps)
    children = 1 if q else 5  # the same in new processes: the ratio varies between processes
    data["overhead_fresh"] = [H.isolated(overhead_part, ks, reps) for _ in range(children)]
    return data


main = H.entry(__doc__, NAME, TITLE, run, render)

if __name__ == "__main__":
    main()
