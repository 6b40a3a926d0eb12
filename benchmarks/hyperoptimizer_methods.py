"""The HyperOptimizer's methods and the trajectory hypergradients: accuracy, cost, outcome."""

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import harness as H
import hypergradient as hg

F64 = torch.float64
NAME, TITLE = "hyperoptimizer_methods", "HyperOptimizer methods and trajectory hypergradients"
HOPT_LR, OUTER_LR, START_DECAY = 0.5, 0.1, 1e-2  # Tables 1a, 2, 3
TRAJ_LR, TRAJ_MOMENTUM = 0.1, 0.9  # Table 1b
LR_START, LR_OUTER_LR = 1e-3, 0.2  # Table 4
IMPLICIT: dict[str, Callable[[int], hg.Method]] = {"T1T2()": lambda s: hg.T1T2()}  # seed s
IMPLICIT |= {"IFT() = Neumann(10, alpha=lr=0.5)": lambda s: hg.IFT()}
IMPLICIT |= {"IFT(CG(maxiter=20))": lambda s: hg.IFT(hg.CG(maxiter=20))}
NYSTROM = lambda s=0: hg.IFT(hg.Nystrom(10, 0.1, seed=s))  # noqa: E731
IMPLICIT |= {"IFT(Nystrom(rank=10, rho=0.1)), median of seeds": NYSTROM}
IMPLICIT |= {"HOAG(tol=1e-10, decay=1, maxiter=100)": lambda s: hg.HOAG(100, 1e-10, 1.0, 1e-10)}
IMPLICIT |= {"HOAG() at its first hyper-step (tol 0.1)": lambda s: hg.HOAG()}
HOPT_METHODS = {"T1T2()": hg.T1T2, "IFT() (Neumann 10, alpha=lr)": hg.IFT}
HOPT_METHODS |= {"IFT(CG(maxiter=20))": lambda: hg.IFT(hg.CG(maxiter=20))}
HOPT_METHODS |= {"IFT(Nystrom(rank=10, rho=0.1, seed=0))": NYSTROM}
HOPT_METHODS |= {"HOAG()": hg.HOAG, "Unrolled()": hg.Unrolled}
HOPT_METHODS |= {"Unrolled(truncate=5)": lambda: hg.Unrolled(truncate=5)}
HOPT_METHODS |= {"ForwardMode()": hg.ForwardMode, "DrMAD()": hg.DrMAD}
LR_METHODS = ("ForwardMode()", "Unrolled()", "DrMAD()")  # Table 4
FD4, FD2 = ((-2, 1 / 12), (-1, -8 / 12), (1, 8 / 12), (2, -1 / 12)), ((-1, -0.5), (1, 0.5))
train_loss, val_loss = H.linear_loss("decay"), H.linear_loss()


def make_hopt(label: str, data: H.Data, hparams: dict, method: hg.Method, **kw: Any) -> H.Run:
    """A HyperOptimizer on a zero ``nn.Linear`` (or at ``kw["state"]``) as a lockstep run (a
    hyper-step every 10)."""
    model = H.linear_model(data.dim, kw.pop("state", None))
    kw = {"inner_steps": 10, "train_loss": train_loss, "history_size": None, **kw}
    sgd = torch.optim.SGD(model.parameters(), lr=kw.pop("inner_lr", HOPT_LR))
    kw |= {"inner_optimizer": sgd, "val_loss": val_loss, "val_data": data.val, "method": method}
    return H.hopt_run(label, model, hparams, data.train, 10, **kw)


def decays(dim: int, raw: Tensor | None = None) -> dict[str, hg.Positive]:
    d = hg.Positive(torch.full((dim,), START_DECAY, dtype=F64))
    with torch.no_grad():
        d.raw.copy_(d.raw if raw is None else raw)
    return {"decay": d}


def implicit_table(data: H.Data, points: dict[str, Tensor], repeats: int) -> dict[str, Any]:
    f, g, _ = H.linear_losses(data)
    like = (torch.zeros(1, data.dim, dtype=F64), torch.zeros(1, dtype=F64))
    sgd0 = lambda hp: torch.optim.SGD(hp, lr=0.0)  # noqa: E731
    res: dict[str, Any] = {"setups": {}, "rows": [], "checks": []}
    for point, raw in points.items():
        H.log(f"[1a] {point}: Newton inner solve, exact reference ...")
        t = H.newton(lambda v, raw=raw: f(H.unflat(v, like), raw), H.flat(like), 1e-12)[0]
        theta, t0 = tuple(x.clone() for x in H.unflat(t, like)), time.perf_counter()
        exact, info = hg.implicit(f, g, theta, raw, hg.Exact(), return_info=True)
        s = {"exact_ms": 1e3 * (time.perf_counter() - t0), "exact_norm": float(exact.norm())}
        dense = H.dense_pieces(f, g, theta, raw)
        eig = torch.linalg.eigvalsh(dense["H"])
        s |= {"decay_min": float(raw.exp().min()), "decay_max": float(raw.exp().max())}
        s |= {"inner_grad_norm": info.inner_grad_norm, "val_loss_at_optimum": info.outer_loss}
        s |= {"hessian_lambda_min": float(eig[0]), "hessian_lambda_max": float(eig[-1])}
        s["exact_vs_dense_rel"] = H.relative_error(exact, dense["h"])
        res["setups"][point], ctx = s, hg.Problem(f, g, theta, raw, lr=HOPT_LR, prev_params=theta)

        def call(seed: int, make: Callable, theta=theta, raw=raw, ctx=ctx) -> tuple:
            kw = {"inner_steps": 1, "outer_optimizer": sgd0}
            run = make_hopt("", data, decays(data.dim, raw), make(seed), state=theta, **kw)
            run.step()
            rec = run.meta["hopt"].history[-1]
            h = rec.hypergrad["decay"].detach().clone()
            return h, rec.seconds, rec.diagnostics, H.relative_error(make(seed)(ctx)[0], h)

        cases = [H.Case(k, lambda s, m=m: call(s, m)) for k, m in IMPLICIT.items()]
        for c in H.interleave(cases, repeats, keep=lambda o: o):
            h, sec, diag, direct = zip(*c.kept)
            r = {"point": point, "method": c.key, "compute_vs_hopt": max(direct)}
            r |= {"num_hvps": [int(d.get("num_hvps", 0)) for d in diag]}
            r |= {"ms": [1e3 * x for x in sec], "status": [str(d.get("status", "")) for d in diag]}
            r |= {"rel": [H.relative_error(x, exact) for x in h]}
            res["rows"].append(r | {"cos": [H.cosine(x, exact) for x in h]})
        worst = max(res["rows"][-len(cases) :], key=lambda r: r["compute_vs_hopt"])
        ident = hg.implicit(f, g, theta, raw, hg.Identity(HOPT_LR))
        ident = H.relative_error(hg.T1T2()(ctx)[0], ident)
        res["checks"].append(
            f"{point}: hg.Exact vs independent dense solve {s['exact_vs_dense_rel']:.1e}; "
            f"method(Problem) vs the HyperOptimizer's hypergradient: worst rel. diff "
            f"{worst['compute_vs_hopt']:.1e} ({worst['method']}); T1T2 vs "
            f"hg.implicit(Identity(0.5)) {ident:.1e}"
        )
    return res


def render_1a(res: dict[str, Any], repeats: int) -> str:
    join = lambda xs: "/".join(map(str, sorted(set(xs))))  # noqa: E731
    rows = [r | {"hvps": join(r["num_hvps"]), "status": join(r["status"])} for r in res["rows"]]
    for r in rows:
        r |= {"ms": H.median(r["ms"]), "rel_err": H.median(r["rel"]), "cos": H.median(r["cos"])}
    title = "1a. Implicit methods at the inner optimum vs the exact implicit hypergradient"
    what = f"ms = median `history[-1].seconds` of {repeats} interleaved `hopt.step` calls."
    facts = H.bullets([f"`{p}`: {H.facts(s)}" for p, s in res["setups"].items()] + res["checks"])
    table = H.dict_table(rows, "point|method|hvps|status|rel_err:.2e|cos:.6f|ms:.2f")
    return H.section(title, what, facts, table)


def sgd_loop_loss(f: Callable, g: Callable, raw: Tensor, T: int, dim: int) -> float:
    """``g(theta_T)`` after T steps of ``torch.optim.SGD`` (lr 0.1, momentum 0.9) from 0."""
    p = tuple(torch.zeros(*s, dtype=F64).requires_grad_() for s in ((1, dim), (1,)))
    opt = torch.optim.SGD(p, lr=TRAJ_LR, momentum=TRAJ_MOMENTUM)
    for _ in range(T):
        H.loop_step(opt, lambda: f(p, raw))
    with torch.no_grad():
        return float(g(p, raw))


def finite_differences(loss: Callable[[Tensor], float], raw: Tensor, h: float, stencil) -> Tensor:
    """``sum_k c_k loss(raw + k h e_i) / h`` for every coordinate ``i``."""
    steps = h * torch.eye(raw.numel(), dtype=raw.dtype)  # row i: h e_i
    fd = [sum(c * loss(raw + k * e) for k, c in stencil) / h for e in steps]
    return torch.tensor(fd, dtype=raw.dtype)


def trajectory_table(data: H.Data, points: dict, horizons: Sequence[int], repeats: int) -> dict:
    f, g, _ = H.linear_losses(data)
    theta0 = (torch.zeros(1, data.dim, dtype=F64), torch.zeros(1, dtype=F64))
    opt, rows, refs = hg.optim.sgd(lr=TRAJ_LR, momentum=TRAJ_MOMENTUM), [], {}
    for point, raw in points.items():
        for T in horizons:
            H.log(f"[1b] {point}, T={T}: finite differences ...")
            t0, loss = time.perf_counter(), lambda r, T=T: sgd_loop_loss(f, g, r, T, data.dim)
            fd, fd2 = (finite_differences(loss, raw, h, st) for h, st in ((1e-3, FD4), (1e-4, FD2)))
            ref = {"fd_norm": float(fd.norm()), "fd4_vs_fd2_rel": H.relative_error(fd2, fd)}
            args = (f, g, theta0, raw, T, opt)
            calls = {"hg.unrolled": lambda s, a=args: hg.unrolled(*a)}
            for K in sorted({k for k in (1, 5, T // 2) if 0 < k < T}):
                trunc = lambda s, a=args, K=K: hg.unrolled(*a, truncate=K)  # noqa: E731
                calls[f"hg.unrolled(truncate={K})"] = trunc
            calls["hg.forward_mode"] = lambda s, a=args: hg.forward_mode(*a)
            calls["hg.drmad"] = lambda s, a=args: hg.drmad(*a)
            res = H.interleave([H.Case(k, c) for k, c in calls.items()], repeats)
            un, (_, info) = res[0].warm, hg.unrolled(*args, return_info=True)
            ref |= {"fd_seconds": time.perf_counter() - t0, "outer_loss_hg": info.outer_loss}
            ref |= {"outer_loss_torch_sgd": loss(raw), "fd": fd}
            refs[f"{point}/T={T}"] = ref | {"unrolled": un}
            for c in res:
                r = {"point": point, "T": T, "method": c.key, "ms": c.ms, "ms_all": c.ms_all}
                r |= {"rel_fd": H.relative_error(c.warm, fd), "cos_fd": H.cosine(c.warm, fd)}
                r |= {"rel_unrolled": H.relative_error(c.warm, un)}
                rows.append(r | {"cos_unrolled": H.cosine(c.warm, un)})
    return {"rows": rows, "references": refs}


def render_1b(res: dict[str, Any], repeats: int) -> str:
    refs = [f"`{k}`: {H.facts(r, ('fd', 'unrolled'))}" for k, r in res["references"].items()]
    cols = "point|T|method|rel_fd:.2e|cos_fd:.6f|rel_unrolled:.2e|cos_unrolled:.6f|ms:.1f"
    title = "1b. Trajectory methods vs 4th-order finite differences of the same SGD loop"
    what = f"ms = median of {repeats} interleaved calls."
    return H.section(title, what, H.bullets(refs), H.dict_table(res["rows"], cols))


def plain_run(data: H.Data, label: str, lr: float) -> H.Run:
    model, d = H.linear_model(data.dim), {"decay": torch.full((data.dim,), START_DECAY, dtype=F64)}
    loss = lambda: train_loss(model, d, data.train)  # noqa: E731
    return H.sgd_run(label, model.parameters(), loss, lr, model=model)


def outcome(run: H.Run, data: H.Data) -> dict[str, Any]:
    hopt, model = run.meta.get("hopt"), run.meta["model"]
    hist, hp = (hopt.history, hopt.hparams) if hopt else ([], {})
    with torch.no_grad():
        r = {"val": float(val_loss(model, 0, data.val))}
        r["test"] = float(val_loss(model, 0, data.test))
    r |= {"method": repr(hopt.method) if hopt else None, "seconds": run.seconds}
    r |= {"train_step_s": run.step_s, "hyper_step_total_s": run.hyper_s, "hyper_steps": len(hist)}
    r |= {"hyper_step_s": [x.seconds for x in hist], "hist_val_loss": [x.val_loss for x in hist]}
    r |= {"num_hvps": [x.diagnostics["num_hvps"] for x in hist if "num_hvps" in x.diagnostics]}
    r |= {"replay_error": [x.diagnostics.get("replay_error") for x in hist]}
    r |= {"final_decay": hp["decay"].tolist() if "decay" in hp else [START_DECAY] * data.dim}
    r |= {"lr_history": [float(x.hparams["lr"]) for x in hist if "lr" in x.hparams]}
    opt = hopt.inner_optimizer if hopt else run.meta["opt"]
    return r | {"final_lr": float(opt.param_groups[0]["lr"])}


def rounds_of(make_runs: Callable[[], list[H.Run]], data: H.Data, steps: int, rounds: int) -> dict:
    """``rounds`` repetitions of the runs in lockstep; per round and a summary per run."""
    runs, warned = H.rounds_of(make_runs, steps, rounds)
    per_round, summary = [{r.label: outcome(r, data) for r in rs} for rs in runs], {}
    for label, r0 in per_round[0].items():
        rs = [r[label] for r in per_round]
        s = {k: r0[k] for k in ("val", "test", "hyper_steps", "final_decay", "final_lr")}
        s["lr_history"] = r0["lr_history"]
        s |= {"max_round_diff": max(abs(r["val"] - r0["val"]) for r in rs)}
        s |= {"seconds": H.median([r["seconds"] for r in rs]), "num_hvps": H.median(r0["num_hvps"])}
        s |= {"hyper_step_ms": H.pooled_ms(r["hyper_step_s"] for r in rs)}
        s |= {"train_step_ms": H.pooled_ms(r["train_step_s"] for r in rs)}
        replay = [e for e in r0["replay_error"] if e is not None]
        summary[label] = s | {"max_replay_error": max(replay, default=None)}
    return {"per_round": per_round, "summary": summary, "warnings": warned, "steps": steps}


def exact_outer_loop(data: H.Data, iterations: int, keep_at: int) -> dict[str, Any]:
    """Adam on the log decays with exact hypergradients at Newton inner optima: ``val[k]`` /
    ``test[k]`` after k updates; ``decays[k]`` every 10 iterations, at ``keep_at`` and last."""
    (bce, f_batch), D = H.logistic(), data.dim
    f = lambda w, r: f_batch((w[:-1], w[-1]), r, data.train)  # noqa: E731
    g = lambda w, r, batch=data.val: bce((w[:-1], w[-1]), batch)  # noqa: E731
    t0, out = time.perf_counter(), {"val": [], "test": [], "decays": [], "elapsed_s": []}
    raw = torch.full((D,), math.log(START_DECAY), dtype=F64).requires_grad_(True)
    opt, w = torch.optim.Adam([raw], lr=OUTER_LR), torch.zeros(D + 1, dtype=F64)
    for k in range(iterations + 1):
        w = H.newton(lambda v: f(v, raw.detach()), w, 1e-12)[0]
        with torch.no_grad():
            out["val"].append(float(g(w, raw)))
            out["test"].append(float(g(w, raw, data.test)))
            keep = k % 10 == 0 or k in (keep_at, iterations)
            out["decays"].append(raw.exp().tolist() if keep else None)
        out["elapsed_s"].append(time.perf_counter() - t0)
        if k < iterations:
            raw.grad = hg.exact(f, g, w, raw.detach())
            opt.step()
    return out


def hyperoptimizer_tables(data: H.Data, steps: int, rounds: int, exact_steps: int) -> dict:
    adam = lambda hp: torch.optim.Adam(hp, lr=OUTER_LR)  # noqa: E731

    hopt = lambda k: make_hopt(k, data, decays(data.dim), HOPT_METHODS[k](), outer_optimizer=adam)  # noqa: E731
    untuned = "untuned (plain SGD, no hyper-steps)"
    runs = lambda: [plain_run(data, untuned, HOPT_LR), *map(hopt, HOPT_METHODS)]  # noqa: E731
    H.log("[2-3] HyperOptimizer runs")
    res, keep = rounds_of(runs, data, steps, rounds), max(steps // 10 - 1, 0)
    H.log(f"[3] exact outer loop, {exact_steps} iterations ...")
    res["exact"] = exact_outer_loop(data, max(exact_steps, steps // 10), keep)
    return res | {"exact_at": keep, "rounds": rounds}


def lr_table(data: H.Data, steps: int, rounds: int) -> dict[str, Any]:
    fixed = {"decay": torch.full((data.dim,), START_DECAY, dtype=F64)}
    kw = {"inner_lr": LR_START, "optimizer_hparams": {"lr": "lr"}}
    kw |= {"outer_optimizer": lambda hp: torch.optim.Adam(hp, lr=LR_OUTER_LR)}
    kw |= {"train_loss": lambda m, h, b: train_loss(m, fixed, b)}

    lr = lambda: {"lr": hg.Positive(torch.tensor(LR_START, dtype=F64))}  # noqa: E731
    runs = lambda: [  # noqa: E731
        plain_run(data, f"plain SGD, lr {LR_START:g}", LR_START),
        plain_run(data, f"plain SGD, lr {HOPT_LR:g} (Table 3's)", HOPT_LR),
        *(make_hopt(k, data, lr(), HOPT_METHODS[k](), **kw) for k in LR_METHODS),
    ]
    H.log("[4] learning-rate tuning")
    return rounds_of(runs, data, steps, rounds)


def render_cost(res: dict[str, Any]) -> str:
    s = res["summary"]
    plain = next(r for k, r in s.items() if k.startswith("untuned"))["train_step_ms"]
    rows = [r | {"method": k} for k, r in s.items() if not k.startswith("untuned")]
    for r in rows:
        r["per_training_step"] = r["hyper_step_ms"] / r["train_step_ms"]
        r["per_plain_step"] = r["hyper_step_ms"] / plain
    cols = "method|hyper_steps:d|num_hvps:g|hyper_step_ms:.2f|train_step_ms:.3f"
    return H.section(
        "2. Seconds per hyper-step relative to one training step (inner_steps=10)",
        f"{res['steps']} inner steps x {res['rounds']} round(s) in lockstep; plain step (bare "
        f"torch.optim.SGD): {H.fix(plain, 3)} ms.",
        H.dict_table(rows, cols + "|per_training_step:.1f|per_plain_step:.1f"),
    )


def render_outcome(res: dict[str, Any]) -> str:
    s, ex, k = res["summary"], res["exact"], res["exact_at"]
    u = next(r for lbl, r in s.items() if lbl.startswith("untuned"))["val"]
    rows = [r | {"run": lbl, "decays": r["final_decay"]} for lbl, r in s.items()]
    for i in (k, len(ex["val"]) - 1):
        row = {"run": f"exact outer loop (Newton inner), {i} updates", "val": ex["val"][i]}
        rows.append(row | {"test": ex["test"][i], "decays": ex["decays"][i]})
        rows[-1]["seconds"] = ex["elapsed_s"][i]
    for r in rows:
        r["gap_closed"] = (u - r["val"]) / (u - ex["val"][k])
        r["gap_closed_vs_long"] = (u - r["val"]) / (u - ex["val"][-1])
        d, mean = r["decays"], math.exp(sum(map(math.log, r["decays"])) / len(r["decays"]))
        r["decays"] = f"{min(d):.2g} / {mean:.2g} / {max(d):.2g}"
    best, test = min(ex["val"]), min(ex["test"])
    replays = [r["max_replay_error"] for r in s.values() if r["max_replay_error"] is not None]
    notes = [
        f"exact outer loop: val {ex['val'][0]:.5f} at the start; lowest val {best:.5f} (test "
        f"there {ex['test'][ex['val'].index(best)]:.5f}); lowest test {test:.5f} after "
        f"{ex['test'].index(test)} updates",
        f"largest difference of a final val loss between rounds: "
        f"{max(r['max_round_diff'] for r in s.values()):.1e}; largest replay error "
        f"{H.sci(max(replays, default=None), 1)}",
        *[f"warning: {w}" for w in res["warnings"]],
    ]
    cols = "run|val:.5f|test:.5f|gap_closed:.2f|gap_closed_vs_long:.2f|decays|seconds:.2f"
    return H.section(
        f"3. End to end: {res['steps']} inner steps (SGD lr {HOPT_LR}, inner_steps=10, outer "
        f"Adam lr {OUTER_LR}, decay from {START_DECAY})",
        f"gap closed = (untuned - run) / (untuned - exact outer loop after {k} updates, the same "
        "outer budget); `vs long`: after all updates; decays: min / geometric mean / max.",
        H.dict_table(rows, cols),
        H.bullets(notes),
    )


def render_lr(res: dict[str, Any]) -> str:
    rows, notes = [], [f"a step of the full Adam lr {LR_OUTER_LR} is x{math.exp(LR_OUTER_LR):.3f}"]
    for label, r in res["summary"].items():
        h = r["lr_history"]
        lrs = {"lr_1": h[0] if h else None, "lr_10": h[9] if h[9:] else None}
        rows.append(r | {"run": label} | lrs)
        notes += [f"{label}: lr x{h[-1] / h[-2]:.3f} at the last hyper-step"] if h[1:] else []
    diff = max(r["max_round_diff"] for r in res["summary"].values())
    notes += [f"largest difference of a final val loss between rounds: {diff:.1e}"]
    cols = "run|final_lr:.6g|lr_1:.3g|lr_10:.3g|val:.5f|test:.5f|hyper_step_ms:.2f|seconds:.2f"
    return H.section(
        f"4. Learning-rate tuning from lr {LR_START:g} ({res['steps']} inner steps, "
        f"inner_steps=10, outer Adam lr {LR_OUTER_LR}, decay fixed at {START_DECAY}); lr_1, "
        "lr_10: after 1 and 10 hyper-steps",
        H.dict_table(rows, cols),
        H.bullets(notes + [f"warning: {w}" for w in res["warnings"]]),
    )


def render(d: dict[str, Any]) -> list[str]:
    st, hopt = d["settings"], d["hyperoptimizer"]
    notes = [
        f"float64; Table 1 repeats {st['repeats']}, horizons {st['horizons']}; Tables 2-4: "
        f"{st['steps']} inner steps x {st['rounds']} round(s)",
        "per-feature L2 logistic regression on breast cancer (100 train / 200 validation / "
        "269 test), 30 log weight decays; rel. err = ||h - ref|| / ||ref||",
    ]
    out = [H.bullets(notes), render_1a(d["implicit"], st["repeats"])]
    out += [render_1b(d["trajectory"], st["repeats"]), render_cost(hopt), render_outcome(hopt)]
    return out + [render_lr(d["lr_tuning"])]


def plot(data: dict[str, Any], out: Path) -> Path:
    """Per method: hyper-step cost in training steps, and validation loss reached."""
    summary = data["hyperoptimizer"]["summary"]
    names = [n for n, r in summary.items() if r.get("hyper_step_ms")]
    ratio = [summary[n]["hyper_step_ms"] / summary[n]["train_step_ms"] for n in names]
    cost = {"bars": {"": ratio}, "ticks": names, "barh": True}
    cost["set"] = {"xscale": "log", "xlabel": "seconds per hyper-step / per training step"}
    val = {"bars": {"": [summary[n]["val"] for n in names]}, "ticks": names, "barh": True}
    val["vlines"] = {n: r["val"] for n, r in summary.items() if not r.get("hyper_step_ms")}
    lo = min(r["val"] for r in summary.values())
    val["set"] = {"xlabel": "validation loss after the run", "xlim": (0.9 * lo, None)}
    return H.figure(out / f"{NAME}.png", [cost, val], 2, (6, 4.5))


def run(args: Any, rep: H.Report) -> dict[str, Any]:
    q, data = args.quick, H.breast_cancer_data(args.seed)
    st = {k: getattr(args, k) for k in ("steps", "rounds", "repeats", "exact_steps")}
    st["horizons"] = [2] if q else [10, 50]
    g, lo, hi = torch.Generator().manual_seed(args.seed + 1), math.log(1e-3), math.log(1e-1)
    points = {"random": lo + (hi - lo) * torch.rand(data.dim, generator=g, dtype=F64)}
    if not q:
        points = {"start": torch.full((data.dim,), math.log(START_DECAY), dtype=F64)} | points
    steps, rounds, reps = st["steps"], st["rounds"], st["repeats"]
    out = {"settings": st | {"hparam_points": points}}
    out |= {"implicit": implicit_table(data, points, reps)}
    out |= {"trajectory": trajectory_table(data, points, st["horizons"], reps)}
    out |= {"hyperoptimizer": hyperoptimizer_tables(data, steps, rounds, st["exact_steps"])}
    return out | {"lr_tuning": lr_table(data, steps, rounds)}


OPTIONS = [
    H.option("--steps", 20, 300, type=int, help="inner steps of Tables 2-4"),
    H.option("--rounds", 1, 3, type=int, help="repetitions of Tables 2-4"),
    H.option("--repeats", 1, 7, type=int, help="timed calls in Table 1"),
    H.option("--exact-steps", 3, 300, type=int, help="long exact outer loop"),
]
main = H.entry(__doc__, NAME, TITLE, run, render, plot=plot, options=OPTIONS)

if __name__ == "__main__":
    main()
