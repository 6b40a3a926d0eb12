"""Against TorchOpt 0.7.3 and plain autograd: implicit and unrolled hypergradients, memory,
cold start and per-call overhead, paired in one process.

1. Implicit at equal products: ``hg.implicit`` with ``CG(k, tol=0)`` / ``Neumann(k, 1/L)``
   vs TorchOpt's ``custom_root`` with ``solve_cg(maxiter=k, rtol=0)`` / ``solve_inv(ns=True,
   maxiter=k, alpha=1/L)`` on ridge, logistic regression, the 2.4k-parameter digits MLP and a
   ~100k-parameter float32 MNIST MLP (references: closed form, dense solves, converged CG).
2. Through T SGD steps (lr + per-feature decay): ``hg.unrolled`` vs a hand-written
   ``create_graph=True`` loop vs TorchOpt's functional SGD; time (interleaved) and peak memory
   (each method alone in a fresh child process).
3. Cold start: the first call in a fresh interpreter, after ``import torch, hypergradient``.
4. Per-call overhead on the 31-parameter logistic regression: CG(k) vs a minimal retained-graph
   CG loop, at two k (intercept and cost per product).

TorchOpt (``pip install --no-deps torchopt==0.7.3 optree graphviz``; its C++ extension does
not load on recent torch, the pure-Python path is used) is skipped with a message if missing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

import harness as H
import hypergradient as hg
from harness import Case, interleave, log, ms, problems, runner, sci, table
from harness import report as rp
from harness.problems import F64, Bilevel, flat, relative_error, unflat

NAME, TITLE = "vs_torchopt", "TorchOpt 0.7.3 and plain autograd vs hypergradient"

TORCHOPT: list[Any] = []


def torchopt() -> Any:
    if not TORCHOPT:
        TORCHOPT.append(runner.import_peer("torchopt")[0])
    return TORCHOPT[0]


# ============================================================================ 1. implicit


def torchopt_implicit(pb: Bilevel, solve: Any) -> Callable[[int], torch.Tensor]:
    """TorchOpt's ``custom_root`` around a solver that returns the given optimum."""
    to = torchopt()
    f, g = pb.inner_loss, pb.outer_loss

    def optimality(params: Any, hparams: Any) -> Any:
        return torch.func.grad(f)(params, hparams)

    @to.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def solver(params: Any, hparams: Any) -> Any:
        return params

    def call(s: int) -> torch.Tensor:
        hp = tuple(h.detach().requires_grad_(True) for h in pb.hparams)
        sol = solver(tuple(p.detach() for p in pb.params), hp)
        return flat(torch.autograd.grad(g(sol, hp), hp, allow_unused=True))

    return call


def implicit_problems(quick: bool, seed: int) -> list[tuple[Bilevel, torch.Tensor]]:
    """(problem, reference) pairs; the 100k MLP's reference is CG converged in float64."""
    ridge = problems.ridge(seed, 40, 10) if quick else problems.ridge(seed)
    lr = problems.logreg(seed)
    out = [(ridge, ridge.closed_form), (lr, problems.dense_hypergradient(lr))]
    if not quick:  # (the same code path as logreg)
        mlp = problems.digits_mlp(seed)
        out.append((mlp, problems.dense_hypergradient(mlp)))
    big = problems.mnist_mlp(
        4 if quick else 110,
        *(64, 64) if quick else (256, 256),
        F64,
        train_iters=5 if quick else 200,
    )
    big.damping, big.name = 1e-2, f"mnist_mlp ({big.num_params:,} params, float32)"
    ref = hg.implicit(*_args(big), hg.CG(maxiter=2000, tol=1e-10), damping=big.damping)
    out.append((big.cast(torch.float32), flat(ref)))
    return out


def _args(pb: Bilevel) -> tuple:
    return pb.inner_loss, pb.outer_loss, pb.params, pb.hparams


def implicit_part(quick: bool, seed: int, budgets: Sequence[int], repeats: int) -> list[dict]:
    to, rows = torchopt(), []
    for pb, ref in implicit_problems(quick, seed):
        op = hg.HessianOperator(pb.inner_loss, pb.params, pb.hparams)
        lam = hg.estimate_lambda_max(op, iters=30, generator=torch.Generator().manual_seed(0))
        op.release()
        alpha, d = 1.0 / (float(lam) + pb.damping), pb.damping or None
        for k in budgets:
            log(f"[implicit] {pb.name}, k = {k}")
            ours = {"CG": hg.CG(maxiter=k, tol=0.0), "Neumann": hg.Neumann(k, alpha=alpha)}
            cases = [
                Case(
                    f"hg {n}",
                    lambda s, sv=sv, pb=pb: flat(hg.implicit(*_args(pb), sv, damping=pb.damping)),
                    lambda sv=sv, pb=pb: hg.implicit(
                        *_args(pb), sv, damping=pb.damping, return_info=True
                    ),
                )
                for n, sv in ours.items()
            ]
            if to is not None:
                solves = {
                    "CG": to.linear_solve.solve_cg(maxiter=k, rtol=0.0, atol=0.0, ridge=d),
                    "Neumann": to.linear_solve.solve_inv(ns=True, maxiter=k, alpha=alpha, ridge=d),
                }
                cases += [
                    Case(f"torchopt {n}", torchopt_implicit(pb, sv)) for n, sv in solves.items()
                ]
            res = {t.key: t for t in interleave(cases, repeats, keep=lambda h: h)}
            for name in ours:
                o, t = res[f"hg {name}"], res.get(f"torchopt {name}")

                def err(r: Any, ref: torch.Tensor = ref) -> float | None:
                    return relative_error(r.kept[-1], ref) if r and r.kept else None

                rows.append(
                    {
                        "problem": pb.name,
                        "params": pb.num_params,
                        "solver": name,
                        "k": k,
                        "hvps": o.warm[1].num_hvps if o.warm else None,
                        "ours_ms": o.ms,
                        "theirs_ms": t.ms if t else None,
                        "ours_rel_err": err(o),
                        "theirs_rel_err": err(t),
                        "error": o.error or (t.error if t else None),
                    }
                )
    return rows


# ============================================================================ 2. unrolled


def unrolled_problem(name: str, quick: bool) -> tuple[Callable, Callable, tuple, dict]:
    """``f(p, h)``, ``g(p, h)`` with ``h = {"lr", "decay"}``, ``params0`` and ``h``."""
    if name == "logreg":
        pb = problems.logreg(0, solve=False)
        lr = 0.5
    else:
        pb = problems.digits_mlp(0, 4 if quick else 32, train=False)
        lr = 0.1
    hp = {
        "lr": torch.tensor(lr, dtype=F64),
        "decay": pb.hparams[0] if name == "logreg" else pb.hparams,
    }

    def f(p: Any, h: dict) -> torch.Tensor:
        return pb.inner_loss(p, (h["decay"],) if name == "logreg" else h["decay"])

    return f, lambda p, h: pb.outer_loss(p, None), tuple(pb.params0), hp


def leaves(h: dict) -> list[torch.Tensor]:
    return [h["lr"], *(h["decay"] if isinstance(h["decay"], tuple) else [h["decay"]])]


def unrolled_call(method: str, name: str, T: int, quick: bool) -> Callable[[], torch.Tensor]:
    """One hypergradient through T steps by ``method`` (``hg``, ``autograd``, ``torchopt``)."""
    f, g, p0, h0 = unrolled_problem(name, quick)

    def call() -> torch.Tensor:
        h = {
            k: (
                tuple(t.detach().requires_grad_(True) for t in v)
                if isinstance(v, tuple)
                else v.detach().requires_grad_(True)
            )
            for k, v in h0.items()
        }
        if method == "hg":
            return flat(hg.unrolled(f, g, p0, h, T, hg.optim.sgd(lr=h["lr"])))
        p = tuple(t.detach().requires_grad_(True) for t in p0)
        if method == "torchopt":
            to = torchopt()
            opt = to.sgd(lr=h["lr"])
            state = opt.init(p)
        for _ in range(T):
            grads = torch.autograd.grad(f(p, h), p, create_graph=True)
            if method == "torchopt":
                updates, state = opt.update(grads, state, inplace=False)
                p = to.apply_updates(p, updates, inplace=False)
            else:
                p = tuple(x - h["lr"] * gx for x, gx in zip(p, grads))
        return flat(torch.autograd.grad(g(p, h), leaves(h), allow_unused=True))

    return call


def peak_child(method: str, name: str, T: int, quick: bool) -> dict[str, float]:
    """In a fresh process: a warm-up call, then the measured one (seconds, peak MB)."""
    call = unrolled_call(method, name, T, quick)
    call()
    _, wall, cpu, peak = runner.peak_memory(call)
    return {"seconds": wall, "cpu_seconds": cpu, "peak_mb": peak}


def unrolled_part(quick: bool, T: int, repeats: int) -> list[dict]:
    methods = ["hg", "autograd"] + (["torchopt"] if torchopt() is not None else [])
    rows = []
    for name in ("logreg", "mlp"):
        log(f"[unrolled] {name}, T = {T}")
        calls = {m: unrolled_call(m, name, T, quick) for m in methods}
        res = interleave([Case(m, lambda s, c=c: c()) for m, c in calls.items()], repeats)
        ref = res[1].warm
        for m, t in zip(methods, res):
            mem = {"seconds": None, "cpu_seconds": None, "peak_mb": None}
            if not quick or (name, m) == ("logreg", "hg"):  # quick: one child process
                mem = runner.isolated(peak_child, m, name, T, quick)
            rows.append(
                {
                    "problem": name,
                    "T": T,
                    "method": m,
                    "ms": t.ms,
                    "cpu_ms": t.cpu_ms,
                    "vs_autograd_rel_diff": relative_error(t.warm, ref)
                    if t.warm is not None
                    else None,
                    "error": t.error,
                    **mem,
                }
            )
    return rows


# ============================================================ 3. cold start, 4. overhead

COLD = """
import json, sys, time
t0 = time.perf_counter()
import torch, hypergradient
imported = time.perf_counter() - t0
import vs_torchopt as B
call = B.cold_call({what!r})
t1 = time.perf_counter(); call(); first = time.perf_counter() - t1
t2 = time.perf_counter(); call(); second = time.perf_counter() - t2
print(json.dumps({{"import_s": imported, "first_s": first, "second_s": second,
                  "dynamo_imported": "torch._dynamo" in sys.modules}}))
"""


def cold_call(what: str) -> Callable[[], Any]:
    """The first call measured by the cold-start snippet (problem built untimed, no torch.func)."""
    pb = problems.logreg(0, solve=False)
    if what == "hg.implicit":
        return lambda: hg.implicit(*_args(pb), hg.CG(maxiter=10, tol=0.0))
    if what == "hg.unrolled":
        return lambda: hg.unrolled(*_args(pb)[:2], pb.params0, pb.hparams, 10, hg.optim.sgd(lr=0.5))
    torchopt()  # imported before the clock starts
    return lambda: torchopt_implicit(pb, torchopt().linear_solve.solve_cg(maxiter=10, rtol=0.0))(0)


def minimal_cg(f: Callable, g: Callable, params: tuple, hparams: tuple, k: int) -> torch.Tensor:
    """The reference loop: one retained double-backward graph, k CG products, mixed term."""
    ps = [p.detach().requires_grad_(True) for p in params]
    hs = [h.detach().requires_grad_(True) for h in hparams]
    gf = torch.autograd.grad(f(ps, hs), ps, create_graph=True)
    b = flat(torch.autograd.grad(g(ps, hs), ps))
    x, r = torch.zeros_like(b), b.clone()
    d, rs = r.clone(), r @ r
    for _ in range(k):
        Ad = flat(torch.autograd.grad(gf, ps, unflat(d, ps), retain_graph=True))
        a = rs / (d @ Ad)
        x, r = x + a * d, r - a * Ad
        rs, rs_old = r @ r, rs
        d = r + (rs / rs_old) * d
    return -flat(torch.autograd.grad(gf, hs, unflat(x, ps)))


def overhead_part(ks: Sequence[int], repeats: int) -> dict[str, Any]:
    pb = problems.logreg(0)
    cases = []
    for k in ks:
        cases += [
            Case(
                f"hg.implicit CG({k})",
                lambda s, k=k: hg.implicit(*_args(pb), hg.CG(maxiter=k, tol=0.0)),
            ),
            Case(f"minimal loop CG({k})", lambda s, k=k: minimal_cg(*_args(pb), k)),
        ]
    for c in cases:
        c.inner = runner.calls_per_sample(lambda c=c: c.call(0), 0.02)
    res = {t.key: t for t in interleave(cases, repeats)}
    out: dict[str, Any] = {"ks": list(ks), "ms": {k: t.ms for k, t in res.items()}}
    for who in ("hg.implicit", "minimal loop"):
        (k0, k1), t = ks, [res[f"{who} CG({k})"].ms for k in ks]
        slope = (t[1] - t[0]) / (k1 - k0)
        out[who] = {"fixed_ms": t[0] - slope * k0, "per_product_ms": slope}
    same = relative_error(
        flat(hg.implicit(*_args(pb), hg.CG(maxiter=ks[0], tol=0.0))), minimal_cg(*_args(pb), ks[0])
    )
    out["ratio"] = res[f"hg.implicit CG({ks[0]})"].ms / res[f"minimal loop CG({ks[0]})"].ms
    out["rel_diff"] = same
    return out


# ============================================================================ report


def render(data: dict[str, Any]) -> list[str]:
    imp = [
        [
            r["problem"],
            r["params"],
            r["solver"],
            r["k"],
            r["hvps"],
            ms(r["ours_ms"]),
            ms(r["theirs_ms"]),
            rp.ratio(r["theirs_ms"], r["ours_ms"]),
            sci(r["ours_rel_err"]),
            sci(r["theirs_rel_err"]),
        ]
        for r in data["implicit"]
    ]
    unr = [
        [
            r["problem"],
            r["T"],
            r["method"],
            ms(r["ms"]),
            ms(r["cpu_ms"]),
            rp.fix(r["peak_mb"], 1),
            sci(r["vs_autograd_rel_diff"]),
        ]
        for r in data["unrolled"]
    ]
    cold = [
        [
            w,
            f"{c['import_s']:.2f}",
            f"{c['first_s']:.3f}",
            f"{c['second_s']:.4f}",
            "yes" if c["dynamo_imported"] else "no",
        ]
        for w, c in data["cold_start"].items()
    ]
    o = data["overhead"]
    ovh = [
        [who, f"{o[who]['fixed_ms']:.3f}", f"{1e3 * o[who]['per_product_ms']:.0f}"]
        for who in ("hg.implicit", "minimal loop")
    ]
    note = (
        f"- TorchOpt {data['machine'].get('torchopt') or 'not importable: its columns are empty'}"
    )
    return [
        note,
        "## 1. Implicit hypergradients at equal products\n\n"
        + table(
            [
                "problem",
                "params:",
                "solver",
                "k:",
                "hvps (ours):",
                "hg ms:",
                "TorchOpt ms:",
                "TorchOpt / hg:",
                "hg rel. err:",
                "TorchOpt rel. err:",
            ],
            imp,
        ),
        "## 2. Through T SGD steps (lr + per-feature decay)\n\nms: interleaved in this process; "
        "peak "
        "MB: peak RSS increase of the call, each method alone in a fresh process.\n\n"
        + table(
            ["problem", "T:", "method", "ms:", "CPU ms:", "peak MB:", "vs autograd loop:"], unr
        ),
        "## 3. Cold start (fresh interpreter)\n\n"
        + table(
            [
                "first call",
                "import torch, hypergradient s:",
                "first call s:",
                "second call s:",
                "torch._dynamo imported",
            ],
            cold,
        ),
        f"## 4. Per-call overhead, logistic regression (31 parameters)\n\nCG(k) for k = {o['ks']}; "
        f"fixed cost and cost per product from the two budgets. hg / minimal at k = {o['ks'][0]}: "
        f"{o['ratio']:.2f} (results agree to {o['rel_diff']:.1e}).\n\n"
        + table(["implementation", "fixed ms:", "per product µs:"], ovh),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = H.cli(__doc__).parse_args(argv)
    if H.replot(args, NAME, TITLE, render):
        return 0
    H.start(args)
    q, to = args.quick, torchopt()
    rep = H.Report(NAME, TITLE, args, torchopt=getattr(to, "__version__", None))
    repeats = 1 if q else 9
    data: dict[str, Any] = {
        "implicit": implicit_part(q, args.seed, [2] if q else [10, 50], repeats)
    }
    data["unrolled"] = unrolled_part(q, 3 if q else 100, repeats)
    whats = ["hg.implicit"] if q else ["hg.implicit", "hg.unrolled"] + ["torchopt"] * bool(to)
    data["cold_start"] = {w: runner.fresh(COLD.format(what=w)) for w in whats}
    data["overhead"] = overhead_part([2, 6] if q else [10, 30], 2 if q else 15)
    rep.write(data, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
