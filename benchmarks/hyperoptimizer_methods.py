"""The HyperOptimizer's methods and the trajectory hypergradients: accuracy, cost, outcome.

Per-feature L2 logistic regression on breast cancer (float64): implicit methods at the inner
optimum vs the exact hypergradient (1a), trajectory methods vs finite differences (1b), seconds
per hyper-step in training steps (2), end to end vs the exact outer loop (3), learning-rate
tuning (4). Settings: benchmarks/README.md.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergradient as hg
from harness import Report, cli, log, median, problems, start
from harness import report as rp
from harness.problems import Data, breast_cancer_data, cosine, relative_error
from harness.runner import recorded_warnings, rotation, warning_texts


def newton(f: Callable[[Tensor], Tensor], theta: Tensor) -> Tensor:
    return problems.newton(f, theta, 1e-12)[0]


F64 = torch.float64
Params = tuple[Tensor, ...]
Batch = tuple[Tensor, Tensor]
BCE = F.binary_cross_entropy_with_logits

HOPT_LR = 0.5  # inner SGD learning rate of the HyperOptimizer runs (Tables 1a, 2, 3)
OUTER_LR = 0.1  # outer Adam learning rate (Tables 2, 3 and the exact loop)
START_DECAY = 1e-2
TRAJ_LR, TRAJ_MOMENTUM = 0.1, 0.9  # Table 1b
LR_START, LR_OUTER_LR = 1e-3, 0.2  # Table 4


# ============================================================================ data, losses


def functional_losses(
    data: Data,
) -> tuple[Callable[[Params, Tensor], Tensor], Callable[[Params, Tensor], Tensor]]:
    """``f(params, raw)`` and ``g(params, raw)`` with ``params = (weight (1, D), bias (1,))``,
    the shapes of ``nn.Linear(D, 1)``."""
    (xt, yt), (xv, yv) = data.train, data.val

    def f(params: Params, raw: Tensor) -> Tensor:
        W, b = params
        w = W.reshape(-1)
        return BCE(xt @ w + b, yt) + 0.5 * (raw.exp() * w**2).sum()

    def g(params: Params, raw: Tensor) -> Tensor:
        W, b = params
        return BCE(xv @ W.reshape(-1) + b, yv)

    return f, g


def module_train_loss(m: Any, h: dict[str, Tensor], batch: Batch) -> Tensor:
    """The HyperOptimizer's training loss: BCE plus the per-feature penalty ``h["decay"]``."""
    x, y = batch
    w = dict(m.named_parameters())["weight"].reshape(-1)
    return BCE(m(x).reshape(-1), y) + 0.5 * (h["decay"] * w**2).sum()


def module_val_loss(m: Any, h: dict[str, Tensor], batch: Batch) -> Tensor:
    x, y = batch
    return BCE(m(x).reshape(-1), y)


def model_loss(model: nn.Module, batch: Batch) -> float:
    with torch.no_grad():
        return float(BCE(model(batch[0]).reshape(-1), batch[1]))


def zero_model(dim: int) -> nn.Linear:
    torch.manual_seed(0)
    model = nn.Linear(dim, 1).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    return model


def hparam_points(dim: int, seed: int) -> dict[str, Tensor]:
    """The raw (log-decay) points of Table 1."""
    g = torch.Generator().manual_seed(seed + 1)
    lo, hi = math.log(1e-3), math.log(1e-1)
    return {
        "start": torch.full((dim,), math.log(START_DECAY), dtype=F64),
        "random": lo + (hi - lo) * torch.rand(dim, generator=g, dtype=F64),
    }


# ============================================================================ Table 1a


@dataclass
class ImplicitRow:
    point: str
    method: str
    num_hvps: list[int] = field(default_factory=list)
    status: list[str] = field(default_factory=list)
    rel: list[float] = field(default_factory=list)
    cos: list[float] = field(default_factory=list)
    ms: list[float] = field(default_factory=list)
    compute_vs_hopt: float = 0.0  # max relative difference, method.compute vs HyperOptimizer


def implicit_methods(repeats: int) -> dict[str, Callable[[int], hg.Method]]:
    """Label -> factory(seed) of a fresh method (HOAG and Nystrom keep state)."""
    return {
        "T1T2()": lambda s: hg.T1T2(),
        "IFT() = Neumann(10, alpha=lr=0.5)": lambda s: hg.IFT(),
        "IFT(CG(maxiter=20))": lambda s: hg.IFT(hg.CG(maxiter=20)),
        f"IFT(Nystrom(rank=10, rho=0.1)), median of seeds 0..{repeats - 1}": lambda s: hg.IFT(
            hg.Nystrom(rank=10, rho=0.1, seed=s)
        ),
        "HOAG(tol=1e-10, decay=1, maxiter=100)": lambda s: hg.HOAG(
            maxiter=100, tol=1e-10, decay=1.0, min_tol=1e-10
        ),
        "HOAG() at its first hyper-step (tol 0.1)": lambda s: hg.HOAG(),
    }


def hopt_hypergradient(
    data: Data, theta: Params, raw: Tensor, method: hg.Method
) -> tuple[Tensor, float, dict[str, Any]]:
    """One hyper-step of a HyperOptimizer whose model sits at ``theta``."""
    model = zero_model(data.dim)
    with torch.no_grad():
        model.weight.copy_(theta[0])
        model.bias.copy_(theta[1])
    decay = hg.Positive(torch.ones(data.dim, dtype=F64))
    with torch.no_grad():
        decay.raw.copy_(raw)
    hopt = hg.HyperOptimizer(
        model,
        {"decay": decay},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=HOPT_LR),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.0),
        train_loss=module_train_loss,
        val_loss=module_val_loss,
        val_data=data.val,
        method=method,
        inner_steps=1,
    )
    hopt.zero_grad()
    hopt.train_loss(data.train).backward()
    hopt.step(data.train)
    rec = hopt.history[-1]
    return rec.hypergrad["decay"].detach().clone(), rec.seconds, rec.diagnostics


def dense_reference(f: Callable, g: Callable, theta: Params, raw: Tensor) -> Tensor:
    """``-J^T H^{-1} grad_theta g`` with dense matrices, independently of hg."""
    D = raw.numel()

    def f_flat(t: Tensor, r: Tensor) -> Tensor:
        return f((t[:D].reshape(1, D), t[D:]), r)

    def g_flat(t: Tensor) -> Tensor:
        return g((t[:D].reshape(1, D), t[D:]), raw)

    t = torch.cat([theta[0].reshape(-1), theta[1].reshape(-1)])
    grad_t = torch.func.grad(f_flat, argnums=0)
    H = torch.func.jacrev(grad_t, argnums=0)(t, raw)
    J = torch.func.jacrev(grad_t, argnums=1)(t, raw)  # (P, m): d grad_theta f / d raw
    return -J.T @ torch.linalg.solve(H, torch.func.grad(g_flat)(t))


def implicit_table(data: Data, points: dict[str, Tensor], repeats: int) -> dict[str, Any]:
    f, g = functional_losses(data)
    D = data.dim
    factories = implicit_methods(repeats)
    rows: list[ImplicitRow] = []
    setups: dict[str, Any] = {}
    checks: list[str] = []
    for point, raw in points.items():
        log(f"[1a] {point}: Newton inner solve, exact reference ...")
        t = newton(
            lambda v, raw=raw: f((v[:D].reshape(1, D), v[D:]), raw), torch.zeros(D + 1, dtype=F64)
        )
        theta: Params = (t[:D].reshape(1, D).clone(), t[D:].clone())
        started = time.perf_counter()
        exact, info = hg.implicit(f, g, theta, raw, hg.Exact(), return_info=True)
        exact_ms = 1e3 * (time.perf_counter() - started)
        dense = dense_reference(f, g, theta, raw)
        H = torch.func.hessian(lambda v, raw=raw: f((v[:D].reshape(1, D), v[D:]), raw))(t)
        eig = torch.linalg.eigvalsh(H)
        setups[point] = {
            "decay_min": float(raw.exp().min()),
            "decay_max": float(raw.exp().max()),
            "inner_grad_norm": info.inner_grad_norm,
            "val_loss_at_optimum": info.outer_loss,
            "hessian_lambda_min": float(eig[0]),
            "hessian_lambda_max": float(eig[-1]),
            "exact_norm": float(exact.norm()),
            "exact_ms": exact_ms,
            "exact_vs_dense_rel": relative_error(exact, dense),
        }
        point_rows = {label: ImplicitRow(point, label) for label in factories}
        labels = list(factories)
        for rep in range(repeats):
            for label in rotation(labels, rep):
                h, seconds, diag = hopt_hypergradient(data, theta, raw, factories[label](rep))
                row = point_rows[label]
                row.ms.append(1e3 * seconds)
                row.rel.append(relative_error(h, exact))
                row.cos.append(cosine(h, exact))
                row.num_hvps.append(int(diag.get("num_hvps", 0)))
                row.status.append(str(diag.get("status", "")))
                ctx = hg.Problem(
                    inner_loss=f,
                    outer_loss=g,
                    params=theta,
                    hparams=raw,
                    lr=HOPT_LR,
                    prev_params=theta,
                )
                direct, _ = factories[label](rep)(ctx)
                row.compute_vs_hopt = max(row.compute_vs_hopt, relative_error(direct, h))
        rows += point_rows.values()
        t1t2 = hg.T1T2()(
            hg.Problem(
                inner_loss=f, outer_loss=g, params=theta, hparams=raw, lr=HOPT_LR, prev_params=theta
            )
        )[0]
        ident = hg.implicit(f, g, theta, raw, hg.Identity(HOPT_LR))
        worst = max(point_rows.values(), key=lambda r: r.compute_vs_hopt)
        checks.append(
            f"{point}: hg.Exact vs independent dense solve (rel. diff) "
            f"{setups[point]['exact_vs_dense_rel']:.1e}; method(Problem) on "
            "functional losses vs the HyperOptimizer's hypergradient: worst rel. diff "
            f"{worst.compute_vs_hopt:.1e} ({worst.method}); T1T2 vs "
            f"hg.implicit(Identity(0.5)) rel. diff {relative_error(t1t2, ident):.1e}"
        )
    return {"setups": setups, "rows": rows, "checks": checks}


def markdown_implicit(res: dict[str, Any], repeats: int) -> str:
    lines = [
        "## 1a. Implicit methods at the inner optimum vs the exact implicit hypergradient",
        "",
        "Hypergradient w.r.t. the 30 log weight decays computed by one `hopt.step` of a "
        "HyperOptimizer whose model sits at the Newton optimum (inner SGD lr 0.5); reference "
        f"`hg.implicit(..., hg.Exact())`. ms = median `history[-1].seconds` of {repeats} "
        "interleaved calls.",
        "",
    ]
    for point, s in res["setups"].items():
        lines.append(
            f"- `{point}`: decay in [{s['decay_min']:.1e}, {s['decay_max']:.1e}]; "
            f"||grad f|| = {s['inner_grad_norm']:.1e}; Hessian eigenvalues in "
            f"[{s['hessian_lambda_min']:.3g}, {s['hessian_lambda_max']:.3g}]; "
            f"||h*|| = {s['exact_norm']:.3e}; val loss {s['val_loss_at_optimum']:.4f}; "
            f"hg.Exact took {s['exact_ms']:.1f} ms"
        )
    lines += [
        "",
        "| point | method | hvps | status | rel. err | cos | ms |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for r in res["rows"]:
        hvps = sorted(set(r.num_hvps))
        lines.append(
            f"| {r.point} | {r.method} | {'/'.join(map(str, hvps))} | "
            f"{'/'.join(sorted(set(r.status))) or '-'} | {median(r.rel):.2e} | "
            f"{median(r.cos):.6f} | {median(r.ms):.2f} |"
        )
    lines += ["", "Checks:", ""] + [f"- {c}" for c in res["checks"]]
    return "\n".join(lines)


# ============================================================================ Table 1b


def sgd_loop_loss(f: Callable, g: Callable, raw: Tensor, T: int, dim: int) -> float:
    """``g(theta_T)`` after T steps of ``torch.optim.SGD`` (lr 0.1, momentum 0.9) from 0."""
    W = torch.zeros(1, dim, dtype=F64, requires_grad=True)
    b = torch.zeros(1, dtype=F64, requires_grad=True)
    opt = torch.optim.SGD([W, b], lr=TRAJ_LR, momentum=TRAJ_MOMENTUM)
    for _ in range(T):
        opt.zero_grad()
        f((W, b), raw).backward()
        opt.step()
    with torch.no_grad():
        return float(g((W, b), raw))


def finite_differences(
    f: Callable, g: Callable, raw: Tensor, T: int, dim: int, fourth_order: bool, h: float
) -> Tensor:
    out = torch.zeros_like(raw)
    for i in range(raw.numel()):
        e = torch.zeros_like(raw)
        e[i] = h

        def at(k: float, e: Tensor = e) -> float:
            return sgd_loop_loss(f, g, raw + k * e, T, dim)

        if fourth_order:
            out[i] = (-at(2) + 8 * at(1) - 8 * at(-1) + at(-2)) / (12 * h)
        else:
            out[i] = (at(1) - at(-1)) / (2 * h)
    return out


def trajectory_table(
    data: Data, points: dict[str, Tensor], horizons: Sequence[int], repeats: int
) -> dict[str, Any]:
    f, g = functional_losses(data)
    D = data.dim
    theta0: Params = (torch.zeros(1, D, dtype=F64), torch.zeros(1, dtype=F64))
    opt = hg.optim.sgd(lr=TRAJ_LR, momentum=TRAJ_MOMENTUM)
    rows: list[dict[str, Any]] = []
    refs: dict[str, Any] = {}
    for point, raw in points.items():
        for T in horizons:
            log(f"[1b] {point}, T={T}: finite differences ...")
            started = time.perf_counter()
            fd = finite_differences(f, g, raw, T, D, fourth_order=True, h=1e-3)
            fd2 = finite_differences(f, g, raw, T, D, fourth_order=False, h=1e-4)
            fd_seconds = time.perf_counter() - started
            ks = sorted({k for k in (1, 5, T // 2) if 0 < k < T})
            calls: dict[str, Callable[[], Tensor]] = {
                "hg.unrolled": lambda T=T, raw=raw: hg.unrolled(f, g, theta0, raw, T, opt)
            }
            for K in ks:
                calls[f"hg.unrolled(truncate={K})"] = lambda T=T, raw=raw, K=K: hg.unrolled(
                    f, g, theta0, raw, T, opt, truncate=K
                )
            calls["hg.forward_mode"] = lambda T=T, raw=raw: hg.forward_mode(
                f, g, theta0, raw, T, opt
            )
            calls["hg.drmad"] = lambda T=T, raw=raw: hg.drmad(f, g, theta0, raw, T, opt)
            labels = list(calls)
            results: dict[str, Tensor] = {}
            ms: dict[str, list[float]] = {k: [] for k in labels}
            for rep in range(repeats):
                for label in rotation(labels, rep):
                    started = time.perf_counter()
                    results[label] = calls[label]()
                    ms[label].append(1e3 * (time.perf_counter() - started))
            _, info = hg.unrolled(f, g, theta0, raw, T, opt, return_info=True)
            final_loss = sgd_loop_loss(f, g, raw, T, D)
            un = results["hg.unrolled"]
            refs[f"{point}/T={T}"] = {
                "fd_norm": float(fd.norm()),
                "fd4_vs_fd2_rel": relative_error(fd2, fd),
                "fd_seconds": fd_seconds,
                "outer_loss_hg": info.outer_loss,
                "outer_loss_torch_sgd": final_loss,
                "fd": fd.tolist(),
                "unrolled": un.tolist(),
            }
            for label in labels:
                h = results[label]
                rows.append(
                    {
                        "point": point,
                        "T": T,
                        "method": label,
                        "rel_fd": relative_error(h, fd),
                        "cos_fd": cosine(h, fd),
                        "rel_unrolled": relative_error(h, un),
                        "cos_unrolled": cosine(h, un),
                        "ms": median(ms[label]),
                        "ms_all": ms[label],
                    }
                )
    return {"rows": rows, "references": refs}


def markdown_trajectory(res: dict[str, Any], repeats: int) -> str:
    lines = [
        "## 1b. Trajectory methods vs finite differences of the same loop",
        "",
        f"T steps of SGD (lr {TRAJ_LR}, momentum {TRAJ_MOMENTUM}, full batch) from theta = 0; "
        "reference: 4th-order central finite differences (step 1e-3 in log decay, all 30 "
        "coordinates) of the loop run with `torch.optim.SGD`. ms = median of "
        f"{repeats} interleaved calls.",
        "",
    ]
    for key, r in res["references"].items():
        lines.append(
            f"- `{key}`: ||FD|| = {r['fd_norm']:.3e}; FD 4th order (h=1e-3) vs 2nd order "
            f"(h=1e-4): {r['fd4_vs_fd2_rel']:.1e}; g(theta_T): hg {r['outer_loss_hg']:.15f}, "
            f"torch.optim.SGD {r['outer_loss_torch_sgd']:.15f}"
        )
    lines += [
        "",
        "| point | T | method | rel. err vs FD | cos vs FD | rel. err vs unrolled | "
        "cos vs unrolled | ms |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['point']} | {r['T']} | {r['method']} | {r['rel_fd']:.2e} | "
            f"{r['cos_fd']:.6f} | {r['rel_unrolled']:.2e} | {r['cos_unrolled']:.6f} | "
            f"{r['ms']:.1f} |"
        )
    return "\n".join(lines)


# ============================================================================ runs in lockstep


@dataclass
class Run:
    """One training run advanced one inner step at a time (HyperOptimizer or plain SGD)."""

    label: str
    model: nn.Linear
    batch: Batch
    hopt: hg.HyperOptimizer | None = None
    optimizer: torch.optim.Optimizer | None = None
    plain_loss: Callable[[nn.Module, Batch], Tensor] | None = None
    train_step_s: list[float] = field(default_factory=list)
    hyper_step_total_s: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def step(self) -> None:
        started = time.perf_counter()
        if self.hopt is not None:
            n = len(self.hopt.history)
            self.hopt.zero_grad()
            self.hopt.train_loss(self.batch).backward()
            self.hopt.step(self.batch)
            hyper = len(self.hopt.history) > n
        else:
            assert self.optimizer is not None and self.plain_loss is not None
            self.optimizer.zero_grad()
            self.plain_loss(self.model, self.batch).backward()
            self.optimizer.step()
            hyper = False
        dt = time.perf_counter() - started
        self.seconds += dt
        (self.hyper_step_total_s if hyper else self.train_step_s).append(dt)


def run_lockstep(runs: list[Run], steps: int) -> list[str]:
    """Advance every run ``steps`` inner steps, one step each in a rotating order.

    Returns the distinct warning messages raised."""
    with recorded_warnings() as caught:
        for s in range(steps):
            for run in rotation(runs, s):
                run.step()
    return warning_texts(caught)


def decay_hopt(data: Data, label: str, method: hg.Method) -> Run:
    model = zero_model(data.dim)
    decay = hg.Positive(torch.full((data.dim,), START_DECAY, dtype=F64))
    hopt = hg.HyperOptimizer(
        model,
        {"decay": decay},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=HOPT_LR),
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=OUTER_LR),
        train_loss=module_train_loss,
        val_loss=module_val_loss,
        val_data=data.val,
        method=method,
        inner_steps=10,
    )
    return Run(label, model, data.train, hopt=hopt)


def plain_run(data: Data, label: str, lr: float, decay: float) -> Run:
    model = zero_model(data.dim)
    d = torch.full((data.dim,), decay, dtype=F64)

    def loss(m: nn.Module, batch: Batch) -> Tensor:
        return module_train_loss(m, {"decay": d}, batch)

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return Run(label, model, data.train, optimizer=opt, plain_loss=loss)


def hopt_methods() -> list[tuple[str, hg.Method]]:
    """(label, fresh method) for Tables 2 and 3; the JSON keeps each method's repr."""
    return [
        ("T1T2()", hg.T1T2()),
        ("IFT() (Neumann 10, alpha=lr)", hg.IFT()),
        ("IFT(CG(maxiter=20))", hg.IFT(hg.CG(maxiter=20))),
        ("IFT(Nystrom(rank=10, rho=0.1, seed=0))", hg.IFT(hg.Nystrom(rank=10, rho=0.1, seed=0))),
        ("HOAG()", hg.HOAG()),
        ("Unrolled()", hg.Unrolled()),
        ("Unrolled(truncate=5)", hg.Unrolled(truncate=5)),
        ("ForwardMode()", hg.ForwardMode()),
        ("DrMAD()", hg.DrMAD()),
    ]


def exact_outer_loop(data: Data, iterations: int, keep_at: int) -> dict[str, Any]:
    """``_exact_optimum_val_loss`` of the tests, recording every outer iteration.

    ``val[k]`` / ``test[k]``: losses at the Newton inner optimum after k Adam updates;
    ``decays[k]`` is kept every 10 iterations, at ``keep_at`` and at the last one."""
    D = data.dim
    (xt, yt), (xv, yv), (xs, ys) = data.train, data.val, data.test

    def f(w: Tensor, r: Tensor) -> Tensor:
        return BCE(xt @ w[:-1] + w[-1], yt) + 0.5 * (r.exp() * w[:-1] ** 2).sum()

    def g(w: Tensor, r: Tensor) -> Tensor:
        return BCE(xv @ w[:-1] + w[-1], yv)

    started = time.perf_counter()
    raw = torch.log(torch.full((D,), START_DECAY, dtype=F64)).requires_grad_(True)
    opt = torch.optim.Adam([raw], lr=OUTER_LR)
    w = torch.zeros(D + 1, dtype=F64)
    val, test, decays, elapsed = [], [], [], []
    for k in range(iterations + 1):
        w = newton(lambda v: f(v, raw.detach()), w)
        with torch.no_grad():
            val.append(float(g(w, raw)))
            test.append(float(BCE(xs @ w[:-1] + w[-1], ys)))
            decays.append(
                raw.detach().exp().tolist() if k % 10 == 0 or k in (keep_at, iterations) else None
            )
        elapsed.append(time.perf_counter() - started)
        if k < iterations:
            raw.grad = hg.exact(f, g, w, raw.detach())
            opt.step()
    return {"val": val, "test": test, "decays": decays, "elapsed_s": elapsed}


def hyperoptimizer_tables(data: Data, steps: int, rounds: int, exact_steps: int) -> dict[str, Any]:
    per_round: list[dict[str, dict[str, Any]]] = []
    warned: set[str] = set()
    for rnd in range(rounds):
        log(f"[2-3] round {rnd + 1}/{rounds}: {len(hopt_methods()) + 1} runs x {steps} steps ...")
        runs = [plain_run(data, "untuned (plain SGD, no hyper-steps)", HOPT_LR, START_DECAY)]
        runs += [decay_hopt(data, label, m) for label, m in hopt_methods()]
        warned.update(run_lockstep(runs, steps))
        out: dict[str, dict[str, Any]] = {}
        for run in runs:
            hist = run.hopt.history if run.hopt is not None else []
            diag_hvps = [r.diagnostics.get("num_hvps") for r in hist]
            replay = [r.diagnostics.get("replay_error") for r in hist]
            out[run.label] = {
                "method": repr(run.hopt.method) if run.hopt is not None else None,
                "val": model_loss(run.model, data.val),
                "test": model_loss(run.model, data.test),
                "seconds": run.seconds,
                "train_step_s": run.train_step_s,
                "hyper_step_s": [r.seconds for r in hist],
                "hyper_step_total_s": run.hyper_step_total_s,
                "hyper_steps": len(hist),
                "num_hvps": [h for h in diag_hvps if h is not None],
                "replay_error": [e for e in replay if e is not None],
                "hist_val_loss": [r.val_loss for r in hist],
                "final_decay": (
                    run.hopt.hparams["decay"].tolist()
                    if run.hopt is not None
                    else [START_DECAY] * data.dim
                ),
            }
        per_round.append(out)
    n_hyper = steps // 10
    log(f"[3] exact outer loop, {exact_steps} iterations ...")
    exact = exact_outer_loop(data, max(exact_steps, n_hyper), keep_at=max(n_hyper - 1, 0))
    labels = list(per_round[0])
    summary: dict[str, dict[str, Any]] = {}
    for label in labels:
        rs = [r[label] for r in per_round]
        summary[label] = {
            "val": rs[0]["val"],
            "test": rs[0]["test"],
            "max_round_diff": max(abs(r["val"] - rs[0]["val"]) for r in rs),
            "seconds": median([r["seconds"] for r in rs]),
            "hyper_step_ms": 1e3 * median([s for r in rs for s in r["hyper_step_s"]]),
            "train_step_ms": 1e3 * median([s for r in rs for s in r["train_step_s"]]),
            "hyper_steps": rs[0]["hyper_steps"],
            "num_hvps": median([float(h) for h in rs[0]["num_hvps"]]),
            "max_replay_error": max(rs[0]["replay_error"], default=None),
            "final_decay": rs[0]["final_decay"],
        }
    return {
        "per_round": per_round,
        "summary": summary,
        "exact": exact,
        "exact_at": max(n_hyper - 1, 0),
        "warnings": sorted(warned),
        "steps": steps,
        "rounds": rounds,
    }


def markdown_cost(res: dict[str, Any]) -> str:
    s = res["summary"]
    untuned = next(k for k in s if k.startswith("untuned"))
    plain_ms = s[untuned]["train_step_ms"]
    lines = [
        "## 2. Seconds per hyper-step relative to one training step (inner_steps=10)",
        "",
        f"{res['steps']} inner steps x {res['rounds']} round(s), all runs in lockstep. "
        "hyper-step = median `history[i].seconds`; training step = median time of "
        "`zero_grad` + forward + backward + `hopt.step` over the steps without a hyper-step; "
        f"plain step = the same with a bare `torch.optim.SGD` (untuned run): {plain_ms:.3f} ms.",
        "",
        "| method | hyper-steps | hvps / hyper-step | hyper-step ms | training step ms | "
        "hyper-step / training step | hyper-step / plain step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in s.items():
        if label == untuned:
            continue
        hvps = "-" if math.isnan(r["num_hvps"]) else f"{r['num_hvps']:g}"
        lines.append(
            f"| {label} | {r['hyper_steps']} | {hvps} | {r['hyper_step_ms']:.2f} | "
            f"{r['train_step_ms']:.3f} | {r['hyper_step_ms'] / r['train_step_ms']:.1f} | "
            f"{r['hyper_step_ms'] / plain_ms:.1f} |"
        )
    return "\n".join(lines)


def markdown_outcome(res: dict[str, Any]) -> str:
    s = res["summary"]
    ex = res["exact"]
    k = res["exact_at"]
    untuned = next(lbl for lbl in s if lbl.startswith("untuned"))
    u = s[untuned]["val"]
    e_k, e_long = ex["val"][k], ex["val"][-1]
    n_long = len(ex["val"]) - 1
    best = min(ex["val"])
    lines = [
        f"## 3. End to end: {res['steps']} inner steps (SGD lr {HOPT_LR}, inner_steps=10, "
        f"outer Adam lr {OUTER_LR}, decay from {START_DECAY})",
        "",
        "val = BCE on the 200 validation examples (no penalty), test = BCE on the 269 held-out "
        "examples, after the last inner step. gap closed = (untuned - method) / (untuned - "
        f"exact), with exact = the exact outer loop after {k} updates (same outer budget); "
        f"`vs long` uses the exact loop after {n_long} updates instead. wall s = sum of the "
        "run's step times (median over rounds).",
        "",
        "| run | val loss | test loss | gap closed | gap closed vs long | final decays "
        "(min / geo. mean / max) | wall s |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]

    def decays(d: Sequence[float]) -> str:
        geo = math.exp(sum(math.log(x) for x in d) / len(d))
        return f"{min(d):.2g} / {geo:.2g} / {max(d):.2g}"

    for label, r in s.items():
        gap = (u - r["val"]) / (u - e_k)
        gap_long = (u - r["val"]) / (u - e_long)
        lines.append(
            f"| {label} | {r['val']:.5f} | {r['test']:.5f} | {gap:.2f} | {gap_long:.2f} | "
            f"{decays(r['final_decay'])} | {r['seconds']:.2f} |"
        )
    lines.append(
        f"| exact outer loop (Newton inner), {k} updates | {e_k:.5f} | {ex['test'][k]:.5f} | "
        f"1.00 | {(u - e_k) / (u - e_long):.2f} | {decays(ex['decays'][k])} | "
        f"{ex['elapsed_s'][k]:.2f} |"
    )
    lines.append(
        f"| exact outer loop (Newton inner), {n_long} updates | {e_long:.5f} | "
        f"{ex['test'][-1]:.5f} | {(u - e_long) / (u - e_k):.2f} | 1.00 | "
        f"{decays(ex['decays'][-1])} | {ex['elapsed_s'][-1]:.2f} |"
    )
    diff = max(r["max_round_diff"] for r in s.values())
    lines += [
        "",
        f"- exact outer loop: val {ex['val'][0]:.5f} at decay {START_DECAY}; lowest val "
        f"{best:.5f} over {n_long} updates (test there "
        f"{ex['test'][ex['val'].index(best)]:.5f}); test loss is lowest "
        f"({min(ex['test']):.5f}) after {ex['test'].index(min(ex['test']))} updates.",
        f"- largest difference of a final val loss between rounds: {diff:.1e}",
    ]
    replays = [r["max_replay_error"] for r in s.values() if r["max_replay_error"] is not None]
    if replays:
        lines.append(f"- trajectory methods: largest replay error {max(replays):.1e}")
    if res["warnings"]:
        lines += ["- warnings:"] + [f"  - {w}" for w in res["warnings"]]
    return "\n".join(lines)


# ============================================================================ Table 4


def lr_hopt(data: Data, label: str, method: hg.Method) -> tuple[Run, hg.Positive]:
    model = zero_model(data.dim)
    lr = hg.Positive(torch.tensor(LR_START, dtype=F64))
    decay = torch.full((data.dim,), START_DECAY, dtype=F64)

    def train_loss(m: Any, h: dict[str, Tensor], batch: Batch) -> Tensor:
        return module_train_loss(m, {"decay": decay}, batch)

    hopt = hg.HyperOptimizer(
        model,
        {"lr": lr},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=LR_START),
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=LR_OUTER_LR),
        train_loss=train_loss,
        val_loss=module_val_loss,
        val_data=data.val,
        method=method,
        inner_steps=10,
        optimizer_hparams={"lr": "lr"},
    )
    return Run(label, model, data.train, hopt=hopt), lr


def lr_table(data: Data, steps: int, rounds: int) -> dict[str, Any]:
    per_round: list[dict[str, dict[str, Any]]] = []
    warned: set[str] = set()
    for rnd in range(rounds):
        log(f"[4] round {rnd + 1}/{rounds} ...")
        runs = [
            plain_run(data, f"plain SGD, lr {LR_START:g}", LR_START, START_DECAY),
            plain_run(data, f"plain SGD, lr {HOPT_LR:g} (Table 3's)", HOPT_LR, START_DECAY),
        ]
        lrs: dict[str, hg.Positive | None] = {r.label: None for r in runs}
        for label, method in (
            ("ForwardMode()", hg.ForwardMode()),
            ("Unrolled()", hg.Unrolled()),
            ("DrMAD()", hg.DrMAD()),
        ):
            run, lr = lr_hopt(data, label, method)
            runs.append(run)
            lrs[run.label] = lr
        warned.update(run_lockstep(runs, steps))
        out: dict[str, dict[str, Any]] = {}
        for run in runs:
            lr = lrs[run.label]
            hist = run.hopt.history if run.hopt is not None else []
            assert run.hopt is None or float(
                run.hopt.inner_optimizer.param_groups[0]["lr"]
            ) == float(lr.value)  # type: ignore[union-attr]
            out[run.label] = {
                "final_lr": float(lr.value)
                if lr is not None
                else float(run.optimizer.param_groups[0]["lr"]),  # type: ignore[union-attr]
                "lr_history": [float(r.hparams["lr"]) for r in hist],
                "val": model_loss(run.model, data.val),
                "test": model_loss(run.model, data.test),
                "seconds": run.seconds,
                "hyper_step_s": [r.seconds for r in hist],
                "hist_val_loss": [r.val_loss for r in hist],
            }
        per_round.append(out)
    summary = {
        label: {
            "final_lr": per_round[0][label]["final_lr"],
            "lr_history": per_round[0][label]["lr_history"],
            "val": per_round[0][label]["val"],
            "test": per_round[0][label]["test"],
            "max_round_diff": max(
                abs(r[label]["val"] - per_round[0][label]["val"]) for r in per_round
            ),
            "hyper_step_ms": 1e3 * median([s for r in per_round for s in r[label]["hyper_step_s"]]),
            "seconds": median([r[label]["seconds"] for r in per_round]),
        }
        for label in per_round[0]
    }
    return {"per_round": per_round, "summary": summary, "warnings": sorted(warned), "steps": steps}


def markdown_lr(res: dict[str, Any]) -> str:
    lines = [
        f"## 4. Learning-rate tuning from lr {LR_START:g} ({res['steps']} inner steps, "
        f"inner_steps=10, outer Adam lr {LR_OUTER_LR}, decay fixed at {START_DECAY})",
        "",
        '`hparams={"lr": hg.Positive(1e-3)}`, `optimizer_hparams={"lr": "lr"}`; val/test loss '
        "after the last step; lr after hyper-steps 1, 10 and the last.",
        "",
        "| run | final lr | lr after 1 / 10 hyper-steps | val loss | test loss | "
        "hyper-step ms | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in res["summary"].items():
        hist = r["lr_history"]
        early = f"{hist[0]:.3g} / {hist[min(9, len(hist) - 1)]:.3g}" if hist else "-"
        hs = "-" if math.isnan(r["hyper_step_ms"]) else f"{r['hyper_step_ms']:.2f}"
        lines.append(
            f"| {label} | {r['final_lr']:.6g} | {early} | {r['val']:.5f} | {r['test']:.5f} | "
            f"{hs} | {r['seconds']:.2f} |"
        )
    diff = max(r["max_round_diff"] for r in res["summary"].values())
    lines.append("")
    for label, r in res["summary"].items():
        hist = r["lr_history"]
        if len(hist) >= 2:
            lines.append(
                f"- {label}: lr x{hist[-1] / hist[-2]:.3f} at the last hyper-step (a step of "
                f"the full Adam lr {LR_OUTER_LR} on log lr is x{math.exp(LR_OUTER_LR):.3f})"
            )
    lines.append(f"- largest difference of a final val loss between rounds: {diff:.1e}")
    if res["warnings"]:
        lines += ["- warnings:"] + [f"  - {w}" for w in res["warnings"]]
    return "\n".join(lines)


# ============================================================================ main


def main(argv: Sequence[str] | None = None) -> int:
    p = cli(__doc__)
    p.add_argument("--steps", type=int, help="inner steps of Tables 2-4 (default 300, quick 20)")
    p.add_argument("--rounds", type=int, help="repetitions of Tables 2-4 (default 3, quick 1)")
    p.add_argument("--repeats", type=int, help="timed calls in Table 1 (default 7, quick 1)")
    p.add_argument("--exact-steps", type=int, help="long exact outer loop (default 300, quick 3)")
    args = p.parse_args(argv)
    if rp.replot(args, "hyperoptimizer_methods", plot):
        return 0
    start(args)
    q = args.quick
    steps, rounds = args.steps or (20 if q else 300), args.rounds or (1 if q else 3)
    repeats, exact_steps = args.repeats or (1 if q else 7), args.exact_steps or (3 if q else 300)
    horizons = (3,) if q else (10, 50)
    rep = Report(
        "hyperoptimizer_methods", "HyperOptimizer methods and trajectory hypergradients", args
    )
    rep.note(
        f"float64; Table 1 repeats {repeats}, horizons {', '.join(map(str, horizons))}; "
        f"Tables 2-4: {steps} inner steps x {rounds} round(s)",
        "problem: per-feature L2 logistic regression on breast cancer (standardized; 100 train / "
        "200 validation / 269 test), 30 log weight decays",
        "rel. err = ||h - ref|| / ||ref||, cos = cosine(h, ref)",
    )
    data = breast_cancer_data(args.seed)
    points = hparam_points(data.dim, args.seed)
    res_1a = implicit_table(data, points, repeats)
    rep.section(markdown_implicit(res_1a, repeats))
    res_1b = trajectory_table(data, points, horizons, repeats)
    rep.section(markdown_trajectory(res_1b, repeats))
    res_23 = hyperoptimizer_tables(data, steps, rounds, exact_steps)
    rep.section(markdown_cost(res_23))
    rep.section(markdown_outcome(res_23))
    res_4 = lr_table(data, steps, rounds)
    rep.section(markdown_lr(res_4))
    settings = {
        "steps": steps,
        "rounds": rounds,
        "repeats": repeats,
        "exact_steps": exact_steps,
        "horizons": list(horizons),
        "hparam_points": {k: v.tolist() for k, v in points.items()},
    }
    rep.write(
        {
            "settings": settings,
            "implicit": res_1a,
            "trajectory": res_1b,
            "hyperoptimizer": res_23,
            "lr_tuning": res_4,
        },
        plot,
    )
    return 0


def plot(data: dict[str, Any], out: Path) -> Path:
    """Per method: hyper-step cost in training steps, and validation loss reached."""
    summary = data["hyperoptimizer"]["summary"]
    names = [n for n, r in summary.items() if r.get("hyper_step_ms")]
    fig, (ax1, ax2) = rp.pyplot().subplots(1, 2, figsize=(12, 4.5))
    ratio = [summary[n]["hyper_step_ms"] / summary[n]["train_step_ms"] for n in names]
    ax1.barh(range(len(names)), ratio, color="C0")
    ax1.set_yticks(range(len(names)), names, fontsize=8)
    ax1.set(xscale="log", xlabel="seconds per hyper-step / per training step")
    ax1.invert_yaxis()
    vals = [summary[n]["val"] for n in names]
    ax2.barh(range(len(names)), vals, color="C2")
    ax2.set_yticks(range(len(names)), [""] * len(names))
    ax2.invert_yaxis()
    for n, r in summary.items():
        if not r.get("hyper_step_ms"):
            ax2.axvline(r["val"], ls="--", lw=1, color="k" if "untuned" in n else "C3", label=n)
    lo = min(vals + [r["val"] for r in summary.values()])
    ax2.set(xlabel="validation loss after the run", xlim=(0.9 * lo, None))
    ax2.legend(fontsize=7, loc="lower right")
    return rp.save_figure(fig, out / "hyperoptimizer_methods.png")


if __name__ == "__main__":
    sys.exit(main())
