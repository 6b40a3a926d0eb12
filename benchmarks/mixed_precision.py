"""Mixed precision: hypergradients when the inner objective runs in bfloat16.

What is measured
----------------
The library keeps the vectors of its linear solvers (CG, Neumann, Nystrom, Exact) in at
least float32 (``hypergradient._tree.accumulator_dtype``): half-precision parameters keep
their dtype inside each Hessian-vector product, but iterates, inner products and sums are
float32. This script measures how accurate the hypergradient then is, against the exact
float64 hypergradient, on two bilevel problems:

logreg (two decays)
    Logistic regression on scikit-learn's ``load_breast_cancer`` (30 features, no bias;
    standardized with the training statistics; the first 300 examples train, the other
    269 validate), one log weight decay per feature, all equal to ``log_decay`` (-1 and
    -3, i.e. decays 0.37 and 0.05): ``f = BCE_train + 0.5 sum exp(h_i) w_i^2``,
    ``g = BCE_val``. Inner problem solved by Newton's method in float64 (dense Hessian).
mlp
    A tanh MLP 64 -> 16 -> 10 (1210 parameters) on scikit-learn's ``load_digits``
    (standardized; 1000 train / 797 validation examples), one log weight decay per
    parameter (``exp(h)`` drawn in [1e-3, 1e-2]): ``f = CE_train + 0.5 sum exp(h) theta^2``,
    ``g = CE_val``. Trained in float64 by L-BFGS (strong Wolfe) rounds, each followed by
    an attempt at Newton polishing with the dense Hessian, which is kept only if the
    Hessian is positive definite all the way. If the Hessian at the final point is not
    positive definite, every hypergradient of this problem (the reference included) uses
    ``damping = 1e-3 lambda_max - lambda_min``; the damping used is printed.

For each problem: the dense float64 Hessian ``H`` at the inner solution ``theta*`` gives
``lambda_min``, ``lambda_max`` and the condition number ``kappa``. The reference ``h*`` is
``hg.implicit(..., solver=hg.Exact())`` in float64 at ``theta*`` (cross-checked against a
plain dense torch solve). Then each solver runs in five modes:

* ``fp32``: params and hparams float32, no autocast.
* ``autocast``: the same float32 tensors, the ``hg.implicit`` call made inside
  ``torch.autocast(device, dtype=torch.bfloat16)`` (matmuls in bfloat16, losses in
  float32, as autocast does).
* ``bf16 params``: params cast to bfloat16 (the model in bfloat16), hparams float32; the
  losses cast the data to the parameters' dtype.
* ``ac-trained, fp32``: params ``theta_ac`` = a stationary point of the *autocast* inner
  objective (what training under autocast converges to at best), hypergradient computed
  outside autocast in float32. ``theta_ac`` is found from ``theta*`` by 20 iterations of
  ``theta <- theta - (H + damping I)^-1 grad f_autocast(theta)`` (float32 params, forward
  under autocast, backward outside it; ``H`` the float64 Hessian at ``theta*``): this
  isolates the precision effect from any optimization error. The autocast gradient is only
  defined up to bfloat16 rounding, so ``theta_ac`` is one point of a noise ball around the
  float32 optimum (stretched along the Hessian's small-curvature directions), and the errors
  of the two ``ac-trained`` modes change by up to 2x with small changes of ``theta*``.
* ``ac-trained, autocast``: at ``theta_ac``, call inside autocast.

Calling ``hg.implicit`` inside autocast, or wrapping only the forward of ``f`` and ``g`` in
autocast (PyTorch's advice: backward passes outside it), gave bit-identical hypergradients
(checked for CG and Exact on logreg and mlp): backward passes use the dtypes the forward
chose. The solver's own arithmetic runs outside autocast (``hg.implicit`` disables it
around ``solver.solve``), so its float32 vectors are never lowered to bfloat16.

Solvers: ``hg.CG(maxiter=100, tol=1e-6)``, ``hg.Neumann(iters=50, alpha="auto")`` (50
products plus 20 power iterations), ``hg.Nystrom(rank=20, rho=1e-3, sketch="gaussian",
seed=0)`` and ``hg.Exact()``. Columns: ``rel. err`` = ``||h - h*|| / ||h*||``, ``cos`` =
cosine(h, h*), and ``vs same f64`` = the relative distance to the same solver run in
float64 at ``theta*``, which separates the precision effect from the solver's own
approximation error (Neumann at 50 products on the MLP, and Nystrom at rank 20 with
``rho = 1e-3`` everywhere, are far from ``h*`` in any precision).

Unrolled: ``hg.unrolled`` through ``T`` full-batch SGD steps (``lr = 1/lambda_max`` of
``H``, from zeros for logreg and from the MLP's initialization), in float64 (reference),
float32, under autocast (the call inside autocast) and with bfloat16 ``params0``.

Time: median wall time (``time.perf_counter``) and CPU time (``time.process_time``) of
``--repeats`` calls after the accuracy call (which is the warm-up), in the modes fp32,
autocast and bf16 params, plus one gradient of ``f`` in each mode. bfloat16 is not
necessarily faster on a CPU: autocast adds casts, and the gain depends on native bf16
support (``avx512_bf16``/AMX flags are printed with the machine) and on the problem size.

Run
---
    .venv/bin/python benchmarks/mixed_precision.py            # full run, ~1-3 minutes
    .venv/bin/python benchmarks/mixed_precision.py --quick    # smoke run, < 60 s

It prints the machine and Markdown tables, and writes ``benchmarks/results/
mixed_precision.json`` and ``mixed_precision.md`` (``--out`` to change the folder).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import hypergradient as hg
from _common import (
    NotPositiveDefinite,
    add_common_arguments,
    cosine,
    damped_newton,
    error_text,
    flat,
    jsonable,
    lbfgs,
    load_sklearn,
    log,
    machine_info,
    relative_error,
    standardize,
    start_run,
    timed_call,
    unflat,
    wall_footer,
    write_results,
)

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
Params = tuple[Tensor, ...]
Loss = Callable[[Params, Params], Tensor]
MODES = ("fp32", "autocast", "bf16 params", "ac-trained, fp32", "ac-trained, autocast")
TIMED_MODES = ("fp32", "autocast", "bf16 params")
UNIT_ROUNDOFF_BF16 = 2.0**-8


# ============================================================================ helpers


def dense_hessian(f: Loss, params: Params, hparams: Params) -> Tensor:
    """Dense float64 Hessian of ``f`` w.r.t. the flattened params (plain torch.func)."""
    theta = flat(params).double()
    hp = tuple(h.double() for h in hparams)

    def f_flat(t: Tensor) -> Tensor:
        return f(unflat(t, params), hp)

    H = torch.func.jacrev(torch.func.grad(f_flat), chunk_size=128)(theta)
    return 0.5 * (H + H.T)


def autocast(device: torch.device, enabled: bool = True):
    return torch.autocast(device.type, dtype=BF16, enabled=enabled)


# ============================================================================ problems


@dataclass
class Problem:
    """A bilevel problem solved in float64: losses work at any parameter dtype."""

    name: str
    description: str
    inner_loss: Loss
    outer_loss: Loss
    params: Params  # float64 inner solution theta*
    hparams: Params  # float64
    params0: Params  # float64 start of the unrolled run
    setup: dict[str, Any]
    damping: float = 0.0


def logreg_problem(log_decay: float, device: torch.device) -> Problem:
    X, y = load_sklearn("breast_cancer")
    n = 300
    X = standardize(X, n)
    Xt, yt, Xv, yv = (t.to(device) for t in (X[:n], y[:n], X[n:], y[n:]))
    d = X.shape[1]

    def inner_loss(params: Params, hparams: Params) -> Tensor:
        (w,) = params
        (h,) = hparams
        z = Xt.to(w.dtype) @ w
        return F.binary_cross_entropy_with_logits(z, yt.to(z.dtype)) + 0.5 * torch.sum(
            h.exp() * w**2
        )

    def outer_loss(params: Params, hparams: Params) -> Tensor:
        (w,) = params
        z = Xv.to(w.dtype) @ w
        return F.binary_cross_entropy_with_logits(z, yv.to(z.dtype))

    h = torch.full((d,), log_decay, dtype=F64, device=device)
    started = time.perf_counter()
    theta, _, gnorm = damped_newton(
        lambda t: inner_loss((t,), (h,)),
        torch.zeros(d, dtype=F64, device=device),
        1e-12,
        50,
        chunk_size=128,
        symmetrize=False,
    )
    return Problem(
        f"logreg decay={math.exp(log_decay):.3g}",
        f"logistic regression, breast cancer (30 features), per-feature L2, log decay "
        f"{log_decay:g} (decay {math.exp(log_decay):.3g})",
        inner_loss,
        outer_loss,
        (theta,),
        (h,),
        (torch.zeros(d, dtype=F64, device=device),),
        {
            "num_params": d,
            "num_hparams": d,
            "n_train": n,
            "n_val": len(y) - n,
            "inner_solver": f"Newton (float64), {time.perf_counter() - started:.2f} s",
            "inner_grad_norm": gnorm,
        },
    )


def mlp_problem(device: torch.device, hidden: int, lbfgs_iters: int, seed: int) -> Problem:
    g = torch.Generator().manual_seed(seed)
    X, y = load_sklearn("digits", y_dtype=torch.long, generator=g)
    n = 1000
    X = standardize(X, n)
    Xt, yt, Xv, yv = (t.to(device) for t in (X[:n], y[:n], X[n:], y[n:]))
    init = (
        torch.randn(hidden, 64, generator=g, dtype=F64) / 8.0,
        torch.zeros(hidden, dtype=F64),
        torch.randn(10, hidden, generator=g, dtype=F64) / math.sqrt(hidden),
        torch.zeros(10, dtype=F64),
    )
    init = tuple(t.to(device) for t in init)
    lo, hi = math.log(1e-3), math.log(1e-2)
    loglam = tuple(
        (lo + (hi - lo) * torch.rand(t.shape, generator=g, dtype=F64)).to(device) for t in init
    )

    def forward(params: Params, x: Tensor) -> Tensor:
        W1, b1, W2, b2 = params
        x = x.to(W1.dtype)
        return torch.tanh(x @ W1.T + b1) @ W2.T + b2

    def penalty(params: Params, hparams: Params) -> Tensor:
        return 0.5 * sum(torch.sum(h.exp() * p**2) for p, h in zip(params, hparams))

    def inner_loss(params: Params, hparams: Params) -> Tensor:
        return F.cross_entropy(forward(params, Xt), yt) + penalty(params, hparams)

    def outer_loss(params: Params, hparams: Params) -> Tensor:
        return F.cross_entropy(forward(params, Xv), yv)

    def f_flat(theta: Tensor) -> Tensor:
        return inner_loss(unflat(theta, init), loglam)

    started = time.perf_counter()
    theta = flat(init)
    rounds, polished = 0, False
    for rounds in range(1, 11):  # noqa: B007 (reported)
        theta = lbfgs(f_flat, theta, lbfgs_iters)
        try:  # Newton polish; needs a positive-definite Hessian, else more L-BFGS
            theta, _, _ = damped_newton(f_flat, theta, 1e-10, 20, chunk_size=128, symmetrize=False)
        except NotPositiveDefinite:
            continue
        polished = True
        break
    seconds = time.perf_counter() - started
    params = unflat(theta.clone(), init)
    gnorm = float(torch.linalg.vector_norm(torch.func.grad(f_flat)(theta)))
    with torch.no_grad():
        train_acc = float((forward(params, Xt).argmax(1) == yt).double().mean())
        val_acc = float((forward(params, Xv).argmax(1) == yv).double().mean())
    P = int(theta.numel())
    return Problem(
        "mlp",
        f"tanh MLP 64-{hidden}-10 ({P} parameters), digits, one log weight decay per "
        "parameter (exp in [1e-3, 1e-2])",
        inner_loss,
        outer_loss,
        params,
        loglam,
        init,
        {
            "num_params": P,
            "num_hparams": P,
            "n_train": n,
            "n_val": len(y) - n,
            "inner_solver": (
                f"{rounds} round(s) of {lbfgs_iters} L-BFGS iterations, "
                + ("then Newton" if polished else "Newton refused (H not PD)")
                + f" ({seconds:.1f} s)"
            ),
            "inner_grad_norm": gnorm,
            "train_accuracy": train_acc,
            "val_accuracy": val_acc,
        },
    )


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


def autocast_trained(p: Problem, H: Tensor, device: torch.device, iters: int = 20):
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


def mode_inputs(p: Problem, mode: str, ac_params: Params) -> tuple[Params, Params, bool]:
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
    p: Problem, ref: Tensor, device: torch.device, repeats: int, ac_params: Params, log
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


def gradient_times(p: Problem, device: torch.device, repeats: int) -> dict[str, float]:
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
    p: Problem, lr: float, steps: int, device: torch.device, repeats: int
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


def markdown_problem(p: Problem, info: dict[str, Any], rows: list[Row], urows: list[Row]) -> str:
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


def markdown_summary(results: list[tuple[Problem, dict[str, Any], list[Row], list[Row]]]) -> str:
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


def device_machine_info(device: torch.device) -> dict[str, Any]:
    """:func:`machine_info` with the CPU's bfloat16-related flags, torch's CPU capability and
    the device."""
    flags = ""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        flags = " ".join(
            sorted({f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f in text})
        )
    return machine_info(
        cpu_flags=flags,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        device=str(device),
        cuda=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    )


def row_dict(r: Row) -> dict[str, Any]:
    return dict(vars(r))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 timed calls, shorter runs (< 60 s)")
    p.add_argument("--repeats", type=int, help="timed calls per mode (default 5, quick 2)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--hidden", type=int, default=16, help="MLP hidden width (default 16)")
    add_common_arguments(p)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = start_run(args.seed, args.threads)
    device = torch.device(args.device)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    steps = 10 if args.quick else 20

    machine = device_machine_info(device)
    header = [
        "# Mixed precision: hypergradients with a bfloat16 inner objective",
        "",
        f"- machine: {machine['platform']} ({machine['processor']}; flags: "
        f"{machine['cpu_flags'] or 'n/a'}; torch CPU capability {machine['cpu_capability']}), "
        f"{machine['cpu_count']} CPUs; python {machine['python']}; torch {machine['torch']} "
        f"with {machine['torch_threads']} intra-op thread(s); device {machine['device']}"
        + (f" ({machine['cuda']})" if machine["cuda"] else ""),
        f"- hypergradient {machine['hypergradient']}; reference h* = hg.Exact() in float64 at "
        "the float64 inner solution; autocast = torch.autocast(device, dtype=torch.bfloat16)"
        f"; median of {repeats} timed calls after the accuracy call; seed {args.seed}"
        + ("; --quick" if args.quick else ""),
        "- rel. err = ||h - h*|| / ||h*||; cos = cosine(h, h*); vs same f64 = relative "
        "distance to the same solver in float64 at theta* (the precision effect alone)",
        "- bf16 unit roundoff 2^-8 = 3.9e-3; a backward-stable solve of H x = b has a "
        "relative error up to about 2^-8 kappa(H)",
    ]
    print("\n".join(header), flush=True)

    builders: list[Callable[[], Problem]] = [
        lambda: logreg_problem(-1.0, device),
        lambda: logreg_problem(-3.0, device),
        lambda: mlp_problem(device, args.hidden, 300 if args.quick else 1000, args.seed),
    ]
    results = []
    report: dict[str, Any] = {
        "machine": machine,
        "args": jsonable(vars(args)),
        "repeats": repeats,
        "unrolled_steps": steps,
        "problems": {},
    }
    for build in builders:
        p = build()
        log(f"[{p.name}] {p.setup['inner_solver']}")
        H = dense_hessian(p.inner_loss, p.params, p.hparams)
        evals = torch.linalg.eigvalsh(H)
        lam_min, lam_max = float(evals[0]), float(evals[-1])
        if lam_min <= 0:
            p.damping = 1e-3 * lam_max - lam_min
            evals = evals + p.damping
        cond = float(evals[-1] / evals[0])
        ref = flat(
            hg.implicit(
                p.inner_loss, p.outer_loss, p.params, p.hparams, hg.Exact(), damping=p.damping
            )
        )
        # Independent check: plain torch dense solve and mixed term by double backward.
        ps = tuple(t.detach().clone().requires_grad_(True) for t in p.params)
        hs = tuple(t.detach().clone().requires_grad_(True) for t in p.hparams)
        g_all = torch.autograd.grad(p.outer_loss(ps, hs), ps + hs, allow_unused=True)
        gth = flat(g_all[: len(ps)])
        A = H + p.damping * torch.eye(H.shape[0], dtype=F64, device=device)
        v = torch.linalg.solve(A, gth)
        gf = torch.autograd.grad(p.inner_loss(ps, hs), ps, create_graph=True)
        mixed = torch.autograd.grad(flat(gf) @ v, hs)
        direct = [torch.zeros_like(h) if d is None else d for h, d in zip(hs, g_all[len(ps) :])]
        ref_torch = flat([d - m for d, m in zip(direct, mixed)]).detach()
        ac_params, ac_info = autocast_trained(p, H, device)
        info: dict[str, Any] = {
            "lambda_min": lam_min,
            "lambda_max": lam_max,
            "cond": cond,
            "ref_norm": float(torch.linalg.vector_norm(ref)),
            "ref_check": relative_error(ref, ref_torch),
            "ac": ac_info,
        }
        log(f"[{p.name}] kappa {cond:.3g}, damping {p.damping:.3g}; solvers ...")
        info["grad_ms"] = gradient_times(p, device, repeats)
        rows = run_implicit(p, ref, device, repeats, ac_params, log)
        log(f"[{p.name}] unrolled ...")
        urows, _ = run_unrolled(p, 1.0 / lam_max, steps, device, repeats)
        info["unrolled_lr"] = 1.0 / lam_max
        section = markdown_problem(p, info, rows, urows)
        section += (
            f"\n\nUnrolled: {steps} full-batch SGD steps with lr = 1/lambda_max = "
            f"{1.0 / lam_max:.3g}; its rel. err and cos are against hg.unrolled in float64."
        )
        print("\n" + section, flush=True)
        results.append((p, info, rows, urows))
        report["problems"][p.name] = {
            "description": p.description,
            "setup": p.setup,
            "damping": p.damping,
            **info,
            "implicit": [row_dict(r) for r in rows],
            "unrolled": [row_dict(r) for r in urows],
        }
    summary = markdown_summary(results)
    print("\n" + summary, flush=True)
    total, footer = wall_footer(started)
    report["total_seconds"] = total
    sections = [summary] + [
        markdown_problem(p, i, r, u)
        + f"\n\nUnrolled: {steps} full-batch SGD steps with lr = 1/lambda_max = "
        f"{i['unrolled_lr']:.3g}; its rel. err and cos are against hg.unrolled in float64."
        for p, i, r, u in results
    ]
    write_results(args.out, "mixed_precision", header, sections, footer, report, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
