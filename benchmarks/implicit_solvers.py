"""Accuracy and cost of the implicit-hypergradient solvers, against an exact reference.

What is measured
----------------
Three bilevel problems, each given as ``inner_loss f(params, hparams)``,
``outer_loss g(params, hparams)``, ``params`` at the inner optimum and ``hparams``:

ridge
    Ridge regression on generated data (200 train / 200 validation examples, 50
    features with column scales from e^-1 to e^1), one L2 penalty per feature:
    ``f = 0.5 ||X w - y||^2 / n + 0.5 sum_i lam_i w_i^2`` with ``lam_i`` in [1e-3, 1e-1],
    ``g`` = half mean squared validation error. The inner problem and the hypergradient
    ``dg/dlam = -(A^{-1} grad_w g) * w`` (``A`` the Hessian) are in closed form; that is the
    reference, and ``hg.Exact()`` is checked against it.
logreg
    Logistic regression on scikit-learn's ``load_breast_cancer`` (standardized with the
    training statistics; 284 train / 285 validation examples; 30 weights + 1 bias),
    hyperparameters ``loglam`` (30 log weight decays in [log 1e-3, log 1e-1]),
    ``f = BCE_train + 0.5 sum_i exp(loglam_i) w_i^2``, ``g = BCE_val``. The inner problem is
    solved by Newton's method with the dense Hessian to ``||grad f|| < 1e-10``.
    Reference: ``hg.Exact()``.
mlp
    A tanh MLP 64 -> 32 -> 10 (2410 parameters) on scikit-learn's ``load_digits``
    (standardized; 1000 train / 797 validation examples), one log weight decay per
    parameter (2410 hyperparameters, ``exp(loglam)`` in [1e-3, 1e-2]),
    ``f = CE_train + 0.5 sum exp(loglam) * theta^2``, ``g = CE_val``. The inner problem is
    solved by L-BFGS (strong Wolfe) followed by Newton steps with the dense Hessian; the
    final inner gradient norm and the Hessian's extreme eigenvalues are printed.
    Reference: ``hg.Exact()``.

For every problem the reference is also recomputed independently of this library (dense
Hessian from ``torch.func.jacrev(torch.func.grad(f))``, ``torch.linalg.solve``, mixed term
by plain double backward) and the discrepancy is printed. The reference is always
computed in float64, also with ``--dtype float32`` (then only the solvers run in float32).

Solvers at a budget of ``k`` Hessian-vector products (k = 5, 10, 20, 50, 100):

* ``CG``            ``hg.CG(maxiter=k, tol=0)``: k products.
* ``Neumann auto``  ``hg.Neumann(iters=k, alpha="auto")``: k products plus the default 20
  power iterations that estimate lambda_max (so k + 20 products, reported as such).
* ``Neumann 1/L``   ``hg.Neumann(iters=k, alpha=1/lambda_max)``, lambda_max of the exact
  Hessian, computed once per problem: k products.
* ``Nystrom col``   ``hg.Nystrom(rank=k, rho=rho, sketch="column", seed=s)``: k products
  (clamped to the dimension when k exceeds it).
* ``Nystrom gauss`` ``hg.Nystrom(rank=k, rho=rho, sketch="gaussian", seed=s)``.
* ``NystromPCG``    ``hg.NystromPCG(rank=k//2, maxiter=k-k//2, tol=0, seed=s)``: k products.
* ``Identity``      ``hg.Identity(scale=1/lambda_max)``: 0 products (shown once, k = 0).

Nystrom uses two values of ``rho`` per problem, both printed: ``0.1`` (the default of the
seed library's examples) and the median eigenvalue of the exact Hessian (an oracle value:
``(A_nys + rho I)^{-1}`` treats every unsketched direction as if its eigenvalue were
``rho``; in a scan over rho in [1e-5, 1] at ranks 5-100 the relative error was smallest,
about 0.7-1.0 below full rank, within a factor of 3 of the median eigenvalue on all three
problems, while ``rho = lambda_min`` gave relative errors of 2 to 70).

Randomized solvers (Nystrom, NystromPCG) use seed ``s = repeat index``; their error is the
median over the repeats (seeds). For every call the script records: relative error
``||h - h*|| / ||h*||`` and cosine similarity to the exact hypergradient ``h*``, the
``num_hvps`` and ``status`` reported by ``hg.implicit(..., return_info=True)`` (taken from
the warm-up call: the timed calls use ``return_info=False``, because ``return_info=True``
spends one extra product on the residual for solvers that do not track it), and time:
the median over ``--repeats`` calls after one warm-up call, both wall time
(``time.perf_counter``, the "ms" columns) and process CPU time (``time.process_time``).
The machine this was written on is shared with other jobs: wall time then includes time
slices lost to them, which penalizes long calls more than short ones, while CPU time
(with the default single intra-op thread) counts only the work of this process. Ratios
are shown for both.

Cost ratio: for CG, the time of one whole ``hg.implicit`` call with k products divided by
the time of one gradient of ``f`` (``torch.autograd.grad`` of ``f`` with respect to
``params`` at the same point; the median over repeats of the mean of a batch of calls
lasting >= 5 ms), printed next to the floor ``k + 3`` (k products, plus about one
gradient each for the double-backward graph of ``f``, the gradient of ``g`` and the
mixed product).

The seed library ``hypergrad`` (PyPI 0.0.1; ``pip install --no-deps hypergrad==0.0.1``,
needs the ``functorch`` shim that torch still ships) is run on the same problems and
budgets when it is importable: ``hypergrad.approx_hypergrad.conjugate_gradient`` with
``lr=1.0`` and with ``lr=0.1`` (the value its ``examples/logistic_regression.py`` uses),
``neumann`` with ``lr = 1/lambda_max`` (the same alpha as ``Neumann 1/L``) and ``nystrom``
with the same ranks and ``rho`` values as ``Nystrom col``; before each of its ``nystrom``
calls the global torch generator is seeded with the same ``s``, so both libraries sample
the same columns. Each of its calls is timed interleaved with the matching call of ours
(order rotated every repeat), and the ratios theirs / ours of the median wall and CPU
times are printed.
It is never a dependency of ``hypergradient``.

Run
---
    .venv/bin/python benchmarks/implicit_solvers.py            # full run, ~3-10 minutes
    .venv/bin/python benchmarks/implicit_solvers.py --quick    # smoke run, < 60 s

It prints Markdown tables and the machine, and writes ``benchmarks/results/
implicit_solvers.json`` and ``implicit_solvers.md`` (``--out`` to change the folder).
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from types import ModuleType
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
    import_seed_library,
    jsonable,
    lbfgs,
    load_sklearn,
    log,
    machine_info,
    machine_line,
    recorded_warnings,
    relative_error,
    rotation,
    standardize,
    start_run,
    timed_call,
    unflat,
    wall_footer,
    warning_texts,
    write_results,
)

F64 = torch.float64
Params = tuple[Tensor, ...]
Loss = Callable[[Params, Params], Tensor]
FULL_BUDGETS = (5, 10, 20, 50, 100)
QUICK_BUDGETS = (5, 20)
# Chunk of batched Hessian-vector products for the dense references (bounds memory).
DENSE_CHUNK = 64


# ============================================================================ problems


@dataclass
class Instance:
    """One problem at one dtype: what ``hg.implicit`` and ``hypergrad`` are given."""

    inner_loss: Loss
    outer_loss: Loss
    params: Params
    hparams: Params


@dataclass
class Problem:
    """A bilevel problem, solved once in float64.

    ``make(dtype)`` returns the losses (closing over the data cast to ``dtype``) and the
    inner solution and hyperparameters cast to ``dtype``. ``setup`` holds diagnostics of
    the inner solve; ``closed_form`` the analytic hypergradient when there is one.
    """

    name: str
    description: str
    make: Callable[[torch.dtype], Instance]
    setup: dict[str, Any]
    closed_form: Tensor | None = None


def ridge_problem(seed: int) -> Problem:
    """Per-feature ridge regression on generated data; closed-form reference."""
    g = torch.Generator().manual_seed(seed)
    n, n_val, d = 200, 200, 50
    scales = torch.exp(torch.linspace(-1.0, 1.0, d, dtype=F64))
    X = torch.randn(n + n_val, d, generator=g, dtype=F64) * scales
    w_true = torch.randn(d, generator=g, dtype=F64)
    y = X @ w_true + 0.5 * torch.randn(n + n_val, generator=g, dtype=F64)
    lam = 10.0 ** (-3.0 + 2.0 * torch.rand(d, generator=g, dtype=F64))
    Xt, yt, Xv, yv = X[:n], y[:n], X[n:], y[n:]

    A = Xt.T @ Xt / n + torch.diag(lam)
    w = torch.linalg.solve(A, Xt.T @ yt / n)
    grad_w_g = Xv.T @ (Xv @ w - yv) / n_val
    closed = -torch.linalg.solve(A, grad_w_g) * w
    inner_grad = A @ w - Xt.T @ yt / n

    def make(dtype: torch.dtype) -> Instance:
        xt, ytr, xv, yva = (t.to(dtype) for t in (Xt, yt, Xv, yv))

        def inner_loss(params: Params, hparams: Params) -> Tensor:
            (wt,) = params
            (lm,) = hparams
            r = xt @ wt - ytr
            return 0.5 * (r @ r) / n + 0.5 * torch.sum(lm * wt**2)

        def outer_loss(params: Params, hparams: Params) -> Tensor:
            (wt,) = params
            r = xv @ wt - yva
            return 0.5 * (r @ r) / n_val

        return Instance(inner_loss, outer_loss, (w.to(dtype),), (lam.to(dtype),))

    setup = {
        "num_params": d,
        "num_hparams": d,
        "n_train": n,
        "n_val": n_val,
        "inner_solver": "closed form (torch.linalg.solve)",
        "inner_grad_norm": float(torch.linalg.vector_norm(inner_grad)),
    }
    return Problem(
        "ridge",
        "ridge regression, generated data n=200 d=50, per-feature L2 lam in [1e-3, 1e-1]",
        make,
        setup,
        closed,
    )


def logreg_problem(seed: int) -> Problem:
    """Per-feature L2 logistic regression on breast cancer; Newton inner solve."""
    g = torch.Generator().manual_seed(seed)
    X, y = load_sklearn("breast_cancer", generator=g)
    n = len(y) // 2
    X = standardize(X, n)
    Xt, yt, Xv, yv = X[:n], y[:n], X[n:], y[n:]
    d = X.shape[1]
    loglam = math.log(1e-3) + (math.log(1e-1) - math.log(1e-3)) * torch.rand(
        d, generator=g, dtype=F64
    )

    def f_flat(theta: Tensor) -> Tensor:
        logits = Xt @ theta[:d] + theta[d]
        bce = F.binary_cross_entropy_with_logits(logits, yt)
        return bce + 0.5 * torch.sum(torch.exp(loglam) * theta[:d] ** 2)

    started = time.perf_counter()
    theta, iters, gnorm = damped_newton(
        f_flat, torch.zeros(d + 1, dtype=F64), tol=1e-10, chunk_size=DENSE_CHUNK
    )
    seconds = time.perf_counter() - started
    w, b = theta[:d].clone(), theta[d:].clone()  # bias of shape (1,), not 0-d

    def make(dtype: torch.dtype) -> Instance:
        xt, ytr, xv, yva = (t.to(dtype) for t in (Xt, yt, Xv, yv))

        def inner_loss(params: Params, hparams: Params) -> Tensor:
            wt, bt = params
            (ll,) = hparams
            bce = F.binary_cross_entropy_with_logits(xt @ wt + bt, ytr)
            return bce + 0.5 * torch.sum(torch.exp(ll) * wt**2)

        def outer_loss(params: Params, hparams: Params) -> Tensor:
            wt, bt = params
            return F.binary_cross_entropy_with_logits(xv @ wt + bt, yva)

        return Instance(inner_loss, outer_loss, (w.to(dtype), b.to(dtype)), (loglam.to(dtype),))

    setup = {
        "num_params": d + 1,
        "num_hparams": d,
        "n_train": n,
        "n_val": len(y) - n,
        "inner_solver": f"Newton (dense Hessian), {iters} iterations, {seconds:.2f} s",
        "inner_grad_norm": gnorm,
    }
    return Problem(
        "logreg",
        "logistic regression, breast cancer (30 features + bias), log per-feature L2",
        make,
        setup,
    )


def mlp_problem(seed: int, lbfgs_iters: int) -> Problem:
    """Tanh MLP 64-32-10 on digits with one log weight decay per parameter."""
    g = torch.Generator().manual_seed(seed)
    X, y = load_sklearn("digits", y_dtype=torch.long, generator=g)
    n = 1000
    X = standardize(X, n)
    Xt, yt, Xv, yv = X[:n], y[:n], X[n:], y[n:]
    shapes = [(32, 64), (32,), (10, 32), (10,)]
    init = (
        torch.randn(32, 64, generator=g, dtype=F64) / 8.0,
        torch.zeros(32, dtype=F64),
        torch.randn(10, 32, generator=g, dtype=F64) / math.sqrt(32.0),
        torch.zeros(10, dtype=F64),
    )
    lo, hi = math.log(1e-3), math.log(1e-2)
    loglam = tuple(lo + (hi - lo) * torch.rand(s, generator=g, dtype=F64) for s in shapes)

    def forward(params: Params, x: Tensor) -> Tensor:
        W1, b1, W2, b2 = params
        return torch.tanh(x @ W1.T + b1) @ W2.T + b2

    def penalty(params: Params, hparams: Params) -> Tensor:
        return 0.5 * sum(torch.sum(torch.exp(ll) * p**2) for p, ll in zip(params, hparams))

    def f_flat(theta: Tensor) -> Tensor:
        p = unflat(theta, init)
        return F.cross_entropy(forward(p, Xt), yt) + penalty(p, loglam)

    started = time.perf_counter()
    theta = flat(init).clone()
    lbfgs_total, newton_iters, gnorm = 0, 0, float("inf")
    while True:
        theta = lbfgs(f_flat, theta, lbfgs_iters)
        lbfgs_total += lbfgs_iters
        try:  # Newton polish; needs a positive-definite Hessian, else more L-BFGS
            theta, newton_iters, gnorm = damped_newton(
                f_flat, theta, tol=1e-10, maxiter=20, chunk_size=DENSE_CHUNK
            )
            break
        except NotPositiveDefinite:
            if lbfgs_total >= 20 * lbfgs_iters:
                raise
    seconds = time.perf_counter() - started
    params = unflat(theta.clone(), init)
    with torch.no_grad():
        train_acc = float((forward(params, Xt).argmax(1) == yt).double().mean())
        val_acc = float((forward(params, Xv).argmax(1) == yv).double().mean())

    def make(dtype: torch.dtype) -> Instance:
        xt, xv = Xt.to(dtype), Xv.to(dtype)

        def inner_loss(ps: Params, hs: Params) -> Tensor:
            return F.cross_entropy(forward(ps, xt), yt) + penalty(ps, hs)

        def outer_loss(ps: Params, hs: Params) -> Tensor:
            return F.cross_entropy(forward(ps, xv), yv)

        return Instance(
            inner_loss,
            outer_loss,
            tuple(p.to(dtype) for p in params),
            tuple(h.to(dtype) for h in loglam),
        )

    setup = {
        "num_params": int(theta.numel()),
        "num_hparams": int(theta.numel()),
        "n_train": n,
        "n_val": len(y) - n,
        "inner_solver": (
            f"{lbfgs_total} L-BFGS iterations then {newton_iters} Newton steps ({seconds:.1f} s)"
        ),
        "inner_grad_norm": gnorm,
        "train_accuracy": train_acc,
        "val_accuracy": val_acc,
    }
    return Problem(
        "mlp",
        "tanh MLP 64-32-10, digits, one log weight decay per parameter (exp in [1e-3, 1e-2])",
        make,
        setup,
    )


# ============================================================================ references


@dataclass
class Reference:
    """The exact hypergradient ``h*`` (float64) and the exact Hessian's spectrum."""

    h: Tensor
    lambda_min: float
    lambda_median: float
    lambda_max: float
    checks: dict[str, float]
    exact_ms: float


def dense_hypergradient(inst: Instance) -> tuple[Tensor, Tensor]:
    """Hypergradient by plain torch (no ``hypergradient`` code): dense H, solve, mixed term.

    Returns ``(h, eigenvalues of H)``.
    """
    theta0 = flat(inst.params).detach()
    hp = tuple(h.detach() for h in inst.hparams)

    def f_flat(theta: Tensor) -> Tensor:
        return inst.inner_loss(unflat(theta, inst.params), hp)

    H = torch.func.jacrev(torch.func.grad(f_flat), chunk_size=DENSE_CHUNK)(theta0)
    H = 0.5 * (H + H.T)
    ps = tuple(p.detach().clone().requires_grad_(True) for p in inst.params)
    hs = tuple(h.detach().clone().requires_grad_(True) for h in inst.hparams)
    g_out = inst.outer_loss(ps, hs)
    grads = torch.autograd.grad(g_out, ps + hs, allow_unused=True)
    g_theta = flat([torch.zeros_like(p) if gr is None else gr for p, gr in zip(ps, grads)])
    g_phi = [torch.zeros_like(h) if gr is None else gr for h, gr in zip(hs, grads[len(ps) :])]
    v = torch.linalg.solve(H, g_theta)
    grad_theta_f = torch.autograd.grad(inst.inner_loss(ps, hs), ps, create_graph=True)
    inner_product = torch.dot(flat(grad_theta_f), v)
    mixed = torch.autograd.grad(inner_product, hs, allow_unused=True)
    h = flat([gp - (0 if m is None else m) for gp, m in zip(g_phi, mixed)])
    return h.detach(), torch.linalg.eigvalsh(H)


def compute_reference(problem: Problem) -> Reference:
    """``h*``: closed form (ridge) or ``hg.Exact()``, cross-checked; spectrum of H."""
    inst = problem.make(F64)
    started = time.perf_counter()
    h_exact, info = hg.implicit(
        inst.inner_loss,
        inst.outer_loss,
        inst.params,
        inst.hparams,
        solver=hg.Exact(chunk_size=DENSE_CHUNK),
        return_info=True,
    )
    exact_ms = 1e3 * (time.perf_counter() - started)
    h_exact = flat(h_exact)
    h_dense, evals = dense_hypergradient(inst)
    checks = {
        "hg.Exact vs torch dense (rel. diff)": relative_error(h_exact, h_dense),
        "hg.Exact inner_grad_norm": info.inner_grad_norm,
        "hg.Exact relative_residual": float(info.relative_residual or 0.0),
    }
    if problem.closed_form is not None:
        h_ref = problem.closed_form
        checks["hg.Exact vs closed form (rel. diff)"] = relative_error(h_exact, h_ref)
        checks["torch dense vs closed form (rel. diff)"] = relative_error(h_dense, h_ref)
    else:
        h_ref = h_exact
    median = float(evals.median())
    return Reference(h_ref, float(evals[0]), median, float(evals[-1]), checks, exact_ms)


# ============================================================================ runners


@dataclass
class Outcome:
    """What one call returned: the flat hypergradient and the library's diagnostics."""

    h: Tensor
    num_hvps: int | None = None
    status: str = ""


@dataclass
class Runner:
    """A named callable timed in a group; ``call(seed, with_info)`` computes once."""

    key: str
    impl: str  # "hypergradient", "hypergrad" or "autograd"
    call: Callable[[int, bool], Outcome]
    repeat_inside: int = 1  # calls per timing sample (for sub-millisecond callables)


@dataclass
class Measurement:
    """Everything recorded for one runner in one group (times in milliseconds)."""

    key: str
    impl: str
    rel_err: float | None = None
    cos: float | None = None
    rel_err_all: list[float] = field(default_factory=list)
    num_hvps: int | None = None
    status: str = ""
    ms: float | None = None
    ms_all: list[float] = field(default_factory=list)
    cpu_ms: float | None = None
    cpu_ms_all: list[float] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    warned_calls: int = 0  # timed calls that raised a warning (other than deprecations)
    error: str | None = None


def ours(inst: Instance, make_solver: Callable[[int], hg.Solver]) -> Callable[[int, bool], Outcome]:
    def call(seed: int, with_info: bool) -> Outcome:
        solver = make_solver(seed)
        if with_info:
            h, info = hg.implicit(
                inst.inner_loss,
                inst.outer_loss,
                inst.params,
                inst.hparams,
                solver=solver,
                return_info=True,
            )
            return Outcome(flat(h), info.num_hvps, info.status)
        h = hg.implicit(inst.inner_loss, inst.outer_loss, inst.params, inst.hparams, solver=solver)
        return Outcome(flat(h))

    return call


def theirs(
    inst: Instance, fn: Callable[..., Sequence[Tensor]], budget: int, arg: float, seeded: bool
) -> Callable[[int, bool], Outcome]:
    def call(seed: int, with_info: bool) -> Outcome:
        if seeded:  # hypergrad's nystrom samples with the global generator
            torch.manual_seed(seed)
        h = fn(inst.inner_loss, inst.outer_loss, inst.params, inst.hparams, budget, arg)
        return Outcome(flat([t.detach() for t in h]), budget)

    return call


def gradient_runner(inst: Instance) -> Runner:
    """One gradient of ``f`` w.r.t. ``params`` (forward + backward), batched for timing."""
    ps = tuple(p.detach().clone().requires_grad_(True) for p in inst.params)
    hs = tuple(h.detach() for h in inst.hparams)

    def call(seed: int, with_info: bool) -> Outcome:
        grads = torch.autograd.grad(inst.inner_loss(ps, hs), ps)
        return Outcome(grads[0].reshape(-1)[:1])

    started = time.perf_counter()
    for _ in range(5):
        call(0, False)
    per_call = (time.perf_counter() - started) / 5
    inside = max(1, min(2000, math.ceil(0.005 / max(per_call, 1e-7))))
    return Runner("gradient of f", "autograd", call, inside)


def run_group(runners: list[Runner], repeats: int, ref: Tensor) -> list[Measurement]:
    """Warm up each runner once (recording diagnostics), then time them interleaved.

    The order of the runners is rotated every repeat, so slow drifts of the (shared)
    machine spread over all of them. Seeds are the repeat indices.
    """
    results = [Measurement(r.key, r.impl) for r in runners]
    live: list[int] = []
    for i, (runner, m) in enumerate(zip(runners, results)):
        with recorded_warnings(ignore_deprecations=True) as caught:
            try:
                out = runner.call(10_000, True)
            except Exception as exc:  # reported in the table
                m.error = error_text(exc, 160)
                continue
        m.num_hvps, m.status = out.num_hvps, out.status
        m.warnings = warning_texts(caught, 300)
        live.append(i)
    errors: dict[int, list[float]] = {i: [] for i in live}
    coss: dict[int, list[float]] = {i: [] for i in live}
    with recorded_warnings(ignore_deprecations=True) as caught:
        for rep in range(repeats):
            for i in rotation(live, rep):
                runner, m = runners[i], results[i]
                seen = len(caught)
                call = functools.partial(runner.call, rep, False)
                out, ms, cpu_ms = timed_call(call, runner.repeat_inside)
                m.ms_all.append(ms)
                m.cpu_ms_all.append(cpu_ms)
                m.warned_calls += len(caught) > seen
                if runner.impl != "autograd":
                    errors[i].append(relative_error(out.h, ref))
                    coss[i].append(cosine(out.h, ref))
    for i in live:
        m = results[i]
        m.ms = statistics.median(m.ms_all)
        m.cpu_ms = statistics.median(m.cpu_ms_all)
        if errors[i]:
            m.rel_err_all = errors[i]
            m.rel_err = statistics.median(errors[i])
            m.cos = statistics.median(coss[i])
    return results


# ============================================================================ benchmark


@dataclass
class Row:
    """One line of the table: one of our solvers, optionally paired with hypergrad's call."""

    k: int
    solver: str
    ours: Measurement | None
    theirs: Measurement | None = None
    theirs_label: str = ""


def load_hypergrad(skip: bool = False) -> tuple[ModuleType | None, str]:
    """hypergrad's ``approx_hypergrad`` module and its version, or None and the reason."""
    if skip:
        return None, "skipped (--no-hypergrad)"
    return import_seed_library("hypergrad.approx_hypergrad", "hypergrad", quiet=True)


def benchmark_problem(
    problem: Problem,
    ref: Reference,
    dtype: torch.dtype,
    budgets: Sequence[int],
    repeats: int,
    hgrad: ModuleType | None,
    log: Callable[[str], None],
) -> tuple[list[Row], list[dict[str, Any]], dict[str, Any]]:
    inst = problem.make(dtype)
    alpha = 1.0 / ref.lambda_max
    rhos = [0.1, ref.lambda_median]
    rows: list[Row] = []
    costs: list[dict[str, Any]] = []
    grad = gradient_runner(inst)

    def nys(k: int, rho: float, sketch: str) -> Callable[[int], hg.Solver]:
        return lambda s: hg.Nystrom(rank=k, rho=rho, sketch=sketch, seed=s)

    for k in budgets:
        log(f"  [{problem.name}] k = {k}")
        # CG, with hypergrad's conjugate_gradient (lr = 1 and 0.1) and the gradient of f.
        group = [Runner("CG", "hypergradient", ours(inst, lambda s, k=k: hg.CG(maxiter=k, tol=0)))]
        if hgrad is not None:
            for lr in (1.0, 0.1):
                group.append(
                    Runner(
                        f"conjugate_gradient(lr={lr:g})",
                        "hypergrad",
                        theirs(inst, hgrad.conjugate_gradient, k, lr, False),
                    )
                )
        group.append(grad)
        res = run_group(group, repeats, ref.h)
        cg, grad_m = res[0], res[-1]
        if hgrad is not None:
            rows.append(Row(k, f"CG(maxiter={k}, tol=0)", cg, res[1], "conjugate_gradient lr=1"))
            rows.append(Row(k, "〃", None, res[2], "conjugate_gradient lr=0.1"))
        else:
            rows.append(Row(k, f"CG(maxiter={k}, tol=0)", cg))
        if cg.ms is not None and grad_m.ms is not None:
            costs.append(
                {
                    "k": k,
                    "cg_ms": cg.ms,
                    "grad_ms": grad_m.ms,
                    "ratio": cg.ms / grad_m.ms,
                    "cg_cpu_ms": cg.cpu_ms,
                    "grad_cpu_ms": grad_m.cpu_ms,
                    "cpu_ratio": _ratio(cg.cpu_ms, grad_m.cpu_ms),
                    "floor": k + 3,
                    "num_hvps": cg.num_hvps,
                }
            )

        res = run_group(
            [
                Runner(
                    "Neumann auto",
                    "hypergradient",
                    ours(inst, lambda s, k=k: hg.Neumann(k, "auto")),
                )
            ],
            repeats,
            ref.h,
        )
        rows.append(Row(k, f'Neumann({k}, alpha="auto")', res[0]))

        group = [
            Runner(
                "Neumann 1/L",
                "hypergradient",
                ours(inst, lambda s, k=k: hg.Neumann(k, alpha=alpha)),
            )
        ]
        if hgrad is not None:
            group.append(
                Runner("neumann", "hypergrad", theirs(inst, hgrad.neumann, k, alpha, False))
            )
        res = run_group(group, repeats, ref.h)
        rows.append(
            Row(
                k,
                f"Neumann({k}, alpha=1/L={alpha:.3g})",
                res[0],
                res[1] if len(res) > 1 else None,
                f"neumann lr={alpha:.3g}",
            )
        )

        for rho in rhos:
            group = [Runner("Nystrom col", "hypergradient", ours(inst, nys(k, rho, "column")))]
            if hgrad is not None:
                group.append(
                    Runner("nystrom", "hypergrad", theirs(inst, hgrad.nystrom, k, rho, True))
                )
            res = run_group(group, repeats, ref.h)
            rows.append(
                Row(
                    k,
                    f"Nystrom(rank={k}, rho={rho:.3g}, column)",
                    res[0],
                    res[1] if len(res) > 1 else None,
                    f"nystrom rank={k} rho={rho:.3g}",
                )
            )
        for rho in rhos:
            res = run_group(
                [Runner("Nystrom gauss", "hypergradient", ours(inst, nys(k, rho, "gaussian")))],
                repeats,
                ref.h,
            )
            rows.append(Row(k, f"Nystrom(rank={k}, rho={rho:.3g}, gaussian)", res[0]))

        r, it = k // 2, k - k // 2
        res = run_group(
            [
                Runner(
                    "NystromPCG",
                    "hypergradient",
                    ours(inst, lambda s, r=r, it=it: hg.NystromPCG(r, maxiter=it, tol=0, seed=s)),
                )
            ],
            repeats,
            ref.h,
        )
        rows.append(Row(k, f"NystromPCG(rank={r}, maxiter={it}, tol=0)", res[0]))

    res = run_group(
        [Runner("Identity", "hypergradient", ours(inst, lambda s: hg.Identity(scale=alpha)))],
        repeats,
        ref.h,
    )
    rows.insert(0, Row(0, f"Identity(scale=1/L={alpha:.3g})", res[0]))
    extra = {"alpha": alpha, "rhos": rhos, "grad_ms": grad_m.ms}
    return rows, costs, extra


# ============================================================================ output


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _sci(x: float | None) -> str:
    return "—" if x is None else f"{x:.2e}"


def _cos(x: float | None) -> str:
    return "—" if x is None else f"{x:.6f}"


def _ms(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def _cell(m: Measurement | None, what: str) -> str:
    if m is None:
        return ""
    if m.error is not None:
        return "error" if what == "rel" else ""
    if what == "rel":
        return _sci(m.rel_err)
    if what == "cos":
        return _cos(m.cos)
    if what == "ms":
        return _ms(m.ms)
    if what == "hvps":
        return "" if m.num_hvps is None else str(m.num_hvps)
    if what == "status":
        flag = ""
        if m.warnings or m.warned_calls:
            flag = f" (warned in {m.warned_calls}/{len(m.ms_all)} timed calls)"
        return (m.status or "") + flag
    raise ValueError(what)


def markdown_problem(
    problem: Problem, ref: Reference, rows: list[Row], costs: list[dict[str, Any]], extra: dict
) -> str:
    s = problem.setup
    lines = [
        f"### {problem.name}: {problem.description}",
        "",
        f"- {s['num_params']} parameters, {s['num_hparams']} hyperparameters, "
        f"{s['n_train']} train / {s['n_val']} validation examples",
        f"- inner solve: {s['inner_solver']}; final inner gradient norm {s['inner_grad_norm']:.2e}",
        f"- exact Hessian: lambda_min = {ref.lambda_min:.4g}, median eigenvalue = "
        f"{ref.lambda_median:.4g}, lambda_max = {ref.lambda_max:.4g}, condition number "
        f"{ref.lambda_max / ref.lambda_min:.3g}",
        f"- reference h* = {'closed form' if problem.closed_form is not None else 'hg.Exact()'}"
        f", ||h*|| = {float(torch.linalg.vector_norm(ref.h)):.4g}; hg.Exact() took "
        f"{ref.exact_ms:.0f} ms; checks: "
        + "; ".join(f"{k} = {v:.2e}" for k, v in ref.checks.items()),
        f"- Neumann fixed alpha = 1/lambda_max = {extra['alpha']:.4g}; Nystrom rho in "
        f"{{0.1, median eigenvalue = {extra['rhos'][1]:.3g}}}; one gradient of f = "
        f"{_ms(extra['grad_ms'])} ms",
    ]
    if "train_accuracy" in s:
        lines.append(
            f"- trained MLP: train accuracy {s['train_accuracy']:.3f}, validation accuracy "
            f"{s['val_accuracy']:.3f}"
        )
    has_theirs = any(r.theirs is not None for r in rows)
    head = "| k | solver (hypergradient) | hvps | status | rel. err | cos | ms |"
    rule = "|---:|---|---:|---|---:|---:|---:|"
    if has_theirs:
        head += " hypergrad 0.0.1 | rel. err | cos | ms | theirs/ours wall | theirs/ours CPU |"
        rule += "---|---:|---:|---:|---:|---:|"
    lines += ["", head, rule]
    base: Measurement | None = None
    for row in rows:
        o, t = row.ours, row.theirs
        if o is not None:  # else: a second hypergrad call paired with the row above
            base = o
        cells = [
            str(row.k),
            row.solver,
            _cell(o, "hvps"),
            _cell(o, "status"),
            _cell(o, "rel"),
            _cell(o, "cos"),
            _cell(o, "ms"),
        ]
        if has_theirs:
            ratio, cpu_ratio = "", ""
            if t is not None and base is not None:
                r_wall, r_cpu = _ratio(t.ms, base.ms), _ratio(t.cpu_ms, base.cpu_ms)
                ratio = "" if r_wall is None else f"{r_wall:.2f}"
                cpu_ratio = "" if r_cpu is None else f"{r_cpu:.2f}"
            label = row.theirs_label if t is not None else ""
            if t is not None and t.error is not None:
                label += " (error, see below)"
            cells += [label, _cell(t, "rel"), _cell(t, "cos"), _cell(t, "ms"), ratio, cpu_ratio]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "CG cost ratio (time of one hg.implicit call with CG(maxiter=k, tol=0) / time of one "
        "gradient of f):",
        "",
        "| k | hvps | CG ms | gradient ms | ratio (wall) | ratio (CPU) | floor k+3 |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in costs:
        cpu_ratio = "—" if c["cpu_ratio"] is None else f"{c['cpu_ratio']:.1f}"
        lines.append(
            f"| {c['k']} | {c['num_hvps']} | {_ms(c['cg_ms'])} | {_ms(c['grad_ms'])} | "
            f"{c['ratio']:.1f} | {cpu_ratio} | {c['floor']} |"
        )
    warned = {
        f"{label}: {w}"
        for r in rows
        for m, label in ((r.ours, r.solver), (r.theirs, f"hypergrad {r.theirs_label}"))
        if m is not None
        for w in m.warnings
    }
    if warned:
        lines += ["", "Warnings raised by the warm-up calls (status is the warm-up's):", ""]
        lines += [f"- {w}" for w in sorted(warned)]
    errors = {
        f"{r.theirs_label or r.solver}: {m.error}"
        for r in rows
        for m in (r.ours, r.theirs)
        if m is not None and m.error is not None
    }
    if errors:
        lines += ["", "Errors:", ""] + [f"- {e}" for e in sorted(errors)]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="budgets 5, 20 and 3 repeats (< 60 s)")
    p.add_argument("--budgets", type=int, nargs="+", help="products per hypergradient")
    p.add_argument("--repeats", type=int, help="timed calls per solver (default 9, quick 3)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--problems", nargs="+", choices=("ridge", "logreg", "mlp"), default=None)
    p.add_argument("--no-hypergrad", action="store_true", help="skip the seed library")
    add_common_arguments(p)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = start_run(args.seed, args.threads)
    budgets = tuple(args.budgets or (QUICK_BUDGETS if args.quick else FULL_BUDGETS))
    repeats = args.repeats or (3 if args.quick else 9)
    dtype = torch.float32 if args.dtype == "float32" else F64
    problems = args.problems or ["ridge", "logreg", "mlp"]

    hgrad, hgrad_version = load_hypergrad(skip=args.no_hypergrad)
    machine = machine_info(hypergrad=hgrad_version if hgrad is not None else None)
    header = [
        "# Implicit hypergradient solvers: accuracy and cost",
        "",
        machine_line(machine),
        f"- hypergradient {machine['hypergradient']}; solvers run in {args.dtype}, references "
        f"in float64; budgets k = {', '.join(map(str, budgets))}; median of {repeats} timed "
        "calls after one warm-up; seed " + str(args.seed),
    ]
    if hgrad is None:
        header.append(f"- hypergrad (seed library) not importable, skipped: {hgrad_version}")
    else:
        header.append(f"- hypergrad {hgrad_version} (seed library) run side by side")
    header += [
        "- rel. err = ||h - h*|| / ||h*||, cos = cosine(h, h*); for the randomized solvers "
        "(Nystrom, NystromPCG, hypergrad's nystrom) the median over seeds 0..repeats-1",
        "- hvps and status as reported by hg.implicit(..., return_info=True); ms = median "
        "wall time of one call (return_info=False); theirs/ours = ratio of the median wall "
        "or CPU (process_time) times of calls timed interleaved",
    ]
    print("\n".join(header), flush=True)

    sections: list[str] = []
    report: dict[str, Any] = {
        "machine": machine,
        "args": jsonable(vars(args)),
        "budgets": list(budgets),
        "repeats": repeats,
        "problems": {},
    }
    builders: dict[str, Callable[[], Problem]] = {
        "ridge": lambda: ridge_problem(args.seed),
        "logreg": lambda: logreg_problem(args.seed),
        "mlp": lambda: mlp_problem(args.seed, 500 if args.quick else 1000),
    }
    for name in problems:
        log(f"[{name}] solving the inner problem and computing the reference ...")
        problem = builders[name]()
        ref = compute_reference(problem)
        rows, costs, extra = benchmark_problem(problem, ref, dtype, budgets, repeats, hgrad, log)
        section = markdown_problem(problem, ref, rows, costs, extra)
        print("\n" + section, flush=True)
        sections.append(section)
        report["problems"][name] = {
            "description": problem.description,
            "setup": problem.setup,
            "lambda_min": ref.lambda_min,
            "lambda_median": ref.lambda_median,
            "lambda_max": ref.lambda_max,
            "reference_norm": float(torch.linalg.vector_norm(ref.h)),
            "reference_checks": ref.checks,
            "exact_ms": ref.exact_ms,
            **extra,
            "rows": [
                {
                    "k": r.k,
                    "solver": r.solver,
                    "ours": None if r.ours is None else asdict(r.ours),
                    "theirs_label": r.theirs_label or None,
                    "theirs": None if r.theirs is None else asdict(r.theirs),
                }
                for r in rows
            ],
            "cg_cost_ratio": costs,
        }
    total, footer = wall_footer(started)
    report["total_seconds"] = total
    write_results(args.out, "implicit_solvers", header, sections, footer, report, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
