"""Head-to-head with HippoTrainer 1.0.0: hypergradient accuracy, cost and training outcome.

(a) one hypergradient at two fixed points against the exact implicit one, every HippoTrainer
method against its own dense replay, its compat-layer twin and our native method; (b)
HippoTrainer's documented training loop end to end, in lockstep rounds. Run:
``python benchmarks/vs_hippotrainer.py [--quick]`` (HippoTrainer optional: its rows are skipped).
"""

import math
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

import harness as H
import hypergradient as hg
from hypergradient.compat import hippotrainer as compat

F64, NAME, TITLE = torch.float64, "vs_hippotrainer", "HippoTrainer 1.0.0 vs hypergradient"
LR, HYPER_LR, INNER_STEPS, LOG_WD0 = 0.5, 0.5, 10, -3.0  # HYPER_LR: part (a), stored only
A_CONFIGS = [("T1T2", {})] + [("Neumann", {"num_terms": n}) for n in (1, 5, 20)]
A_CONFIGS += [("HOAG", {"epsilon": e, "cg_max_iter": m}) for e, m in ((1e-4, 10), (1e-12, 31))]
A_CONFIGS += [("DRMAD", {"T": 10})]
B_CONFIGS = [("T1T2", {}), ("Neumann", {"num_terms": 5}), ("HOAG", {}), ("DRMAD", {"T": 10})]
IMPL_NAMES = {"theirs": "HippoTrainer", "compat": "hypergradient.compat"}
LOSS, BCE = H.linear_loss("log_wd", log=True), H.linear_loss()
NATIVE = {"T1T2": ("T1T2()", hg.T1T2), "HOAG": ("HOAG(maxiter=10)", lambda: hg.HOAG(maxiter=10))}
NATIVE["DRMAD"] = ("DrMAD()", hg.DrMAD)


def kw_str(kind: str, kw: dict[str, Any]) -> str:
    return f"{kind}(" + ", ".join(f"{k}={v:g}" for k, v in kw.items()) + ")"


def losses(data: H.Data) -> tuple:
    """``f``, ``g`` (both with the penalty: HippoTrainer's criterion) and ``f(p, h, batch)``."""
    _, _, f_batch = H.linear_losses(data)
    return (lambda p, h: f_batch(p, h, data.train)), (lambda p, h: f_batch(p, h, data.val)), f_batch


def init_state(dim: int) -> tuple[Tensor, ...]:
    """``nn.Linear(dim, 1)``'s default initialization under seed 0."""
    torch.manual_seed(0)
    return tuple(p.detach() for p in torch.nn.Linear(dim, 1).double().parameters())


def setup(module: Any, cls: str, kw: dict, data: H.Data, state: Any, hyper_lr: float, clone: bool):
    """A HippoTrainer-API object (theirs or the compat layer's) on an ``nn.Linear``; the criterion
    holds the hyperparameters and the model (HippoTrainer's pattern)."""
    model, bce = H.linear_model(data.dim, state), torch.nn.BCEWithLogitsLoss()
    hyper = {"log_wd": torch.full((data.dim,), LOG_WD0, dtype=F64)}

    def criterion(preds: Tensor, targets: Tensor) -> Tensor:
        w = model.weight.clone()[0] if clone else model.weight[0]
        return bce(preds, targets) + 0.5 * (hyper["log_wd"].exp() * w**2).sum()

    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loaders = {"train_loader": [data.train], "val_loader": [data.val], "criterion": criterion}
    kw = kw | {"hyper_lr": hyper_lr, "inner_steps": INNER_STEPS, "model": model, "optimizer": opt}
    hopt = getattr(module, cls)(hyper, **loaders, **kw)
    return SimpleNamespace(model=model, hyper=hyper, opt=opt, criterion=criterion, hopt=hopt)


def native(kind: str, kw: dict[str, Any]) -> tuple[str, hg.Method]:
    """Our method for one of HippoTrainer's (part (a) labels)."""
    if kind == "Neumann":
        n = kw["num_terms"]
        return f"hg.IFT(hg.Neumann({n}, alpha=lr={LR}))", hg.IFT(hg.Neumann(n, alpha=LR))
    if kind == "HOAG" and kw:
        m, e = kw["cg_max_iter"], kw["epsilon"]
        return f"hg.IFT(hg.CG({m}, tol=0, atol=sqrt({e:g})))", hg.IFT(hg.CG(m, 0.0, math.sqrt(e)))
    label, make = NATIVE[kind]
    return f"hg.{label}", make()


def their_cg(Hm: Tensor, b: Tensor, eps: float, maxiter: int, stab: float) -> tuple[Tensor, int]:
    """HippoTrainer 1.0.0's ``HOAG.conjugate_gradient`` on a dense matrix (``stab`` = its
    ``1e-8`` added to ``p'Ap`` and to ``||r||^2`` in the denominators)."""
    x, r = torch.zeros_like(b), b.clone()
    p, rs, it = r.clone(), r.dot(r), 0
    for it in range(1, maxiter + 1 if rs >= eps else 1):  # noqa: B007 (reported)
        Ap = Hm @ p
        alpha = rs / (p.dot(Ap) + stab)
        x, r = x + alpha * p, r - alpha * Ap
        rs, beta = r.dot(r), r.dot(r) / (rs + stab)
        if rs < eps:
            break
        p = r + beta * p
    return x, it


def checks(kind: str, kw: dict, h: Tensor, d: dict, exact: Tensor, ident: Tensor) -> str:
    """HippoTrainer's output against a dense replay of its own algorithm."""
    rel, J, gp = H.relative_error, d["J"], d["g_phi"]
    if kind == "T1T2":
        return f"T1T2 vs hg.Identity(1.0) (no lr factor) {rel(h, ident):.1e}"
    if kind == "Neumann":
        v, p, series, term = (d["g_theta"].clone() for _ in range(4))
        for _ in range(kw["num_terms"]):  # their recursion, and the textbook partial sum
            v, term = v - LR * d["H"] @ v, term - LR * d["H"] @ term
            p, series = LR * (p + v), series + term
        a, b = rel(h, gp - J.T @ p), rel(h, gp - J.T @ (LR * series))
        text = f"{kw_str(kind, kw)} vs its recursion p <- lr (p + v) replayed {a:.1e}; "
        return text + f"vs the Neumann partial sum {b:.1e}"
    if kind == "HOAG":
        out, replay = [], math.nan
        for stab in (1e-8, 0.0):  # theirs, and without its stabilizer
            x, it = their_cg(d["H"], d["g_theta"], kw["epsilon"], kw["cg_max_iter"], stab)
            r, e = float((d["g_theta"] - d["H"] @ x).norm()), rel(gp - J.T @ x, exact)
            out.append(f"+{stab:g}: {it} iterations, ||r|| {r:.1e}, rel. err {e:.1e}")
            replay = rel(h, gp - J.T @ x) if stab else replay  # theirs
        return f"{kw_str(kind, kw)} vs its CG replayed {replay:.1e}; " + "; ".join(out)
    spread, lo, hi = float(h.max() - h.min()), float(exact.min()), float(exact.max())
    text = f"DRMAD output: all entries equal {float(h[0]):.6g} (max - min {spread:.1e}); "
    return text + f"exact entries in [{lo:.3g}, {hi:.3g}]"


def hippo_case(module: Any, impl: str, kind: str, kw: dict, data: H.Data, state: Any) -> H.Case:
    s = setup(module, kind, kw, data, state, HYPER_LR, kind == "DRMAD")

    def prepare() -> None:
        with torch.no_grad():
            for p, v in zip(s.model.parameters(), state):
                p.copy_(v)
            s.hyper["log_wd"].fill_(LOG_WD0)
        s.opt.zero_grad()
        s.hyper["log_wd"].grad = None  # HippoTrainer's DRMAD accumulates into it
        if impl == "compat" and hasattr(s.hopt, "_x"):
            s.hopt._x = None  # no warm start: a first hyper-step, as HippoTrainer's HOAG

    def call(i: int) -> Tensor:
        s.hopt._hyperparams_requires_grad_(True)
        try:
            if impl == "theirs":
                return H.flat([g.detach() for g in s.hopt.hyper_grad(*s.hopt.evaluate())])
            return H.flat([g.detach() for g in s.hopt.hyper_grad_on_batches(data.train, data.val)])
        finally:
            s.hopt._hyperparams_requires_grad_(False)

    meta = {"impl": impl, "label": IMPL_NAMES[impl]}
    return H.Case(kw_str(kind, kw), call, prepare=prepare, meta=meta)


def native_case(kind: str, kw: dict, data: H.Data, state: Any, log_wd: Tensor) -> H.Case:
    f, g, f_batch = losses(data)
    if kind == "DRMAD":
        T, sgd = kw["T"], hg.optim.sgd(lr=LR)
        label = f"hg.drmad(steps={T}, hg.optim.sgd(lr={LR}))"
        call = lambda i: hg.drmad(f_batch, g, state, log_wd, T, sgd, batches=[data.train] * T)  # noqa: E731
    else:
        label, method = native(kind, kw)
        ctx = hg.Problem(f, g, state, log_wd, lr=LR, prev_params=state)
        call = lambda i: method(ctx)[0].reshape(-1)  # noqa: E731
    return H.Case(kw_str(kind, kw), call, meta={"impl": "native", "label": label})


def points(data: H.Data) -> dict[str, tuple[Tensor, ...]]:
    """``early``: 10 SGD steps from the initialization; ``optimum``: Newton's inner optimum."""
    f, s = losses(data)[0], setup(compat, "T1T2", {}, data, init_state(data.dim), HYPER_LR, False)
    crit = lambda: s.criterion(s.model(data.train[0]), data.train[1])  # noqa: E731
    for _ in range(INNER_STEPS):
        H.sgd_run("", s.model.parameters(), crit, LR).step()
    like = (torch.zeros(1, data.dim, dtype=F64), torch.zeros(1, dtype=F64))
    log_wd = torch.full((data.dim,), LOG_WD0, dtype=F64)
    t = H.newton(lambda v: f(H.unflat(v, like), log_wd), H.flat(like), 1e-12)[0]
    early = tuple(p.detach().clone() for p in s.model.parameters())
    return {"early": early, "optimum": tuple(x.clone() for x in H.unflat(t, like))}


def part_a(data: H.Data, ht: Any, repeats: int, quick: bool) -> dict[str, Any]:
    f, g, f_batch = losses(data)
    log_wd = torch.full((data.dim,), LOG_WD0, dtype=F64)
    out: dict[str, Any] = {"states": {}, "rows": [], "crash_probe": None, "checks": []}
    impls = [("theirs", ht)] * (ht is not None) + [("compat", compat)]
    for sname, state in points(data).items():
        H.log(f"[a] point {sname}")
        exact, info = hg.implicit(f, g, state, log_wd, hg.Exact(), return_info=True)
        exact, d = exact.reshape(-1), H.dense_pieces(f, g, state, log_wd)
        ev = torch.linalg.eigvalsh(d["H"])
        ident = hg.implicit(f, g, state, log_wd, hg.Identity(1.0))
        st = {"inner_grad_norm": info.inner_grad_norm, "val_criterion": info.outer_loss}
        st |= {"exact_norm": float(exact.norm()), "exact_vs_dense": H.relative_error(exact, d["h"])}
        out["states"][sname] = st | {"hessian_eig_min": ev[0], "hessian_eig_max": ev[-1]}
        for kind, kw in A_CONFIGS[::2] if quick else A_CONFIGS:
            cases = [hippo_case(m, impl, kind, kw, data, state) for impl, m in impls]
            res = H.interleave(cases + [native_case(kind, kw, data, state, log_wd)], repeats)
            unr = None
            if kind == "DRMAD":
                sgd, batches = hg.optim.sgd(lr=LR), [data.train] * kw["T"]
                unr = hg.unrolled(f_batch, g, state, log_wd, kw["T"], sgd, batches=batches)
            for t in res:
                r = t.row(point=sname, method=kind, kw=kw, **t.meta, traceback=t.traceback)
                for suffix, ref in [("", exact), ("_unrolled", unr)] if t.error is None else []:
                    if ref is not None:
                        r[f"rel_err{suffix}"] = H.relative_error(t.warm, ref)
                        r[f"cos{suffix}"] = H.cosine(t.warm, ref)
                out["rows"].append(r | {"h": t.warm})
            if ht is not None and res[0].error is None:
                out["checks"].append(f"{sname}: " + checks(kind, kw, res[0].warm, d, exact, ident))
        if ht is not None and sname == "early":  # their DRMAD with the plain criterion
            s = setup(ht, "DRMAD", {"T": 10}, data, state, HYPER_LR, clone=False)
            s.hopt._hyperparams_requires_grad_(True)
            call = lambda i, s=s: s.hopt.hyper_grad(*s.hopt.evaluate())  # noqa: E731
            probe = H.interleave([H.Case("probe", call)], 0)[0]
            out["crash_probe"] = {"crashed": probe.error is not None, "error": probe.error}
            out["crash_probe"]["traceback"] = probe.traceback
    return out


def make_runs(data: H.Data, ht: Any, hyper_lr: float) -> list[H.Run]:
    x, y = data.train

    def hippo_run(pair: str, impl: str, s: Any, label: str) -> H.Run:
        def step() -> None:  # HippoTrainer's documented loop body
            loss = s.criterion(s.model(x), y)
            loss.backward()
            s.hopt.step(loss)
            s.hopt.zero_grad()

        return H.Run(label, step, INNER_STEPS, {"pair": pair, "impl": impl, **vars(s)})

    runs, init = [], init_state(data.dim)
    for kind, kw in B_CONFIGS:
        pair = kw_str(kind, kw)
        for impl, module in [("theirs", ht)] * (ht is not None) + [("compat", compat)]:
            s = setup(module, kind, kw, data, init, hyper_lr, kind == "DRMAD")
            runs.append(hippo_run(pair, impl, s, f"{IMPL_NAMES[impl]} {pair}"))
        model, log_wd = H.linear_model(data.dim, init), torch.full((data.dim,), LOG_WD0, dtype=F64)
        label, method = native(kind, kw if kind != "HOAG" else {})
        kw = {"train_loss": LOSS, "val_loss": LOSS, "val_data": [data.val], "method": method}
        kw |= {"outer_optimizer": lambda hp, lr=hyper_lr: torch.optim.SGD(hp, lr=lr)}
        kw["inner_optimizer"] = torch.optim.SGD(model.parameters(), lr=LR)
        label = f"hg.HyperOptimizer {label}"
        runs.append(H.hopt_run(label, model, {"log_wd": log_wd}, data.train, INNER_STEPS, **kw))
        runs[-1].meta |= {"pair": pair, "impl": "native", "hyper": {"log_wd": log_wd}}
    if ht is not None:  # their DRMAD with the plain criterion: does it run?
        s = setup(ht, "DRMAD", {"T": 10}, data, init, hyper_lr, clone=False)
        label = "HippoTrainer DRMAD(T=10), plain criterion"
        runs.append(hippo_run("DRMAD(T=10)", "theirs", s, label))
    s = setup(compat, "T1T2", {}, data, init, hyper_lr, False)
    meta = {"pair": "-", "impl": "untuned", **vars(s)}
    loss, label = lambda: s.criterion(s.model(x), y), "untuned (plain SGD, log_wd = -3)"
    return runs + [H.sgd_run(label, s.model.parameters(), loss, LR, INNER_STEPS, **meta)]


def record(run: H.Run, data: H.Data, t: int) -> None:
    """A point of the curve (validation / test losses) every ``INNER_STEPS`` steps, untimed."""
    if t % INNER_STEPS:
        return
    m, lw = run.meta["model"], run.meta["hyper"]["log_wd"].detach()
    with torch.no_grad():
        val, test = (float(BCE(m, None, b)) for b in (data.val, data.test))
        pen = 0.5 * float((lw.exp() * m.weight[0] ** 2).sum())
    c = {"step": t, "seconds": run.seconds, "val_bce": val, "val_criterion": val + pen}
    run.meta.setdefault("curve", []).append(c | {"test_bce": test, "log_wd_mean": float(lw.mean())})


def instrument(run: H.Run, data: H.Data, hyper_lr: float) -> None:
    """Record, per hyper-step, the applied hypergradient against the exact one."""
    f, g, _ = losses(data)
    m, hyper, hopt, impl = run.meta["model"], run.meta["hyper"], run.meta["hopt"], run.meta["impl"]

    def note(h: Tensor, log_wd: Tensor) -> None:
        try:  # at the current parameters
            with H.recorded_warnings():  # silenced
                state = tuple(p.detach().clone() for p in m.parameters())
                ref = hg.implicit(f, g, state, log_wd, hg.Exact()).reshape(-1)
        except (hg.NonFiniteHypergradientError, RuntimeError, ValueError):
            ref = torch.full_like(log_wd, math.nan)  # diverged: no exact hypergradient
        run.meta.setdefault("cos", []).append(H.cosine(h, ref))
        run.meta.setdefault("rel", []).append(H.relative_error(h, ref))

    def hyper_step(*args: Any, **kwargs: Any) -> Any:
        before = hyper["log_wd"].detach().clone()
        out = original(*args, **kwargs)
        note(-(hyper["log_wd"].detach() - before) / hyper_lr, before)
        return out

    def step() -> None:
        before, n = hyper["log_wd"].detach().clone(), hopt.hyper_steps
        original()
        if hopt.hyper_steps > n:
            note(hopt.history[-1].hypergrad["log_wd"].reshape(-1), before)

    if impl in ("theirs", "compat"):
        original, hopt.hyper_step = hopt.hyper_step, hyper_step
    elif impl == "native":
        original, run.step = run.step, step


def diff(a: float, b: float) -> float:
    """``|a - b|``, with two NaNs counting as equal."""
    return 0.0 if (math.isnan(a) and math.isnan(b)) or a == b else abs(a - b)


def part_b(data: H.Data, ht: Any, steps: int, rounds: int, hyper_lr: float) -> dict[str, Any]:
    made = []

    def runs() -> list[H.Run]:  # the last round is instrumented (cosines), untimed
        made.append(make_runs(data, ht, hyper_lr))
        for r in made[-1] if len(made) == rounds + 1 else ():
            instrument(r, data, hyper_lr)
        return made[-1]

    H.log(f"[b] hyper_lr {hyper_lr}")
    per_round = H.rounds_of(runs, steps, rounds + 1, lambda r, t: record(r, data, t))[0]
    summary, inst = [], per_round.pop()
    for i, r in enumerate(per_round[0]):
        rs, ins = [x[i] for x in per_round], inst[i]
        c0, c1 = r.meta["curve"][0], r.meta["curve"][-1]
        secs = H.median([x.seconds for x in rs])
        finals = [x.meta["curve"][-1]["val_bce"] for x in rs]
        s = {"pair": r.meta["pair"], "impl": r.meta["impl"], "label": r.label, "error": r.error}
        s |= {"error_step": r.error_step, "traceback": r.traceback, "steps_done": c1["step"]}
        s |= {k: c1[k] for k in ("val_bce", "val_criterion", "test_bce", "log_wd_mean")}
        s |= {"val_bce_start": c0["val_bce"], "seconds": secs}
        s |= {"seconds_all": [x.seconds for x in rs], "step_ms": H.pooled_ms(x.step_s for x in rs)}
        s |= {"hyper_step_ms": H.pooled_ms(x.hyper_s for x in rs)}
        s |= {"val_drop_per_s": (c0["val_bce"] - c1["val_bce"]) / secs if secs > 0 else None}
        bad = [c["step"] for c in r.meta["curve"] if not math.isfinite(c["val_bce"])]
        s |= {"diverged_at_step": bad[0] if bad else None}
        s |= {"max_round_diff": max(diff(v, finals[0]) for v in finals)}
        s |= {"instrumented_matches": diff(ins.meta["curve"][-1]["val_bce"], finals[0]) <= 1e-12}
        cos, rel = ins.meta.get("cos", []), ins.meta.get("rel", [])
        s |= {"cos_exact": cos, "rel_err_exact": rel, "negative_cos": sum(c < 0 for c in cos)}
        s |= {"nonfinite_cos": sum(not math.isfinite(c) for c in cos), "curve": r.meta["curve"]}
        summary.append(s)
    return {"steps": steps, "rounds": rounds, "hyper_lr": hyper_lr, "summary": summary}


def render_a(res: dict[str, Any], repeats: int) -> str:
    rows, theirs = [], {}
    for r in res["rows"]:
        key = (r["point"], r["method"], str(r["kw"]))
        row = r | {"method": kw_str(r["method"], r["kw"]), "error": (r["error"] or "")[:80]}
        if r["impl"] == "theirs":
            theirs[key] = r
        elif (t := theirs.get(key)) and t["ms"] and r["ms"]:
            row["theirs/ours"] = f"{t['ms'] / r['ms']:.2f} ({t['cpu_ms'] / r['cpu_ms']:.2f})"
        rows.append(row)
    text = [f"`{k}`: {H.facts(v)}" for k, v in res["states"].items()] + res["checks"]
    if (probe := res["crash_probe"] or {}).get("crashed"):
        text.append(f"their DRMAD with the plain criterion at `early` raises: {probe['error']}")
    cols = "point|method|label|rel_err:.2e|cos:.6f|rel_err_unrolled:.2e|cos_unrolled:.4f|ms:.3g"
    head = "(a) One hypergradient at a fixed point vs the exact implicit hypergradient"
    note = f"ms = median of {repeats} interleaved calls; theirs/ours = ratio of median wall (CPU) "
    note += "times; `unrolled` = `hg.unrolled` through the same T steps."
    return H.section(head, note, H.bullets(text), H.dict_table(rows, cols + "|theirs/ours|error"))


def render_b(res: dict[str, Any]) -> str:
    s = res["summary"]
    untuned = next((r for r in s if r["impl"] == "untuned"), None)
    theirs = {r["pair"]: r for r in s if r["impl"] == "theirs" and not r["error"]}
    rows = []
    for r in s:
        if r["error"]:
            crash = f"crashed at step {r['error_step']}: {r['error'][:90]}"
            rows.append({"label": r["label"], "val_bce": crash})
            continue
        t, neg = theirs.get(r["pair"]), f"{r['negative_cos']}/{len(r['cos_exact'])}"
        neg += f" ({r['nonfinite_cos']} NaN)" if r["nonfinite_cos"] else ""
        row = r | {"cos < 0": neg, "median_cos": H.median(r["cos_exact"])}  # nulls skipped
        row["median_rel_err"] = H.median(r["rel_err_exact"])
        if r["diverged_at_step"] is not None:
            row["val_bce"] = f"NaN from step {r['diverged_at_step']}"
        if untuned is not None and r is not untuned:
            extra = r["seconds"] - untuned["seconds"]
            gain = untuned["val_bce"] - (r["val_bce"] or math.nan)
            row["gain_per_extra_s"] = gain / extra if extra > 0 else None
        if t is not None and r["impl"] in ("compat", "native"):
            row["theirs/ours"] = t["seconds"] / r["seconds"]
        rows.append(row)
    cols = "label|val_bce:.4f|val_criterion:.4f|test_bce:.4f|log_wd_mean:.3f|seconds:.3f"
    cols += "|step_ms:.3g|hyper_step_ms:.3g|val_drop_per_s:.2e|gain_per_extra_s:.2e"
    cols += "|cos < 0|median_cos:.3f|median_rel_err:.2e|theirs/ours:.2f"
    return (
        f"## (b) End to end: {res['steps']} steps of HippoTrainer's documented loop, inner_steps="
        f"{INNER_STEPS}, hyper_lr={res['hyper_lr']}, inner SGD lr {LR}\n\nMedian of {res['rounds']}"
        " round(s) in lockstep; cosines and errors against the exact implicit hypergradient per "
        f"hyper-step (an extra, instrumented round).\n\n{H.dict_table(rows, cols)}"
    )


def render(d: dict[str, Any]) -> list[str]:
    note = (
        "- float64; per-feature L2 logistic regression on breast cancer, 30 log weight decays "
        "from -3, the penalty inside the criterion (training and validation)"
    )
    return [note, render_a(d["a"], d["settings"]["repeats"]), *map(render_b, d["b"])]


def plot(data: dict[str, Any], out: Any) -> Any:
    """Validation loss against wall-clock per method pair and hyper_lr."""
    res, panels = data["b"], []
    pairs = [p for p in dict.fromkeys(r["pair"] for r in res[0]["summary"]) if p != "-"]
    fmt = {"theirs": "C3-", "compat": "C0-", "native": "C2--", "untuned": "k:"}
    for b, pair in [(b, pair) for b in res for pair in pairs]:
        runs = [r for r in b["summary"] if not r["error"] and r["pair"] in (pair, "-")]
        pts = {r["label"]: [(c["seconds"], c["val_bce"]) for c in r["curve"]] for r in runs}
        pts = {k: [(x, y) for x, y in v if not H.bad(y)] for k, v in pts.items()}
        lows = [y for v in pts.values() for _, y in v]
        finals = [r["val_bce"] for r in runs if not H.bad(r["val_bce"])]
        axes = {"title": f"{pair}, hyper_lr={b['hyper_lr']:g}", "xlabel": "seconds (sum of steps)"}
        axes |= {"ylabel": "validation BCE", "ylim": (0.97 * min(lows), 1.6 * max(finals))}
        fmts = {r["label"]: fmt[r["impl"]] for r in runs}
        panels.append({"lines": pts, "fmt": fmts, "set": axes})
    title = "HippoTrainer 1.0.0 (red) vs hypergradient (compat: blue, native: green)"
    return H.figure(out / f"{NAME}.png", panels, len(pairs), (4.6, 4), title)


def run(args: Any, rep: H.Report) -> dict[str, Any]:
    (ht, version), data = H.import_peer("hippotrainer"), H.breast_cancer_data(args.seed, True)
    rep.machine["hippotrainer"] = version if ht else None
    settings = {"lr": LR, "hyper_lrs": args.hyper_lr, "inner_steps": INNER_STEPS}
    settings |= {"log_wd0": LOG_WD0, "steps": args.steps, "rounds": args.rounds}
    result = {"settings": settings | {"repeats": args.repeats}}
    result |= {"hippotrainer_available": ht is not None}
    result["a"] = part_a(data, ht, args.repeats, args.quick)
    result["b"] = [part_b(data, ht, args.steps, args.rounds, lr) for lr in args.hyper_lr]
    return result


OPTIONS = [
    H.option("--steps", 20, 300, type=int, help="training steps of part (b)"),
    H.option("--rounds", 1, 3, type=int, help="timed rounds of part (b)"),
    H.option("--repeats", 1, 7, type=int, help="timed calls in part (a)"),
    H.option("--hyper-lr", [5.0], [5.0, 20.0], type=float, nargs="+", help="part (b)"),
]
main = H.entry(__doc__, NAME, TITLE, run, render, plot=plot, options=OPTIONS)

if __name__ == "__main__":
    main()
