"""Mixed precision: hypergradients when the inner objective runs in bfloat16.

Logistic regression (two decays) and a digits MLP; the implicit solvers and ``hg.unrolled``
in fp32, under bf16 autocast, with bf16 parameters and at autocast-trained weights, against
the float64 exact hypergradient. Modes, solvers and settings: benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import hypergradient as hg
from harness import Report, cli, log, problems, start
from harness import report as rp
from harness.problems import cosine, flat, relative_error, unflat
from harness.runner import error_text, timed_call

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
Params = tuple[Tensor, ...]
Loss = Callable[[Params, Params], Tensor]
MODES = ("fp32", "autocast", "bf16 params", "ac-trained, fp32", "ac-trained, autocast")
TIMED_MODES = ("fp32", "autocast", "bf16 params")
UNIT_ROUNDOFF_BF16 = 2.0**-8


# ============================================================================ helpers


def autocast(device: torch.device, enabled: bool = True):
    return torch.autocast(device.type, dtype=BF16, enabled=enabled)


# ============================================================================ problems


def logreg_problem(log_decay: float) -> problems.Bilevel:
    pb = problems.logreg(0, n_train=300, bias=False, log_decay=log_decay, shuffle=False)
    pb.name = f"logreg decay={math.exp(log_decay):.3g}"
    pb.description = (
        f"logistic regression, breast cancer (30 features), per-feature L2, log decay "
        f"{log_decay:g} (decay {math.exp(log_decay):.3g})"
    )
    return pb


# ============================================================================ runs


@dataclass
class Row:
    solver: str
    mode: str
    rel_err: float | None = None
    cos: float | None = None
    vs_same_f64: float | None = None
    status: str = ""
    num_hvps: int | None = None
    inner_grad_norm: float | None = None
    out_dtype: str = ""
    ms: float | None = None
    cpu_ms: float | None = None
    ms_all: list[float] = field(default_factory=list)
    error: str | None = None


def solvers() -> dict[str, Callable[[], hg.Solver]]:
    return {
        "CG": lambda: hg.CG(maxiter=100, tol=1e-6),
        "Neumann": lambda: hg.Neumann(iters=50, alpha="auto"),
        "Nystrom": lambda: hg.Nystrom(rank=20, rho=1e-3, sketch="gaussian", seed=0),
        "Exact": lambda: hg.Exact(),
    }


def timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], list[float]]:
    """Wall and CPU milliseconds of ``repeats`` calls of ``fn``."""
    wall, cpu = [], []
    for _ in range(repeats):
        _, ms, cpu_ms = timed_call(fn)
        wall.append(ms)
        cpu.append(cpu_ms)
    return wall, cpu


def autocast_trained(p: problems.Bilevel, H: Tensor, device: torch.device, iters: int = 20):
    """A stationary point of the autocast objective near theta* (see the docstring)."""
    A = H + p.damping * torch.eye(H.shape[0], dtype=F64, device=device)
    L = torch.linalg.cholesky(A)
    theta = flat(p.params).float()
    hp = tuple(h.float() for h in p.hparams)
    gnorms = []
    for _ in range(iters):
        leaves = tuple(t.detach().requires_grad_(True) for t in unflat(theta, p.params))
        with autocast(device):
            loss = p.inner_loss(leaves, hp)
        g = flat(torch.autograd.grad(loss, leaves)).double()
        gnorms.append(float(torch.linalg.vector_norm(g)))
        theta = (theta.double() - torch.cholesky_solve(g[:, None], L)[:, 0]).float()
    params = unflat(theta, p.params)
    g64 = torch.func.grad(lambda t: p.inner_loss(unflat(t, p.params), p.hparams))(theta.double())
    return params, {
        "autocast_grad_norm_last": gnorms[-1],
        "autocast_grad_norm_min": min(gnorms),
        "float64_grad_norm": float(torch.linalg.vector_norm(g64)),
        "distance_to_theta_star_rel": relative_error(theta, flat(p.params)),
    }


def mode_inputs(p: problems.Bilevel, mode: str, ac_params: Params) -> tuple[Params, Params, bool]:
    hp32 = tuple(h.float() for h in p.hparams)
    if mode == "fp32":
        return tuple(t.float() for t in p.params), hp32, False
    if mode == "autocast":
        return tuple(t.float() for t in p.params), hp32, True
    if mode == "bf16 params":
        return tuple(t.to(BF16) for t in p.params), hp32, False
    if mode == "ac-trained, fp32":
        return ac_params, hp32, False
    if mode == "ac-trained, autocast":
        return ac_params, hp32, True
    raise ValueError(mode)


def run_implicit(
    p: problems.Bilevel, ref: Tensor, device: torch.device, repeats: int, ac_params: Params, log
) -> list[Row]:
    rows = []
    for sname, make in solvers().items():
        same64 = flat(
            hg.implicit(p.inner_loss, p.outer_loss, p.params, p.hparams, make(), damping=p.damping)
        )
        for mode in MODES:
            params, hparams, ac = mode_inputs(p, mode, ac_params)
            row = Row(sname, mode)

            def call(with_info: bool, params=params, hparams=hparams, ac=ac, make=make) -> Any:
                with autocast(device, ac):
                    return hg.implicit(
                        p.inner_loss,
                        p.outer_loss,
                        params,
                        hparams,
                        make(),
                        damping=p.damping,
                        return_info=with_info,
                    )

            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", hg.HypergradientWarning)
                    h, info = call(True)
                    hf = flat(h)
                    row.rel_err, row.cos = relative_error(hf, ref), cosine(hf, ref)
                    row.vs_same_f64 = relative_error(hf, same64)
                    row.status, row.num_hvps = info.status, info.num_hvps
                    row.inner_grad_norm = info.inner_grad_norm
                    row.out_dtype = str(hf.dtype).replace("torch.", "")
                    if mode in TIMED_MODES and repeats > 0:
                        wall, cpu = timed(lambda call=call: call(False), repeats)
                        row.ms, row.cpu_ms = statistics.median(wall), statistics.median(cpu)
                        row.ms_all = wall
            except Exception as exc:  # reported in the table
                row.error = error_text(exc, 160)
            log(f"  {sname:8s} {mode:22s} rel err {row.rel_err} ms {row.ms}")
            rows.append(row)
    return rows


def gradient_times(p: problems.Bilevel, device: torch.device, repeats: int) -> dict[str, float]:
    out = {}
    for mode in TIMED_MODES:
        params, hparams, ac = mode_inputs(p, mode, p.params)
        leaves = tuple(t.detach().requires_grad_(True) for t in params)

        def grad(leaves=leaves, hparams=hparams, ac=ac) -> Any:
            for _ in range(10):
                with autocast(device, ac):
                    loss = p.inner_loss(leaves, hparams)
                torch.autograd.grad(loss, leaves)

        grad()
        wall, _ = timed(grad, max(3, repeats))
        out[mode] = statistics.median(wall) / 10
    return out


def run_unrolled(
    p: problems.Bilevel, lr: float, steps: int, device: torch.device, repeats: int
) -> tuple[list[Row], Tensor]:
    def call(params0: Params, hparams: Params, ac: bool) -> Tensor:
        with autocast(device, ac):
            h = hg.unrolled(p.inner_loss, p.outer_loss, params0, hparams, steps, hg.optim.sgd(lr))
        return flat(h)

    ref = call(p.params0, p.hparams, False)
    hp32 = tuple(h.float() for h in p.hparams)
    modes = {
        "fp32": (tuple(t.float() for t in p.params0), hp32, False),
        "autocast": (tuple(t.float() for t in p.params0), hp32, True),
        "bf16 params": (tuple(t.to(BF16) for t in p.params0), hp32, False),
    }
    rows = []
    for mode, (params0, hparams, ac) in modes.items():
        row = Row(f"unrolled SGD T={steps}", mode)
        try:
            h = call(params0, hparams, ac)
            row.rel_err, row.cos = relative_error(h, ref), cosine(h, ref)
            row.out_dtype = str(h.dtype).replace("torch.", "")
            if repeats > 0:
                wall, cpu = timed(lambda a=params0, b=hparams, c=ac: call(a, b, c), repeats)
                row.ms, row.cpu_ms, row.ms_all = (
                    statistics.median(wall),
                    statistics.median(cpu),
                    wall,
                )
        except Exception as exc:
            row.error = error_text(exc, 160)
        rows.append(row)
    return rows, ref


# ============================================================================ output


def fmt(x: float | None, spec: str = ".2e") -> str:
    return "" if x is None else format(x, spec)


def markdown_problem(
    p: problems.Bilevel, info: dict[str, Any], rows: list[Row], urows: list[Row]
) -> str:
    s, ac, gms = p.setup, info["ac"], info["grad_ms"]
    lines = [
        f"### {p.name}: {p.description}",
        "",
        f"- {s['num_params']} parameters, {s['num_hparams']} hyperparameters, "
        f"{s['n_train']} train / {s['n_val']} validation examples",
        f"- inner solve: {s['inner_solver']}; float64 inner gradient norm "
        f"{s['inner_grad_norm']:.2e}"
        + (
            f"; train accuracy {s['train_accuracy']:.3f}, validation accuracy "
            f"{s['val_accuracy']:.3f}"
            if "train_accuracy" in s
            else ""
        ),
        f"- dense float64 Hessian: lambda_min = {info['lambda_min']:.3g}, lambda_max = "
        f"{info['lambda_max']:.3g}, condition number kappa = {info['cond']:.3g}; "
        f"2^-8 kappa = {UNIT_ROUNDOFF_BF16 * info['cond']:.3g}"
        + (f"; damping {p.damping:.3g} (Hessian not PD)" if p.damping else "; no damping"),
        f"- reference: hg.Exact() in float64, ||h*|| = {info['ref_norm']:.3g}, vs plain "
        f"dense torch solve {info['ref_check']:.1e}",
        f"- autocast-trained params: autocast gradient norm {ac['autocast_grad_norm_last']:.2e}"
        f" (float64 gradient norm there {ac['float64_grad_norm']:.2e}), "
        f"||theta_ac - theta*|| / ||theta*|| = {ac['distance_to_theta_star_rel']:.2e}",
        f"- one gradient of f: fp32 {gms['fp32']:.3g} ms, autocast {gms['autocast']:.3g} ms, "
        f"bf16 params {gms['bf16 params']:.3g} ms",
        "",
        "| solver | mode | rel. err | cos | vs same f64 | status | hvps | out dtype | ms "
        "| CPU ms |",
        "|---|---|---:|---:|---:|---|---:|---|---:|---:|",
    ]
    for r in rows + urows:
        if r.error:
            lines.append(f"| {r.solver} | {r.mode} | error: {r.error} |  |  |  |  |  |  |  |")
            continue
        lines.append(
            f"| {r.solver} | {r.mode} | {fmt(r.rel_err)} | {fmt(r.cos, '.6f')} | "
            f"{fmt(r.vs_same_f64)} | {r.status} | {'' if r.num_hvps is None else r.num_hvps} | "
            f"{r.out_dtype} | {fmt(r.ms, '.3g')} | {fmt(r.cpu_ms, '.3g')} |"
        )
    return "\n".join(lines)


def markdown_summary(
    results: list[tuple[problems.Bilevel, dict[str, Any], list[Row], list[Row]]],
) -> str:
    lines = [
        "### Summary: relative error of CG (tol 1e-6) and Exact vs the float64 exact hypergradient",
        "",
        "| problem | kappa | 2^-8 kappa | solver | "
        + " | ".join(MODES)
        + " | unrolled autocast | unrolled bf16 params |",
        "|---|---:|---:|---|" + "---:|" * (len(MODES) + 2),
    ]
    for p, info, rows, urows in results:
        by = {(r.solver, r.mode): r for r in rows}
        ub = {r.mode: r for r in urows}
        for sname in ("CG", "Exact"):
            cells = [fmt(by[(sname, m)].rel_err) for m in MODES]
            lines.append(
                f"| {p.name} | {info['cond']:.3g} | {UNIT_ROUNDOFF_BF16 * info['cond']:.3g} | "
                f"{sname} | "
                + " | ".join(cells)
                + f" | {fmt(ub['autocast'].rel_err) if sname == 'CG' else ''}"
                + f" | {fmt(ub['bf16 params'].rel_err) if sname == 'CG' else ''} |"
            )
    return "\n".join(lines)


def cpu_flags() -> str:
    """The CPU's bfloat16-related flags."""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        return " ".join(
            sorted(f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f in text)
        )
    return ""


def row_dict(r: Row) -> dict[str, Any]:
    return dict(vars(r))


def main(argv: Sequence[str] | None = None) -> int:
    p = cli(__doc__)
    p.add_argument("--repeats", type=int, help="timed calls per mode (default 5, quick 1)")
    p.add_argument("--hidden", type=int, default=16, help="MLP hidden width (default 16)")
    args = p.parse_args(argv)
    if rp.replot(args, "mixed_precision", plot):
        return 0
    start(args)
    device = torch.device("cpu")
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5)
    steps = 5 if args.quick else 20
    rep = Report(
        "mixed_precision",
        "Mixed precision: hypergradients with a bfloat16 inner objective",
        args,
        cpu_flags=cpu_flags(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
    )
    rep.note(
        f"CPU flags: {rep.machine['cpu_flags'] or 'n/a'}; torch CPU capability "
        f"{rep.machine['cpu_capability']}",
        "reference h* = hg.Exact() in float64 at the float64 inner solution; autocast = "
        f"torch.autocast(device, dtype=torch.bfloat16); median of {repeats} timed calls after "
        "the accuracy call",
        "rel. err = ||h - h*|| / ||h*||; cos = cosine(h, h*); vs same f64 = relative "
        "distance to the same solver in float64 at theta* (the precision effect alone)",
        "bf16 unit roundoff 2^-8 = 3.9e-3; a backward-stable solve of H x = b has a "
        "relative error up to about 2^-8 kappa(H)",
    )
    builders: list[Callable[[], problems.Bilevel]] = [lambda: logreg_problem(-1.0)]
    if not args.quick:
        builders.append(lambda: logreg_problem(-3.0))
    hidden, iters = (4, 100) if args.quick else (args.hidden, 1000)
    builders.append(
        lambda: problems.digits_mlp(args.seed, hidden, iters, rounds=10, require_pd=False)
    )
    results, out = [], {}
    for build in builders:
        p = build()
        log(f"[{p.name}] {p.setup['inner_solver']}")
        H = problems.dense_hessian(p)
        evals = torch.linalg.eigvalsh(H)
        lam_min, lam_max = float(evals[0]), float(evals[-1])
        cond = float((evals[-1] + p.damping) / (evals[0] + p.damping))
        ref = flat(
            hg.implicit(
                p.inner_loss, p.outer_loss, p.params, p.hparams, hg.Exact(), damping=p.damping
            )
        )
        ac_params, ac_info = autocast_trained(p, H, device)
        info: dict[str, Any] = {
            "lambda_min": lam_min,
            "lambda_max": lam_max,
            "cond": cond,
            "ref_norm": float(ref.norm()),
            "ref_check": relative_error(ref, problems.dense_hypergradient(p, H)),
            "ac": ac_info,
        }
        log(f"[{p.name}] kappa {cond:.3g}, damping {p.damping:.3g}; solvers ...")
        info["grad_ms"] = gradient_times(p, device, repeats)
        rows = run_implicit(p, ref, device, repeats, ac_params, log)
        urows, _ = run_unrolled(p, 1.0 / lam_max, steps, device, repeats)
        info["unrolled_lr"] = 1.0 / lam_max
        results.append((p, info, rows, urows))
        out[p.name] = {
            "description": p.description,
            "setup": p.setup,
            "damping": p.damping,
            **info,
            "implicit": [row_dict(r) for r in rows],
            "unrolled": [row_dict(r) for r in urows],
        }
    rep.section(markdown_summary(results))
    for p, i, r, u in results:
        rep.section(
            markdown_problem(p, i, r, u) + f"\n\nUnrolled: {steps} full-batch SGD steps with lr = "
            f"1/lambda_max = {i['unrolled_lr']:.3g}; its rel. err and cos are against "
            "hg.unrolled in float64."
        )
    rep.write({"repeats": repeats, "unrolled_steps": steps, "problems": out}, plot)
    return 0


def plot(data: dict[str, Any], out: Path) -> Path:
    """Relative error vs float64, per solver and precision mode, per problem."""
    probs = data["problems"]
    fig, axes = rp.pyplot().subplots(1, len(probs), figsize=(5.5 * len(probs), 4.5), squeeze=False)
    for ax, (name, pb) in zip(axes[0], probs.items()):
        rows = [r for r in pb["implicit"] + pb["unrolled"] if r.get("rel_err") is not None]
        solvers = list(dict.fromkeys(r["solver"] for r in rows))
        modes = list(dict.fromkeys(r["mode"] for r in rows))
        width = 0.8 / max(len(modes), 1)
        for j, mode in enumerate(modes):
            pts = [
                (i + j * width, max(hit[0]["rel_err"], 1e-17))
                for i, s in enumerate(solvers)
                if (hit := [r for r in rows if r["solver"] == s and r["mode"] == mode])
            ]
            ax.bar([x for x, _ in pts], [y for _, y in pts], width, label=mode)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(solvers))], solvers, fontsize=7)
        title = name if pb.get("cond") is None else f"{name} (condition number {pb['cond']:.3g})"
        ax.set(yscale="log", ylabel="relative error vs float64 exact", title=title)
        ax.axhline(2.0**-8, color="k", ls=":", lw=1)
    axes[0][0].legend(fontsize=7)
    return rp.save_figure(fig, out / "mixed_precision.png")


if __name__ == "__main__":
    sys.exit(main())
