"""Accuracy against cost on a simulated quadratic bilevel problem (benchopt's, ported).

The problem
-----------
A PyTorch port of the ``quadratic`` dataset of benchopt's ``benchmark_bilevel``, full batch
(the mean of its per-sample matrices), in float64. Inner variable ``theta`` (d), outer
variable ``phi`` (p):

    f(theta, phi) = 1/2 theta^T A theta + 1/2 phi^T B_f phi + phi^T C theta + a^T theta
                    + b_f^T phi                                              (inner loss)
    g(theta, phi) = 1/2 theta^T A_g theta + 1/2 phi^T B_g phi + phi^T C_g theta + a_g^T theta
                    + b_g^T phi                                              (outer loss)

generated from a seed (``torch.Generator``): ``A = Q diag(lambda) Q^T`` with ``Q``
Haar-orthogonal and ``lambda`` log-spaced in ``[1/cond, 1]``, so the condition number of
the inner Hessian is exactly ``cond`` (benchopt draws empirical covariances of samples with
that spectrum instead); ``A_g`` SPD with spectrum log-spaced in ``[mu, 1]`` (``mu = 0.1``,
benchopt's ``mu_inner``); ``B_f``, ``B_g`` PSD with spectrum ``{0} U [mu, 1]`` (benchopt's
outer-outer Hessians have a zero eigenvalue); ``C``, ``C_g`` = ``U diag(s) V^T`` with ``s``
log-spaced in ``[mu, L_cross]`` (``L_cross = 1``; benchopt's default 0.1 makes the implicit
term small next to the direct one); ``a``, ``b_f``, ``a_g``, ``b_g`` and ``phi`` standard
normal. Problems (name ``d<d>_k<cond>``, ``p = 10`` throughout): d = 100 with cond = 10 and
1e4, d = 1000 with cond = 1e2 and 1e4 (quick: d = 100 only).

Exact hypergradient (closed form, two dense solves)
---------------------------------------------------
    theta*(phi) = -A^{-1} (C^T phi + a)                               (solve 1)
    v           =  A^{-1} grad_theta g(theta*, phi),  grad_theta g = A_g theta* + C_g^T phi + a_g
                                                                      (solve 2)
    dg/dphi     =  d_phi g(theta*, phi) - C v,        d_phi g = B_g phi + C_g theta* + b_g

(``C`` is ``d^2 f / d phi d theta``). Both solves use ``torch.linalg.solve`` on the dense
matrices; ``hg.implicit(..., hg.Exact())`` at ``theta*`` is checked against it.

Part 1: implicit solvers at ``theta*``
--------------------------------------
``hg.implicit(f, g, theta*, phi, solver)`` with, at budgets of k products
(k = 1, 2, 5, ..., 500 and 1000 up to the dimension; quick: 1, 5, 20, 100):
``CG(maxiter=k, tol=0)``; ``Neumann(k, alpha="auto")`` (k products plus its 20 power
iterations: k + 20); ``Nystrom(rank=k, rho, sketch="column" | "gaussian", seed=s)`` with
two values of rho, the median eigenvalue of ``A`` (the oracle value of
``implicit_solvers.py``, good at low rank) and ``lambda_min / 100`` (about exact at full
rank, poor below it), up to rank 500; ``NystromPCG(rank=k//2, maxiter=k - k//2, tol=0,
seed=s)`` (k >= 2); ``Identity(scale=1/lambda_max)`` (0 products, drawn as a horizontal
line); ``Exact()`` (d products, dense eigen-solve). Relative error ``||h - h*|| / ||h*||``
and cosine against the closed form ``h*``; products as reported by
``return_info=True`` (``num_hvps``; the plots use it as the x coordinate, since CG and
NystromPCG stop early once converged); time = median of n calls with
``return_info=False`` after a warm-up call, all solvers of one budget interleaved (order
rotated each repeat); wall (``perf_counter``) and CPU (``process_time``) time; n =
``--repeats`` (default 3), raised to 7 for groups whose slowest warm-up call took under
30 ms and to 5 under 150 ms (short calls are the noisiest on a shared machine).
Randomized solvers use seed = repeat index and report the median error over seeds.

Part 2: trajectory hypergradients
---------------------------------
``T`` steps of plain SGD from ``theta_0 = 0`` at lr ``eta = 1/lambda_max`` (stable:
the iteration matrix ``M = I - eta A`` has eigenvalues in ``[0, 1 - 1/cond]``), outer loss
``g(theta_T, phi)``. Reference: the exact hypergradient of the unrolled loop in closed
form (dense, through the eigendecomposition of ``A``):

    theta_T = theta* + M^T (theta_0 - theta*)
    dg(theta_T)/dphi = d_phi g(theta_T, phi) - C A^{-1} (I - M^T) grad_theta g(theta_T, phi)

(and the truncated one with ``M^K`` in place of ``M^T``; not used). Methods, with
``hg.optim.sgd(lr=eta)``: ``hg.unrolled`` (exact reverse mode, ``T`` reverse steps),
``hg.unrolled(truncate=K)`` at the largest ``T`` for K = 1, 2, 5, ... < T (K reverse
steps), ``hg.forward_mode`` (``p = 10`` tangents per step) and ``hg.drmad`` (``T``
reverse steps on the straight line from ``theta_0`` to ``theta_T``), for T = 10, 30, 100
(quick: 10, 30). The plots put the truncated run against K and the others against T, each
against the reference of its own T. The table also gives how far the T-step hypergradient
is from the implicit one at ``theta*`` (``||h_T - h*|| / ||h*||``). ``hg.unrolled``'s
agreement with the closed form is printed as a check.

Also measured: the time of r Hessian-vector products batched (``HessianOperator.matmat``,
what ``Nystrom`` and ``Exact`` use by default) against r sequential ``matvec`` calls.

Run
---
    .venv/bin/python benchmarks/quadratic_bilevel.py            # full run, ~4-5 min
    .venv/bin/python benchmarks/quadratic_bilevel.py --quick    # smoke run, < 60 s

It prints the machine and Markdown tables to stdout (progress on stderr) and writes
``benchmarks/results/quadratic_bilevel.json``, ``quadratic_bilevel.md``,
``quadratic_bilevel_implicit.png`` and ``quadratic_bilevel_trajectory.png`` (``--out``
to change the folder).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import hypergradient as hg
from _common import (
    add_common_arguments,
    cosine,
    error_text,
    jsonable,
    log,
    machine_info,
    machine_line,
    pyplot,
    recorded_warnings,
    relative_error,
    rotation,
    save_figure,
    start_run,
    timed_call,
    wall_footer,
    warning_texts,
    write_results,
)

F64 = torch.float64
P_OUTER = 10
MU = 0.1
L_CROSS = 1.0
POWER_ITERS = 20  # Neumann(alpha="auto")'s default
NYSTROM_MAX_RANK = 500
FULL_PROBLEMS = ((100, 10.0), (100, 1e4), (1000, 1e2), (1000, 1e4))
QUICK_PROBLEMS = ((100, 10.0), (100, 1e4))
FULL_BUDGETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
QUICK_BUDGETS = (1, 5, 20, 100)
FULL_HORIZONS = (10, 30, 100)
QUICK_HORIZONS = (10, 30)
TRUNCATIONS = (1, 2, 5, 10, 20, 50, 100, 200)


# ============================================================================ problem


def _haar(n: int, gen: torch.Generator) -> Tensor:
    """A Haar-distributed orthogonal matrix (QR of a Gaussian with the sign fix)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def _logspace(lo: float, hi: float, n: int) -> Tensor:
    return torch.logspace(math.log10(lo), math.log10(hi), n, dtype=F64)


def _spd(n: int, spectrum: Tensor, gen: torch.Generator) -> Tensor:
    Q = _haar(n, gen)
    M = (Q * spectrum) @ Q.T
    return 0.5 * (M + M.T)


def _rect(p: int, d: int, lo: float, hi: float, gen: torch.Generator) -> Tensor:
    r = min(p, d)
    U, V = _haar(p, gen)[:, :r], _haar(d, gen)[:, :r]
    return (U * _logspace(lo, hi, r)) @ V.T


@dataclass
class Problem:
    name: str
    d: int
    p: int
    cond: float
    A: Tensor
    C: Tensor
    a: Tensor
    B_f: Tensor
    b_f: Tensor
    A_g: Tensor
    C_g: Tensor
    a_g: Tensor
    B_g: Tensor
    b_g: Tensor
    phi: Tensor
    evals: Tensor  # of A, ascending
    evecs: Tensor
    theta_star: Tensor = field(init=False)
    h_star: Tensor = field(init=False)
    direct: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.theta_star = -torch.linalg.solve(self.A, self.C.T @ self.phi + self.a)  # solve 1
        grad_theta_g = self.A_g @ self.theta_star + self.C_g.T @ self.phi + self.a_g
        v = torch.linalg.solve(self.A, grad_theta_g)  # solve 2
        self.direct = self.B_g @ self.phi + self.C_g @ self.theta_star + self.b_g
        self.h_star = self.direct - self.C @ v

    def f(self, theta: Tensor, phi: Tensor) -> Tensor:
        return (
            0.5 * theta @ (self.A @ theta)
            + 0.5 * phi @ (self.B_f @ phi)
            + phi @ (self.C @ theta)
            + self.a @ theta
            + self.b_f @ phi
        )

    def g(self, theta: Tensor, phi: Tensor) -> Tensor:
        return (
            0.5 * theta @ (self.A_g @ theta)
            + 0.5 * phi @ (self.B_g @ phi)
            + phi @ (self.C_g @ theta)
            + self.a_g @ theta
            + self.b_g @ phi
        )

    def unrolled_reference(self, T: int, eta: float, theta0: Tensor) -> tuple[Tensor, Tensor]:
        """Closed-form hypergradient of ``g(theta_T)`` after T SGD steps; and ``theta_T``."""
        lam, Q = self.evals, self.evecs
        m_T = (1.0 - eta * lam) ** T
        theta_T = self.theta_star + Q @ (m_T * (Q.T @ (theta0 - self.theta_star)))
        grad_theta_g = self.A_g @ theta_T + self.C_g.T @ self.phi + self.a_g
        direct = self.B_g @ self.phi + self.C_g @ theta_T + self.b_g
        w = Q @ ((1.0 - m_T) / lam * (Q.T @ grad_theta_g))  # A^{-1} (I - M^T) grad_theta g
        return direct - self.C @ w, theta_T


def make_problem(d: int, cond: float, seed: int, p: int = P_OUTER) -> Problem:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + d * 7 + int(round(math.log10(cond))))
    A = _spd(d, _logspace(1.0 / cond, 1.0, d), gen)
    C = _rect(p, d, MU, L_CROSS, gen)
    zero_first = torch.cat([torch.zeros(1, dtype=F64), _logspace(MU, 1.0, p - 1)])
    B_f = _spd(p, zero_first, gen)
    A_g = _spd(d, _logspace(MU, 1.0, d), gen)
    C_g = _rect(p, d, MU, L_CROSS, gen)
    B_g = _spd(p, zero_first, gen)
    a, a_g = (torch.randn(d, generator=gen, dtype=F64) for _ in range(2))
    b_f, b_g, phi = (torch.randn(p, generator=gen, dtype=F64) for _ in range(3))
    evals, evecs = torch.linalg.eigh(A)
    name = f"d{d}_k{cond:.0e}".replace("e+0", "e").replace("e+", "e")
    return Problem(name, d, p, cond, A, C, a, B_f, b_f, A_g, C_g, a_g, B_g, b_g, phi, evals, evecs)


# ============================================================================ timing


@dataclass
class Runner:
    """``call(seed) -> hypergradient``; ``info(seed) -> (hypergradient, diagnostics)``."""

    key: str
    x: float  # products (implicit) or differentiated steps (trajectory)
    call: Callable[[int], Tensor]
    info: Callable[[int], tuple[Tensor, dict[str, Any]]] | None = None
    randomized: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    key: str
    x: float
    rel_err: float | None = None
    cos: float | None = None
    rel_err_all: list[float] = field(default_factory=list)
    ms: float | None = None
    cpu_ms: float | None = None
    ms_all: list[float] = field(default_factory=list)
    cpu_ms_all: list[float] = field(default_factory=list)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def run_group(runners: Sequence[Runner], repeats: int, ref: Tensor) -> list[Result]:
    """Warm up each runner once (diagnostics), then time them interleaved, order rotated."""
    results = [Result(r.key, r.x, meta=dict(r.meta)) for r in runners]
    live: list[int] = []
    warm_ms: list[float] = []
    for i, (runner, res) in enumerate(zip(runners, results)):
        with recorded_warnings(ignore_deprecations=True) as caught:
            try:
                if runner.info is not None:
                    (_, res.diagnostics), ms, _ = timed_call(partial(runner.info, 10_000))
                else:
                    _, ms, _ = timed_call(partial(runner.call, 10_000))
                warm_ms.append(ms)
            except Exception as exc:  # reported in the table
                res.error = error_text(exc, 200)
                continue
        res.warnings = warning_texts(caught, 200)
        live.append(i)
    errs: dict[int, list[float]] = {i: [] for i in live}
    coss: dict[int, list[float]] = {i: [] for i in live}
    # Cheap groups get more timed calls: the machine is shared and medians of few short
    # calls are noisy, while long calls dominate the run time.
    slowest = max(warm_ms, default=0.0)
    reps = max(repeats, 7) if slowest < 30 else max(repeats, 5) if slowest < 150 else repeats
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rep in range(reps):
            for i in rotation(live, rep):
                runner, res = runners[i], results[i]
                h, ms, cpu_ms = timed_call(partial(runner.call, rep))
                res.cpu_ms_all.append(cpu_ms)
                res.ms_all.append(ms)
                errs[i].append(relative_error(h, ref))
                coss[i].append(cosine(h, ref))
    for i in live:
        res = results[i]
        res.ms = statistics.median(res.ms_all)
        res.cpu_ms = statistics.median(res.cpu_ms_all)
        res.rel_err_all = errs[i]
        res.rel_err = statistics.median(errs[i])
        res.cos = statistics.median(coss[i])
    return results


# ============================================================================ part 1


def implicit_runner(
    pb: Problem, key: str, x: float, make: Callable[[int], hg.Solver], randomized: bool = False
) -> Runner:
    def call(seed: int) -> Tensor:
        return hg.implicit(pb.f, pb.g, pb.theta_star, pb.phi, make(seed))

    def info(seed: int) -> tuple[Tensor, dict[str, Any]]:
        h, inf = hg.implicit(pb.f, pb.g, pb.theta_star, pb.phi, make(seed), return_info=True)
        diag = {
            "num_hvps": inf.num_hvps,
            "status": inf.status,
            "relative_residual": inf.relative_residual,
            "iterations": inf.iterations,
        }
        if "alpha" in inf.stats:
            diag["alpha"] = inf.stats["alpha"]
        return h, diag

    return Runner(key, x, call, info, randomized)


def _with_hvps(results: list[Result]) -> list[Result]:
    """Plot against the products actually spent (CG and NystromPCG may stop early)."""
    for res in results:
        if isinstance(res.diagnostics.get("num_hvps"), int):
            res.x = res.diagnostics["num_hvps"]
    return results


def implicit_part(
    pb: Problem, budgets: Sequence[int], repeats: int
) -> tuple[list[Result], dict[str, Any]]:
    lam_min, lam_max = float(pb.evals[0]), float(pb.evals[-1])
    rho_med = float(pb.evals.median())
    rho_low = lam_min / 100
    extra = {"lambda_min": lam_min, "lambda_max": lam_max, "rho_median": rho_med}
    extra["rho_low"] = rho_low
    results: list[Result] = []
    base = [
        implicit_runner(pb, "Identity(1/L)", 0, lambda s: hg.Identity(scale=1.0 / lam_max)),
        implicit_runner(pb, "Exact()", pb.d, lambda s: hg.Exact()),
    ]
    log(f"  [{pb.name}] Identity, Exact")
    results += _with_hvps(run_group(base, repeats, pb.h_star))
    for k in budgets:
        if k > 5 * pb.d:
            continue
        log(f"  [{pb.name}] k = {k}")
        group = [
            implicit_runner(pb, "CG", k, lambda s, k=k: hg.CG(maxiter=k, tol=0.0)),
            implicit_runner(
                pb, "Neumann auto", k + POWER_ITERS, lambda s, k=k: hg.Neumann(k, alpha="auto")
            ),
        ]
        if k <= min(pb.d, NYSTROM_MAX_RANK):
            for sketch in ("column", "gaussian"):
                for tag, rho in (("median", rho_med), ("lmin/100", rho_low)):
                    group.append(
                        implicit_runner(
                            pb,
                            f"Nystrom {sketch}, rho={tag}",
                            k,
                            lambda s, k=k, rho=rho, sketch=sketch: hg.Nystrom(
                                rank=k, rho=rho, sketch=sketch, seed=s
                            ),
                            randomized=True,
                        )
                    )
        if k >= 2:
            r, it = k // 2, k - k // 2
            group.append(
                implicit_runner(
                    pb,
                    "NystromPCG",
                    k,
                    lambda s, r=r, it=it: hg.NystromPCG(rank=r, maxiter=it, tol=0.0, seed=s),
                    randomized=True,
                )
            )
        for res in _with_hvps(run_group(group, repeats, pb.h_star)):
            res.meta["k"] = k
            results.append(res)
    return results, extra


def batched_vs_sequential(pb: Problem, r: int, repeats: int) -> dict[str, Any]:
    """Time of r Hessian-vector products: batched (vmapped backward) vs one at a time."""
    op = hg.HessianOperator(pb.f, pb.theta_star, pb.phi)
    V = torch.randn(r, pb.d, generator=torch.Generator().manual_seed(1), dtype=F64)
    op.matmat(V[:2])
    op.matvec(V[0])
    batched, sequential = [], []
    for rep in range(repeats):
        order = ("b", "s") if rep % 2 == 0 else ("s", "b")
        for which in order:
            started = time.perf_counter()
            if which == "b":
                Y = op.matmat(V)
                batched.append(1e3 * (time.perf_counter() - started))
            else:
                Z = torch.stack([op.matvec(v) for v in V])
                sequential.append(1e3 * (time.perf_counter() - started))
    diff = float((Y - Z).abs().max() / Z.abs().max())
    op.release()
    b, s = statistics.median(batched), statistics.median(sequential)
    return {"r": r, "batched_ms": b, "sequential_ms": s, "ratio": b / s, "max_rel_diff": diff}


# ============================================================================ part 2


def trajectory_part(
    pb: Problem, horizons: Sequence[int], repeats: int
) -> tuple[list[Result], dict[str, Any]]:
    eta = 1.0 / float(pb.evals[-1])
    opt = hg.optim.sgd(lr=eta)
    theta0 = torch.zeros(pb.d, dtype=F64)
    results: list[Result] = []
    checks: dict[str, Any] = {"eta": eta}
    T_max = max(horizons)
    for T in horizons:
        ref, theta_T = pb.unrolled_reference(T, eta, theta0)
        gap = relative_error(ref, pb.h_star)
        log(f"  [{pb.name}] T = {T}")

        def traj(fn: Callable[..., Any], T: int = T, **kw: Any) -> Callable[[int], Tensor]:
            return lambda s: fn(pb.f, pb.g, theta0, pb.phi, T, opt, **kw)

        def traj_info(
            fn: Callable[..., Any], T: int = T, theta_T: Tensor = theta_T, **kw: Any
        ) -> Callable[[int], Any]:
            def info(s: int) -> tuple[Tensor, dict[str, Any]]:
                h, inf = fn(pb.f, pb.g, theta0, pb.phi, T, opt, return_info=True, **kw)
                params_err = relative_error(inf.params, theta_T)
                return h, {
                    "reverse_steps": inf.reverse_steps,
                    "stored_states": inf.stored_states,
                    "theta_T_rel_err": params_err,
                }

            return info

        group = [
            Runner("unrolled", T, traj(hg.unrolled), traj_info(hg.unrolled)),
            Runner("forward_mode", T, traj(hg.forward_mode), traj_info(hg.forward_mode)),
            Runner("drmad", T, traj(hg.drmad), traj_info(hg.drmad)),
        ]
        if T == T_max:
            for K in TRUNCATIONS:
                if K < T:
                    group.append(
                        Runner(
                            f"truncated (T={T})",
                            K,
                            traj(hg.unrolled, truncate=K),
                            traj_info(hg.unrolled, truncate=K),
                            meta={"K": K},
                        )
                    )
        for res in run_group(group, repeats, ref):
            res.meta.update({"T": T, "T_step_vs_implicit": gap})
            results.append(res)
        check = hg.unrolled(pb.f, pb.g, theta0, pb.phi, T, opt)
        checks[f"T={T}: hg.unrolled vs closed form"] = relative_error(check, ref)
    return results, checks


# ============================================================================ output


def _sci(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.2e}"


def _ms(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def _implicit_lines(res: list[Result], budgets: list[int]) -> list[str]:
    keys = list(dict.fromkeys(r.key for r in res if "k" in r.meta))
    by = {(r.key, r.meta.get("k")): r for r in res}
    ks = [k for k in budgets if any((key, k) in by for key in keys)]
    lines: list[str] = []
    for title, fmt in (
        ("relative error ||h - h*|| / ||h*||", lambda r: _sci(r.rel_err)),
        ("cosine(h, h*)", lambda r: "—" if r.cos is None else f"{r.cos:.6f}"),
        ("median wall ms per hg.implicit call", lambda r: _ms(r.ms)),
        ("products reported (info.num_hvps)", lambda r: str(r.diagnostics.get("num_hvps", ""))),
    ):
        lines += [
            "",
            f"{title}, by budget k:",
            "",
            "| solver | " + " | ".join(f"k={k}" for k in ks) + " |",
            "|---|" + "---:|" * len(ks),
        ]
        for key in keys:
            cells = []
            for k in ks:
                r = by.get((key, k))
                cells.append("" if r is None else ("error" if r.error else fmt(r)))
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


def markdown_problem(pb: Problem, entry: dict[str, Any], budgets: list[int]) -> str:
    imp: list[Result] = entry["implicit_results"]
    tr: list[Result] = entry["trajectory_results"]
    ex = entry["implicit_extra"]
    lines = [
        f"## {pb.name}: d = {pb.d}, p = {pb.p}, cond(A) = {pb.cond:g}",
        "",
        f"- A: eigenvalues in [{ex['lambda_min']:.3g}, {ex['lambda_max']:.3g}]; "
        f"||h*|| = {entry['h_star_norm']:.4g}; ||direct term|| / ||h*|| = "
        f"{entry['direct_ratio']:.3g}; ||theta*|| = {entry['theta_star_norm']:.4g}",
        f"- checks: {'; '.join(f'{k} = {v:.2e}' for k, v in entry['checks'].items())}",
        f"- Nystrom rho: median eigenvalue = {ex['rho_median']:.3g}, lambda_min / 100 = "
        f"{ex['rho_low']:.3g}; Neumann auto spends k + {POWER_ITERS} products",
    ]
    fixed = [r for r in imp if "k" not in r.meta]
    for r in fixed:
        hv = r.diagnostics.get("num_hvps", "")
        lines.append(
            f"- {r.key}: {hv} products, rel. err {_sci(r.rel_err)}, cos "
            f"{'—' if r.cos is None else f'{r.cos:.6f}'}, {_ms(r.ms)} ms"
        )
    bvs = entry["batched_vs_sequential"]
    lines.append(
        f"- {bvs['r']} Hessian-vector products: batched (HessianOperator.matmat, used by "
        f"Nystrom and Exact) {_ms(bvs['batched_ms'])} ms, sequential matvec "
        f"{_ms(bvs['sequential_ms'])} ms (ratio {bvs['ratio']:.2f}; results agree to "
        f"{bvs['max_rel_diff']:.1e})"
    )
    lines += ["", "### Implicit solvers at theta*"]
    lines += _implicit_lines(imp, budgets)
    notes = sorted(
        {
            f"{r.key} k={r.meta.get('k')}: status {r.diagnostics.get('status')}"
            for r in imp
            if r.diagnostics.get("status") in ("negative_curvature", "diverged")
        }
        | {f"{r.key} k={r.meta.get('k')}: {r.error}" for r in imp if r.error}
    )
    if notes:
        lines += ["", "Solver statuses and errors:", ""] + [f"- {n}" for n in notes]
    tc = entry["trajectory_checks"]
    lines += [
        "",
        f"### Trajectory methods: T steps of SGD (lr = {tc['eta']:.3g}) from theta_0 = 0",
        "",
        "Reference: the closed-form hypergradient of the unrolled loop of the same T. "
        + "; ".join(f"{k} = {v:.2e}" for k, v in tc.items() if k != "eta"),
        "",
        "| method | T | reverse steps | ||h_T - h*|| / ||h*|| | rel. err | cos | ms | CPU ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in tr:
        rs = r.diagnostics.get("reverse_steps", "")
        if r.key == "forward_mode":
            rs = f"— ({r.meta['T']} x {pb.p} tangents)"
        lines.append(
            f"| {r.key} | {r.meta['T']} | {rs} | {r.meta['T_step_vs_implicit']:.3g} | "
            f"{'error' if r.error else _sci(r.rel_err)} | "
            f"{'—' if r.cos is None else f'{r.cos:.6f}'} | {_ms(r.ms)} | {_ms(r.cpu_ms)} |"
        )
    return "\n".join(lines)


def _styles() -> dict[str, dict[str, Any]]:
    return {
        "CG": {"color": "C0", "marker": "o"},
        "Neumann auto": {"color": "C1", "marker": "s"},
        "Nystrom column, rho=median": {
            "color": "C2",
            "marker": "^",
            "markersize": 9,
            "mfc": "none",
        },
        "Nystrom column, rho=lmin/100": {
            "color": "C2",
            "marker": "v",
            "linestyle": "--",
            "markersize": 9,
            "mfc": "none",
        },
        "Nystrom gaussian, rho=median": {"color": "C3", "marker": "^"},
        "Nystrom gaussian, rho=lmin/100": {"color": "C3", "marker": "v", "linestyle": "--"},
        "NystromPCG": {"color": "C4", "marker": "D"},
        "Exact()": {"color": "k", "marker": "*", "linestyle": "none", "markersize": 10},
        "Identity(1/L)": {"color": "C7", "linestyle": ":"},
        "unrolled": {"color": "C0", "marker": "o"},
        "forward_mode": {"color": "C1", "marker": "s"},
        "drmad": {"color": "C3", "marker": "D"},
    }


FLOOR = 1e-17  # errors are drawn at least at this value (exact methods reach ~1e-15)


def plot(problems: dict[str, dict[str, Any]], which: str, path: Path, title: str) -> str | None:
    try:
        plt = pyplot()
    except Exception as exc:  # plots are optional
        return error_text(exc)
    names = list(problems)
    fig, axes = plt.subplots(len(names), 2, figsize=(13, 3.9 * len(names)), squeeze=False)
    styles = _styles()
    for row, name in enumerate(names):
        results: list[Result] = problems[name][f"{which}_results"]
        keys = list(dict.fromkeys(r.key for r in results if r.error is None))
        for col, xkey in enumerate(("x", "ms")):
            ax = axes[row][col]
            for key in keys:
                pts = [r for r in results if r.key == key and r.error is None]
                pts.sort(key=lambda r: r.x)
                ys = [max(r.rel_err or FLOOR, FLOOR) for r in pts]
                xs = [r.x if xkey == "x" else r.ms for r in pts]
                style = dict(styles.get(key, {"marker": "x", "color": "C5"}))
                if key == "Identity(1/L)" and xkey == "x":
                    ax.axhline(ys[0], label=f"{key} (0 products)", **style)
                    continue
                if key == "Identity(1/L)":
                    style["marker"] = "x"
                    style["linestyle"] = "none"
                ax.plot(xs, ys, label=key, **style)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_ylabel("relative error")
            if which == "implicit":
                ax.set_xlabel(
                    "Hessian-vector products (num_hvps)" if xkey == "x" else "wall ms per call"
                )
            else:
                ax.set_xlabel(
                    "steps differentiated (truncated: K; others: T)"
                    if xkey == "x"
                    else "wall ms per call"
                )
            what = ("products" if which == "implicit" else "steps") if xkey == "x" else "time"
            ax.set_title(f"{name}: error vs {what}", fontsize=10)
            if col == 1:
                ax.legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    save_figure(fig, path, dpi=110)
    return None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run (< 60 s)")
    p.add_argument("--repeats", type=int, help="timed calls per method (default 3, quick 2)")
    add_common_arguments(p)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = start_run(args.seed, args.threads)
    specs = QUICK_PROBLEMS if args.quick else FULL_PROBLEMS
    budgets = list(QUICK_BUDGETS if args.quick else FULL_BUDGETS)
    horizons = QUICK_HORIZONS if args.quick else FULL_HORIZONS
    repeats = args.repeats or (2 if args.quick else 3)
    machine = machine_info()
    header = [
        "# Quadratic bilevel problem (benchopt's simulated quadratic): accuracy against cost",
        "",
        machine_line(machine),
        f"- hypergradient {machine['hypergradient']}; float64; seed {args.seed}; "
        f"{'quick' if args.quick else 'full'} run; median of n timed calls after a "
        f"warm-up, interleaved (n = {repeats}, 5 for groups of calls under 150 ms, 7 under "
        "30 ms); randomized solvers: median error over seeds 0..n-1",
        "- f = 1/2 t'At + 1/2 p'B_f p + p'Ct + a't + b_f'p, g likewise with (A_g, B_g, C_g, "
        "a_g, b_g); h* = d_phi g - C A^-1 grad_theta g at theta* = -A^-1 (C'phi + a) "
        f"(two dense solves); p = {P_OUTER}",
        "- rel. err = ||h - h*|| / ||h*||, cos = cosine(h, h*); errors below 1e-17 are "
        "drawn at 1e-17",
    ]
    print("\n".join(header), flush=True)
    problems: dict[str, dict[str, Any]] = {}
    pbs: dict[str, Problem] = {}
    sections: list[str] = []
    for d, cond in specs:
        pb = make_problem(d, cond, args.seed)
        log(f"[{pb.name}] reference and checks ...")
        exact = hg.implicit(pb.f, pb.g, pb.theta_star, pb.phi, hg.Exact())
        grad_f = torch.func.grad(pb.f)(pb.theta_star, pb.phi)
        checks = {
            "hg.Exact vs closed form": relative_error(exact, pb.h_star),
            "||grad_theta f(theta*)||": float(torch.linalg.vector_norm(grad_f)),
            "cond(A) measured": float(pb.evals[-1] / pb.evals[0]),
        }
        entry: dict[str, Any] = {
            "d": d,
            "p": pb.p,
            "cond": cond,
            "h_star_norm": float(torch.linalg.vector_norm(pb.h_star)),
            "direct_ratio": float(
                torch.linalg.vector_norm(pb.direct) / torch.linalg.vector_norm(pb.h_star)
            ),
            "theta_star_norm": float(torch.linalg.vector_norm(pb.theta_star)),
            "checks": checks,
        }
        imp, extra = implicit_part(pb, budgets, repeats)
        entry["implicit_results"], entry["implicit_extra"] = imp, extra
        entry["batched_vs_sequential"] = batched_vs_sequential(pb, min(pb.d, 100), max(repeats, 5))
        log(f"[{pb.name}] trajectory methods ...")
        tr, tchecks = trajectory_part(pb, horizons, repeats)
        entry["trajectory_results"], entry["trajectory_checks"] = tr, tchecks
        problems[pb.name], pbs[pb.name] = entry, pb
        section = markdown_problem(pb, entry, budgets)
        print("\n" + section, flush=True)
        sections.append(section)

    args.out.mkdir(parents=True, exist_ok=True)
    plot_errors = {}
    for which, title in (
        ("implicit", "Implicit solvers at theta*: relative error vs products and vs time"),
        ("trajectory", "Trajectory methods (SGD from theta_0 = 0): relative error vs steps/time"),
    ):
        path = args.out / f"quadratic_bilevel_{which}.png"
        err = plot(problems, which, path, title)
        plot_errors[which] = err
        log(f"wrote {path}" if err is None else f"plot skipped: {err}")
    total, footer = wall_footer(started)
    report = {
        "machine": machine,
        "args": vars(args),
        "settings": {
            "budgets": budgets,
            "horizons": list(horizons),
            "repeats": repeats,
            "p": P_OUTER,
            "mu": MU,
            "L_cross": L_CROSS,
            "nystrom_max_rank": NYSTROM_MAX_RANK,
            "truncations": list(TRUNCATIONS),
        },
        "problems": problems,
        "plots": {k: None if v else f"quadratic_bilevel_{k}.png" for k, v in plot_errors.items()},
        "total_seconds": total,
    }
    write_results(args.out, "quadratic_bilevel", header, sections, footer, jsonable(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
