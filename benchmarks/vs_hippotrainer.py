"""Head-to-head with HippoTrainer 1.0.0: hypergradient accuracy, cost and training outcome.

(a) one hypergradient at a fixed point (theirs, our compat layer, native) vs the exact implicit
one; (b) HippoTrainer's documented training loop end to end, in lockstep; findings derived from
the numbers. HippoTrainer (``pip install --no-deps hippotrainer==1.0.0``) is skipped with a
message when missing. Problem and settings: benchmarks/README.md.
"""

from __future__ import annotations

import math
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergradient as hg
from harness import Report, cli, log, median, problems, start
from harness import report as rp
from harness.problems import Data, breast_cancer_data, cosine, relative_error
from harness.report import pyplot, save_figure
from harness.runner import (
    error_text,
    import_peer,
    recorded_warnings,
    rotation,
    timed_call,
    warning_texts,
)
from hypergradient.compat import hippotrainer as compat

F64 = torch.float64
LR = 0.5  # inner SGD learning rate
HYPER_LR = 0.5  # part (a): not used by hyper_grad, only stored by the classes
HYPER_LRS = (5.0, 20.0)  # part (b)
INNER_STEPS = 10
LOG_WD0 = -3.0
Batch = tuple[Tensor, Tensor]
Params = tuple[Tensor, Tensor]


def newton(f: Callable[[Tensor], Tensor], theta: Tensor) -> Tensor:
    return problems.newton(f, theta, 1e-12)[0]


def load_hippotrainer(skip: bool = False) -> tuple[ModuleType | None, str]:
    """The hippotrainer module and its version, or None and the reason."""
    if skip:
        return None, "skipped (--no-hippotrainer)"
    return import_peer("hippotrainer")


# ============================================================================ data, set-ups


def init_model(dim: int, state: Params | None = None) -> nn.Linear:
    torch.manual_seed(0)
    model = nn.Linear(dim, 1).double()
    if state is not None:
        set_params(model, state)
    return model


def set_params(model: nn.Linear, state: Params) -> None:
    with torch.no_grad():
        model.weight.copy_(state[0])
        model.bias.copy_(state[1])


def get_params(model: nn.Linear) -> Params:
    return model.weight.detach().clone(), model.bias.detach().clone()


def make_criterion(model: nn.Linear, hyper: dict[str, Tensor], clone: bool) -> Callable:
    """HippoTrainer's pattern: the criterion holds the hyperparameters and the model.

    ``clone=True`` reads the weight through ``model.weight.clone()``, which changes no value
    but lets HippoTrainer's DRMAD run (it steps the optimizer, which modifies the weight in
    place, between building the validation loss and differentiating it).
    """
    bce = nn.BCEWithLogitsLoss()

    def criterion(preds: Tensor, targets: Tensor) -> Tensor:
        w = model.weight.clone()[0] if clone else model.weight[0]
        return bce(preds, targets) + 0.5 * (hyper["log_wd"].exp() * w**2).sum()

    return criterion


def functional_losses(data: Data) -> tuple[Callable, Callable, Callable]:
    """``f(params, log_wd)``, ``g(params, log_wd)`` and ``f_batch(params, log_wd, batch)``."""

    def loss(params: Params, log_wd: Tensor, batch: Batch) -> Tensor:
        W, b = params
        x, y = batch
        return (
            F.binary_cross_entropy_with_logits(x @ W.T + b, y)
            + 0.5 * (log_wd.exp() * W[0] ** 2).sum()
        )

    def f(params: Params, log_wd: Tensor) -> Tensor:
        return loss(params, log_wd, data.train)

    def g(params: Params, log_wd: Tensor) -> Tensor:
        return loss(params, log_wd, data.val)

    return f, g, loss


def bce(model: nn.Module, batch: Batch) -> float:
    with torch.no_grad():
        return float(F.binary_cross_entropy_with_logits(model(batch[0]), batch[1]))


@dataclass
class HippoSetup:
    """A HippoTrainer-API object (theirs or the compat layer's) with its model and data."""

    impl: str  # "theirs" or "compat"
    model: nn.Linear
    hyper: dict[str, Tensor]
    optimizer: torch.optim.Optimizer
    criterion: Callable
    hopt: Any


def build_hippo(
    module: Any,
    impl: str,
    cls: str,
    kw: dict[str, Any],
    data: Data,
    state: Params | None,
    hyper_lr: float,
    clone: bool,
) -> HippoSetup:
    model = init_model(data.dim, state)
    hyper = {"log_wd": torch.full((data.dim,), LOG_WD0, dtype=F64)}
    criterion = make_criterion(model, hyper, clone)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    hopt = getattr(module, cls)(
        hyper,
        hyper_lr=hyper_lr,
        inner_steps=INNER_STEPS,
        model=model,
        optimizer=optimizer,
        train_loader=[data.train],
        val_loader=[data.val],
        criterion=criterion,
        **kw,
    )
    return HippoSetup(impl, model, hyper, optimizer, criterion, hopt)


# ============================================================================ (a)


def make_states(data: Data) -> dict[str, Params]:
    D = data.dim
    model = init_model(D)
    hyper = {"log_wd": torch.full((D,), LOG_WD0, dtype=F64)}
    crit = make_criterion(model, hyper, clone=False)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(INNER_STEPS):
        opt.zero_grad()
        crit(model(data.train[0]), data.train[1]).backward()
        opt.step()
    early = get_params(model)
    f, _, _ = functional_losses(data)
    lw = hyper["log_wd"]
    t = newton(lambda v: f((v[:D].reshape(1, D), v[D:]), lw), torch.zeros(D + 1, dtype=F64))
    return {"early": early, "optimum": (t[:D].reshape(1, D).clone(), t[D:].clone())}


@dataclass
class DensePieces:
    """Dense H (P x P), mixed J = d grad_theta f / d log_wd (P x m), gradients of g."""

    H: Tensor
    J: Tensor
    g_theta: Tensor
    g_phi: Tensor
    h: Tensor  # g_phi - J^T H^{-1} g_theta


def dense_pieces(data: Data, theta: Params, log_wd: Tensor) -> DensePieces:
    """Everything by plain ``torch.func``, independently of ``hypergradient``."""
    f, g, _ = functional_losses(data)
    D = data.dim

    def unflat(v: Tensor) -> Params:
        return v[:D].reshape(1, D), v[D:]

    t = torch.cat([theta[0].reshape(-1), theta[1].reshape(-1)])
    grad_t = torch.func.grad(lambda v, r: f(unflat(v), r), argnums=0)
    H = torch.func.jacrev(grad_t, argnums=0)(t, log_wd)
    J = torch.func.jacrev(grad_t, argnums=1)(t, log_wd)
    g_theta, g_phi = torch.func.grad(lambda v, r: g(unflat(v), r), argnums=(0, 1))(t, log_wd)
    h = g_phi - J.T @ torch.linalg.solve(H, g_theta)
    return DensePieces(H, J, g_theta, g_phi, h)


@dataclass
class Runner:
    impl: str  # "theirs", "compat", "native"
    label: str
    prepare: Callable[[], None]  # untimed
    call: Callable[[], Tensor]  # timed; returns the flat hypergradient


@dataclass
class Measured:
    impl: str
    label: str
    h: list[float] = field(default_factory=list)
    rel_err: float | None = None
    cos: float | None = None
    rel_err_unrolled: float | None = None
    cos_unrolled: float | None = None
    ms: float | None = None
    cpu_ms: float | None = None
    ms_all: list[float] = field(default_factory=list)
    cpu_ms_all: list[float] = field(default_factory=list)
    error: str | None = None
    traceback: str | None = None
    warnings: list[str] = field(default_factory=list)


def run_group(runners: Sequence[Runner], repeats: int) -> tuple[list[Measured], list[Tensor]]:
    """Warm-up call (kept as the hypergradient), then timed calls interleaved, rotated."""
    out = [Measured(r.impl, r.label) for r in runners]
    hs: list[Tensor] = []
    live: list[int] = []
    for i, (r, m) in enumerate(zip(runners, out)):
        with recorded_warnings() as caught:
            try:
                r.prepare()
                h = r.call()
            except Exception as exc:
                m.error = error_text(exc, 300)
                m.traceback = traceback.format_exc(limit=4)[-1500:]
                hs.append(torch.full((1,), math.nan, dtype=F64))
                continue
        m.warnings = warning_texts(caught, 200)
        hs.append(h.detach().reshape(-1).clone())
        m.h = hs[-1].tolist()
        live.append(i)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rep in range(repeats):
            for i in rotation(live, rep):
                runners[i].prepare()
                _, ms, cpu_ms = timed_call(runners[i].call)
                out[i].cpu_ms_all.append(cpu_ms)
                out[i].ms_all.append(ms)
    for i in live:
        out[i].ms, out[i].cpu_ms = median(out[i].ms_all), median(out[i].cpu_ms_all)
    return out, hs


def hippo_runner(s: HippoSetup, state: Params, label: str, data: Data) -> Runner:
    hopt = s.hopt

    def prepare() -> None:
        set_params(s.model, state)
        s.optimizer.zero_grad()
        if s.impl == "compat" and hasattr(hopt, "_x"):
            hopt._x = None  # no warm start: a first hyper-step, as HippoTrainer's HOAG
        with torch.no_grad():
            s.hyper["log_wd"].fill_(LOG_WD0)
        s.hyper["log_wd"].grad = None  # HippoTrainer's DRMAD accumulates into it

    if s.impl == "theirs":

        def call() -> Tensor:
            hopt._hyperparams_requires_grad_(True)
            try:
                train_loss, val_loss = hopt.evaluate()
                grads = hopt.hyper_grad(train_loss, val_loss)
            finally:
                hopt._hyperparams_requires_grad_(False)
            return torch.cat([g.detach().reshape(-1) for g in grads])

    else:

        def call() -> Tensor:
            hopt._hyperparams_requires_grad_(True)
            try:
                grads = hopt.hyper_grad(data.train, data.val)
            finally:
                hopt._hyperparams_requires_grad_(False)
            return torch.cat([g.detach().reshape(-1) for g in grads])

    return Runner(s.impl, label, prepare, call)


def native_runner(
    kind: str, kw: dict[str, Any], data: Data, state: Params, log_wd: Tensor
) -> Runner:
    f, g, f_batch = functional_losses(data)
    params = (state[0].clone(), state[1].clone())
    if kind == "DRMAD":
        T = kw["T"]
        label = f"hg.drmad(steps={T}, hg.optim.sgd(lr={LR}))"

        def call() -> Tensor:
            return hg.drmad(
                f_batch, g, params, log_wd, T, hg.optim.sgd(lr=LR), batches=[data.train] * T
            )

        return Runner("native", label, lambda: None, call)
    if kind == "T1T2":
        label, make = "hg.T1T2()", hg.T1T2
    elif kind == "Neumann":
        n = kw["num_terms"]
        label = f"hg.IFT(hg.Neumann({n}, alpha=lr={LR}))"

        def make() -> hg.Method:
            return hg.IFT(hg.Neumann(iters=n, alpha=LR))

    else:
        m, eps = kw["cg_max_iter"], kw["epsilon"]
        label = f"hg.IFT(hg.CG({m}, tol=0, atol=sqrt({eps:g})))"

        def make() -> hg.Method:
            return hg.IFT(hg.CG(maxiter=m, tol=0.0, atol=math.sqrt(eps)))

    method = make()

    def call_method() -> Tensor:
        ctx = hg.Problem(
            inner_loss=f, outer_loss=g, params=params, hparams=log_wd, lr=LR, prev_params=params
        )
        return method(ctx)[0]

    return Runner("native", label, lambda: None, call_method)


A_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("T1T2", {}),
    ("Neumann", {"num_terms": 1}),
    ("Neumann", {"num_terms": 5}),
    ("Neumann", {"num_terms": 20}),
    ("HOAG", {"epsilon": 1e-4, "cg_max_iter": 10}),
    ("HOAG", {"epsilon": 1e-12, "cg_max_iter": 31}),
    ("DRMAD", {"T": 10}),
]


def _kw_str(kw: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items())


def their_cg(H: Tensor, b: Tensor, eps: float, maxiter: int, stab: float) -> tuple[Tensor, int]:
    """HippoTrainer 1.0.0's ``HOAG.conjugate_gradient`` on a dense matrix (``stab`` = its
    ``1e-8`` added to ``p^T A p`` and to ``||r||^2`` in the denominators)."""
    x, r = torch.zeros_like(b), b.clone()
    p, rs, it = r.clone(), r.dot(r), 0
    if rs < eps:
        return x, 0
    for it in range(1, maxiter + 1):  # noqa: B007 (reported)
        Ap = H @ p
        alpha = rs / (p.dot(Ap) + stab)
        x, r = x + alpha * p, r - alpha * Ap
        rs_new = r.dot(r)
        beta = rs_new / (rs + stab)
        rs = rs_new
        if rs < eps:
            break
        p = r + beta * p
    return x, it


def part_a(data: Data, ht: ModuleType | None, repeats: int, quick: bool = False) -> dict[str, Any]:
    states = make_states(data)
    log_wd = torch.full((data.dim,), LOG_WD0, dtype=F64)
    f, g, f_batch = functional_losses(data)
    out: dict[str, Any] = {"states": {}, "rows": [], "crash_probe": None, "checks": []}
    for sname, state in states.items():
        log(f"[a] point {sname}: references ...")
        exact, info = hg.implicit(f, g, state, log_wd, hg.Exact(), return_info=True)
        exact = exact.reshape(-1)
        dense = dense_pieces(data, state, log_wd)
        evals = torch.linalg.eigvalsh(dense.H)
        out["states"][sname] = {
            "inner_grad_norm": info.inner_grad_norm,
            "val_criterion": info.outer_loss,
            "exact_norm": float(exact.norm()),
            "exact_vs_dense": relative_error(exact, dense.h),
            "hessian_eig_min": float(evals[0]),
            "hessian_eig_max": float(evals[-1]),
        }
        for kind, kw in A_CONFIGS[::3] if quick else A_CONFIGS:
            log(f"  [a] {sname}: {kind}({_kw_str(kw)})")
            clone = kind == "DRMAD"
            runners: list[Runner] = []
            setups: dict[str, HippoSetup] = {}
            for impl, module in (("theirs", ht), ("compat", compat)):
                if module is None:
                    continue
                s = build_hippo(module, impl, kind, kw, data, state, HYPER_LR, clone)
                setups[impl] = s
                runners.append(hippo_runner(s, state, f"{kind}({_kw_str(kw)})", data))
            runners.append(native_runner(kind, kw, data, state, log_wd))
            measured, hs = run_group(runners, repeats)
            unrolled = None
            if kind == "DRMAD":
                T = kw["T"]
                unrolled = hg.unrolled(
                    f_batch, g, state, log_wd, T, hg.optim.sgd(lr=LR), batches=[data.train] * T
                ).reshape(-1)
            for m, h in zip(measured, hs):
                if m.error is None:
                    m.rel_err, m.cos = relative_error(h, exact), cosine(h, exact)
                    if unrolled is not None:
                        m.rel_err_unrolled = relative_error(h, unrolled)
                        m.cos_unrolled = cosine(h, unrolled)
                out["rows"].append(
                    {"point": sname, "method": kind, "kw": kw, **asdict(m), "h": m.h}
                )
            # diagnostic checks of HippoTrainer's outputs
            if "theirs" in setups and measured[0].error is None:
                h_theirs = hs[0]
                if kind == "T1T2":
                    ident1 = hg.implicit(f, g, state, log_wd, hg.Identity(1.0)).reshape(-1)
                    out["checks"].append(
                        f"{sname}: HippoTrainer T1T2 vs hg.implicit(..., hg.Identity(1.0)) "
                        f"(one step without the lr factor): rel. diff "
                        f"{relative_error(h_theirs, ident1):.1e}; vs hg.Identity(lr={LR}): "
                        f"{relative_error(h_theirs, hs[-1]):.1e}"
                    )
                if kind == "Neumann":
                    n = kw["num_terms"]
                    v = dense.g_theta.clone()
                    p = v.clone()
                    series, term = v.clone(), v.clone()
                    for _ in range(n):  # their recursion, and the textbook partial sum
                        v = v - LR * dense.H @ v
                        p = LR * (p + v)
                        term = term - LR * dense.H @ term
                        series = series + term
                    theirs_rec = dense.g_phi - dense.J.T @ p
                    textbook = dense.g_phi - dense.J.T @ (LR * series)
                    out["checks"].append(
                        f"{sname}: HippoTrainer Neumann(num_terms={n}) vs its recursion "
                        f"p <- lr (p + v) replayed densely: rel. diff "
                        f"{relative_error(h_theirs, theirs_rec):.1e}; vs the Neumann partial "
                        f"sum lr * sum_(j<={n}) (I - lr H)^j b: "
                        f"{relative_error(h_theirs, textbook):.1e}"
                    )
                if kind == "HOAG":
                    eps, m = kw["epsilon"], kw["cg_max_iter"]
                    x_st, it_st = their_cg(dense.H, dense.g_theta, eps, m, 1e-8)
                    x_0, it_0 = their_cg(dense.H, dense.g_theta, eps, m, 0.0)
                    h_st = dense.g_phi - dense.J.T @ x_st
                    h_0 = dense.g_phi - dense.J.T @ x_0
                    out["checks"].append(
                        f"{sname}: HippoTrainer HOAG(epsilon={eps:g}, cg_max_iter={m}) vs its "
                        f"CG replayed densely: rel. diff {relative_error(h_theirs, h_st):.1e} "
                        f"({it_st} iterations, final ||r|| = "
                        f"{float((dense.g_theta - dense.H @ x_st).norm()):.1e}, rel. err "
                        f"{relative_error(h_st, exact):.1e}); the same CG without its "
                        f"'+ 1e-8' in the step and in beta: {it_0} iterations, ||r|| = "
                        f"{float((dense.g_theta - dense.H @ x_0).norm()):.1e}, rel. err "
                        f"{relative_error(h_0, exact):.1e}"
                    )
                if kind == "DRMAD":
                    spread = float(h_theirs.max() - h_theirs.min())
                    out["checks"].append(
                        f"{sname}: HippoTrainer DRMAD(T={kw['T']}) output: all 30 entries "
                        f"equal to {float(h_theirs[0]):.6g} (max - min = {spread:.1e}); "
                        f"exact hypergradient entries range over [{float(exact.min()):.3g}, "
                        f"{float(exact.max()):.3g}]"
                    )
        if ht is not None and sname == "early":
            out["crash_probe"] = drmad_crash_probe(ht, data, state)
    return out


def drmad_crash_probe(ht: ModuleType, data: Data, state: Params) -> dict[str, Any]:
    """HippoTrainer's DRMAD with the plain criterion (the weight read in place)."""
    s = build_hippo(ht, "theirs", "DRMAD", {"T": 10}, data, state, HYPER_LR, clone=False)
    try:
        s.hopt._hyperparams_requires_grad_(True)
        train_loss, val_loss = s.hopt.evaluate()
        s.hopt.hyper_grad(train_loss, val_loss)
        return {"crashed": False}
    except Exception as exc:
        return {
            "crashed": True,
            "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:400],
            "traceback": traceback.format_exc(limit=6)[-2500:],
        }
    finally:
        s.hopt._hyperparams_requires_grad_(False)


# ============================================================================ (b)


B_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("T1T2", {}),
    ("Neumann", {"num_terms": 5}),
    ("HOAG", {}),
    ("DRMAD", {"T": 10}),
]


def native_method(kind: str, kw: dict[str, Any]) -> tuple[str, hg.Method]:
    if kind == "T1T2":
        return "hg.T1T2()", hg.T1T2()
    if kind == "Neumann":
        n = kw["num_terms"]
        return f"hg.IFT(hg.Neumann({n}, alpha=lr))", hg.IFT(hg.Neumann(iters=n, alpha=LR))
    if kind == "HOAG":
        return "hg.HOAG(maxiter=10)", hg.HOAG(maxiter=10)
    return "hg.DrMAD()", hg.DrMAD()


@dataclass
class Run:
    pair: str
    impl: str  # theirs / compat / native / untuned
    label: str
    model: nn.Linear
    hyper: dict[str, Tensor]
    step: Callable[[], None]
    hopt: Any = None
    seconds: float = 0.0
    step_ms: list[float] = field(default_factory=list)
    curve: list[dict[str, float]] = field(default_factory=list)
    error: str | None = None
    error_step: int | None = None
    traceback: str | None = None
    cos: list[float] = field(default_factory=list)  # instrumented round only
    rel: list[float] = field(default_factory=list)


def make_runs(data: Data, ht: ModuleType | None, hyper_lr: float) -> list[Run]:
    runs: list[Run] = []
    x, y = data.train
    for kind, kw in B_CONFIGS:
        pair = f"{kind}({_kw_str(kw)})"
        clone = kind == "DRMAD"
        impls = [("theirs", ht), ("compat", compat)] if ht is not None else [("compat", compat)]
        for impl, module in impls:
            s = build_hippo(module, impl, kind, kw, data, None, hyper_lr, clone)

            def step(s: HippoSetup = s) -> None:  # HippoTrainer's documented loop body
                outputs = s.model(x)
                loss = s.criterion(outputs, y)
                loss.backward()
                s.hopt.step(loss)
                s.hopt.zero_grad()

            name = "HippoTrainer" if impl == "theirs" else "hypergradient.compat"
            runs.append(Run(pair, impl, f"{name} {pair}", s.model, s.hyper, step, s.hopt))
        model = init_model(data.dim)
        log_wd = torch.full((data.dim,), LOG_WD0, dtype=F64)
        label, method = native_method(kind, kw)

        def loss_fn(m: nn.Module, h: dict[str, Tensor], b: Batch) -> Tensor:
            W = dict(m.named_parameters())["weight"]
            return (
                F.binary_cross_entropy_with_logits(m(b[0]), b[1])
                + 0.5 * (h["log_wd"].exp() * W[0] ** 2).sum()
            )

        hopt = hg.HyperOptimizer(
            model,
            {"log_wd": log_wd},
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=LR),
            outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=hyper_lr),
            train_loss=loss_fn,
            val_loss=loss_fn,
            val_data=[data.val],
            method=method,
            inner_steps=INNER_STEPS,
        )

        def native_step(hopt: hg.HyperOptimizer = hopt) -> None:  # its documented loop body
            hopt.zero_grad()
            hopt.train_loss(data.train).backward()
            hopt.step(data.train)

        runs.append(
            Run(
                pair,
                "native",
                f"hg.HyperOptimizer {label}",
                model,
                {"log_wd": log_wd},
                native_step,
                hopt,
            )
        )
    if ht is not None:  # HippoTrainer's DRMAD with the plain criterion: does it run?
        s = build_hippo(ht, "theirs", "DRMAD", {"T": 10}, data, None, hyper_lr, clone=False)

        def plain_step(s: HippoSetup = s) -> None:
            loss = s.criterion(s.model(x), y)
            loss.backward()
            s.hopt.step(loss)
            s.hopt.zero_grad()

        runs.append(
            Run(
                "DRMAD(T=10)",
                "theirs",
                "HippoTrainer DRMAD(T=10), plain criterion",
                s.model,
                s.hyper,
                plain_step,
                s.hopt,
            )
        )
    model = init_model(data.dim)
    hyper = {"log_wd": torch.full((data.dim,), LOG_WD0, dtype=F64)}
    crit = make_criterion(model, hyper, clone=False)
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def untuned_step() -> None:
        opt.zero_grad()
        crit(model(x), y).backward()
        opt.step()

    runs.append(Run("-", "untuned", "untuned (plain SGD, log_wd = -3)", model, hyper, untuned_step))
    return runs


def _record(run: Run, data: Data, step: int) -> None:
    crit = 0.5 * float((run.hyper["log_wd"].exp() * run.model.weight.detach()[0] ** 2).sum())
    val = bce(run.model, data.val)
    run.curve.append(
        {
            "step": step,
            "seconds": run.seconds,
            "val_bce": val,
            "val_criterion": val + crit,
            "test_bce": bce(run.model, data.test),
            "log_wd_mean": float(run.hyper["log_wd"].mean()),
        }
    )


def _exact_or_nan(f: Callable, g: Callable, state: Params, log_wd: Tensor) -> Tensor:
    """The exact implicit hypergradient, or NaNs where it does not exist (diverged run)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return hg.implicit(f, g, state, log_wd, hg.Exact()).reshape(-1)
    except (hg.NonFiniteHypergradientError, RuntimeError, ValueError):
        return torch.full_like(log_wd, math.nan)


def instrument(run: Run, data: Data, hyper_lr: float) -> None:
    """Record, per hyper-step, the cosine of the applied hypergradient with the exact one."""
    f, g, _ = functional_losses(data)
    if run.impl in ("theirs", "compat"):
        hopt = run.hopt
        original = hopt.hyper_step

        def hooked(*args: Any, **kwargs: Any) -> Any:
            state = get_params(run.model)
            before = run.hyper["log_wd"].detach().clone()
            ref = _exact_or_nan(f, g, state, before)
            result = original(*args, **kwargs)
            h = -(run.hyper["log_wd"].detach() - before) / hyper_lr
            run.cos.append(cosine(h, ref))
            run.rel.append(relative_error(h, ref))
            return result

        hopt.hyper_step = hooked
    elif run.impl == "native":
        base_step = run.step
        hopt = run.hopt

        def step() -> None:
            before = run.hyper["log_wd"].detach().clone()
            n = len(hopt.history)
            base_step()
            if len(hopt.history) > n:
                ref = _exact_or_nan(f, g, get_params(run.model), before)
                h = hopt.history[-1].hypergrad["log_wd"].reshape(-1)
                run.cos.append(cosine(h, ref))
                run.rel.append(relative_error(h, ref))

        run.step = step


def run_lockstep(runs: list[Run], data: Data, steps: int, timed: bool) -> None:
    for r in runs:
        _record(r, data, 0)
    for t in range(steps):
        for r in rotation(runs, t):
            if r.error is not None:
                continue
            started = time.perf_counter()
            try:
                r.step()
            except Exception as exc:
                r.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
                r.error_step = t + 1
                r.traceback = traceback.format_exc(limit=6)[-2500:]
                continue
            dt = time.perf_counter() - started
            if timed:
                r.seconds += dt
                r.step_ms.append(1e3 * dt)
            if (t + 1) % INNER_STEPS == 0:
                _record(r, data, t + 1)


def _diff(a: float, b: float) -> float:
    """``|a - b|``, with two NaNs (or equal infinities) counting as equal."""
    if math.isnan(a) and math.isnan(b) or a == b:
        return 0.0
    return abs(a - b) if math.isfinite(a - b) else math.inf


def part_b(
    data: Data, ht: ModuleType | None, steps: int, rounds: int, hyper_lr: float
) -> dict[str, Any]:
    per_round: list[list[Run]] = []
    for rnd in range(rounds):
        runs = make_runs(data, ht, hyper_lr)
        log(f"[b] round {rnd + 1}/{rounds}: {len(runs)} runs x {steps} steps, lockstep ...")
        run_lockstep(runs, data, steps, timed=True)
        per_round.append(runs)
    log("[b] instrumented round (cosines with the exact hypergradient, untimed) ...")
    inst = make_runs(data, ht, hyper_lr)
    for r in inst:
        instrument(r, data, hyper_lr)
    run_lockstep(inst, data, steps, timed=False)
    summary: list[dict[str, Any]] = []
    first = per_round[0]
    for i, r in enumerate(first):
        rs = [rnd[i] for rnd in per_round]
        finals = [x.curve[-1]["val_bce"] for x in rs]
        hyper_ms = [ms for x in rs for k, ms in enumerate(x.step_ms) if (k + 1) % INNER_STEPS == 0]
        plain_ms = [ms for x in rs for k, ms in enumerate(x.step_ms) if (k + 1) % INNER_STEPS]
        secs = median([x.seconds for x in rs])
        c0, c1 = r.curve[0], r.curve[-1]
        ins = inst[i]
        final_inst = ins.curve[-1]["val_bce"]
        diverged = next((c["step"] for c in r.curve if not math.isfinite(c["val_bce"])), None)
        summary.append(
            {
                "pair": r.pair,
                "impl": r.impl,
                "label": r.label,
                "error": r.error,
                "error_step": r.error_step,
                "traceback": r.traceback,
                "steps_done": c1["step"],
                "val_bce_start": c0["val_bce"],
                "val_bce": c1["val_bce"],
                "val_criterion": c1["val_criterion"],
                "test_bce": c1["test_bce"],
                "log_wd_mean": c1["log_wd_mean"],
                "seconds": secs,
                "seconds_all": [x.seconds for x in rs],
                "step_ms": median(plain_ms),
                "hyper_step_ms": median(hyper_ms),
                "val_drop_per_s": (c0["val_bce"] - c1["val_bce"]) / secs if secs > 0 else None,
                "diverged_at_step": diverged,
                "max_round_diff": max(_diff(v, finals[0]) for v in finals),
                "instrumented_matches": _diff(final_inst, finals[0]) <= 1e-12,
                "cos_exact": ins.cos,
                "rel_err_exact": ins.rel,
                "negative_cos": sum(1 for c in ins.cos if c < 0),
                "nonfinite_cos": sum(1 for c in ins.cos if not math.isfinite(c)),
                "curve": r.curve,
            }
        )
    return {"steps": steps, "rounds": rounds, "hyper_lr": hyper_lr, "summary": summary}


# ============================================================================ output


def _sci(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.2e}"


def _f(x: float | None, nd: int = 4) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.{nd}f}"


def _ms(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def markdown_a(res: dict[str, Any], repeats: int, have_theirs: bool) -> str:
    lines = [
        "## (a) One hypergradient at a fixed point vs the exact implicit hypergradient",
        "",
        f"ms = median wall time of {repeats} calls (theirs, compat, native interleaved); "
        "theirs/ours = ratio of median wall times (CPU-time ratio in parentheses). DRMAD rows "
        "also give the error against `hg.unrolled` through the same T SGD steps, the "
        "quantity DrMAD approximates.",
        "",
    ]
    for sname, st in res["states"].items():
        lines.append(
            f"- `{sname}`: ||grad f|| = {st['inner_grad_norm']:.2e}; Hessian eigenvalues in "
            f"[{st['hessian_eig_min']:.3g}, {st['hessian_eig_max']:.3g}]; ||h*|| = "
            f"{st['exact_norm']:.4g}; hg.Exact vs independent dense: "
            f"{st['exact_vs_dense']:.1e}; validation criterion {st['val_criterion']:.4f}"
        )
    lines += [
        "",
        "| point | method | implementation | rel. err | cos | vs unrolled: rel. err / cos | "
        "ms | theirs/ours |",
        "|---|---|---|---:|---:|---|---:|---:|",
    ]
    rows = res["rows"]
    for r in rows:
        name = {
            "theirs": "HippoTrainer 1.0.0",
            "compat": "hypergradient.compat",
            "native": r["label"],
        }[r["impl"]]
        theirs = next(
            (
                x
                for x in rows
                if x["impl"] == "theirs"
                and x["point"] == r["point"]
                and x["method"] == r["method"]
                and x["kw"] == r["kw"]
            ),
            None,
        )
        ratio = ""
        if r["impl"] != "theirs" and theirs is not None and theirs["ms"] and r["ms"]:
            ratio = f"{theirs['ms'] / r['ms']:.2f} ({theirs['cpu_ms'] / r['cpu_ms']:.2f})"
        unr = ""
        if r["rel_err_unrolled"] is not None:
            unr = f"{_sci(r['rel_err_unrolled'])} / {r['cos_unrolled']:.4f}"
        if r["error"]:
            cells = ["error: " + r["error"][:80], "", "", "", ""]
        else:
            cells = [_sci(r["rel_err"]), f"{r['cos']:.6f}", unr, _ms(r["ms"]), ratio]
        lines.append(
            f"| {r['point']} | {r['method']}({_kw_str(r['kw'])}) | {name} | "
            + " | ".join(cells)
            + " |"
        )
    if res["checks"]:
        lines += ["", "Checks of HippoTrainer's outputs:", ""]
        lines += [f"- {c}" for c in res["checks"]]
    probe = res.get("crash_probe")
    if probe:
        if probe["crashed"]:
            lines += [
                "",
                "HippoTrainer's DRMAD with the criterion of the problem (penalty reads "
                "`model.weight`), called as its `hyper_step` does at the point `early`, raises:",
                "",
                f"    {probe['error']}",
                "",
                "(its `hyper_grad` builds the validation loss, then trains T steps with "
                "`optimizer.step()`, which modifies the weight in place, then differentiates "
                "the stale validation graph). With `model.weight.clone()` in the penalty it "
                "runs (rows above).",
            ]
        else:
            lines += ["", "HippoTrainer's DRMAD ran with the plain criterion."]
    if not have_theirs:
        lines += ["", "HippoTrainer not importable: only our rows are shown."]
    return "\n".join(lines)


def markdown_b(res: dict[str, Any]) -> str:
    s = res["summary"]
    untuned = next((r for r in s if r["impl"] == "untuned"), None)
    lines = [
        f"## (b) End to end: {res['steps']} steps of HippoTrainer's documented loop, "
        f"inner_steps={INNER_STEPS}, hyper_lr={res['hyper_lr']}, inner SGD lr {LR}",
        "",
        f"Median of {res['rounds']} round(s) in lockstep. val = validation BCE (no penalty), "
        "val crit. = the outer objective (BCE + penalty), test = test BCE, after the last step. "
        "wall s = sum of the run's step times (evaluations excluded); step ms = median step "
        "without a hyper-step; hyper ms = median step with one; val drop / s = (initial - "
        "final val BCE) / wall s; gain / extra s = (untuned val - val) / (wall s - untuned "
        "wall s), the validation loss bought per second of hyper-optimization; "
        "cos < 0 = hyper-steps whose applied hypergradient has a "
        "negative cosine with the exact implicit one (instrumented round); median cos and "
        "median rel. err over the hyper-steps. theirs/ours = HippoTrainer's wall s / the "
        "compat run's (or the native run's).",
        "",
        "| run | val | val crit. | test | mean log_wd | wall s | step ms | hyper ms | "
        "val drop / s | gain / extra s | cos < 0 | median cos | median rel. err | "
        "theirs/ours wall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in s:
        theirs = next(
            (x for x in s if x["pair"] == r["pair"] and x["impl"] == "theirs" and not x["error"]),
            None,
        )
        ratio = ""
        if r["impl"] in ("compat", "native") and theirs is not None and not r["error"]:
            ratio = f"{theirs['seconds'] / r['seconds']:.2f}"
        if r["error"]:
            lines.append(
                f"| {r['label']} | crashed at step {r['error_step']}: "
                f"{r['error'][:90]} |  |  |  |  |  |  |  |  |  |  |  |  |"
            )
            continue
        finite = [c for c in r["cos_exact"] if math.isfinite(c)]
        n = len(r["cos_exact"])
        neg = f"{r['negative_cos']}/{n}" if n else "—"
        if r["nonfinite_cos"]:
            neg += f" ({r['nonfinite_cos']} NaN)"
        med = f"{median(finite):.3f}" if finite else "—"
        rels = [x for x in r["rel_err_exact"] if math.isfinite(x)]
        rel = _sci(median(rels)) if rels else "—"
        val = _f(r["val_bce"])
        gain = ""
        if untuned is not None and r is not untuned:
            extra = r["seconds"] - untuned["seconds"]
            delta = untuned["val_bce"] - r["val_bce"]
            gain = _sci(delta / extra) if extra > 0 and math.isfinite(delta) else "—"
        if r["diverged_at_step"] is not None:
            val = f"NaN from step {r['diverged_at_step']}"
        lines.append(
            f"| {r['label']} | {val} | {_f(r['val_criterion'])} | "
            f"{_f(r['test_bce'])} | {_f(r['log_wd_mean'], 3)} | {r['seconds']:.3f} | "
            f"{_ms(r['step_ms'])} | {_ms(r['hyper_step_ms'])} | "
            f"{_sci(r['val_drop_per_s'])} | {gain} | {neg} | {med} | {rel} | {ratio} |"
        )
    notes = []
    for r in s:
        if r["max_round_diff"] > 1e-12:
            notes.append(f"{r['label']}: final val differs across rounds by {r['max_round_diff']}")
        if not r["instrumented_matches"] and not r["error"]:
            notes.append(f"{r['label']}: the instrumented round ended elsewhere")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def markdown_findings(res_a: dict[str, Any], res_b: list[dict[str, Any]]) -> str:
    """What HippoTrainer's methods do wrong here, derived from the numbers above."""
    rows = res_a["rows"]

    def row(point: str, method: str, kw: dict[str, Any], impl: str) -> dict[str, Any] | None:
        return next(
            (
                r
                for r in rows
                if r["point"] == point
                and r["method"] == method
                and r["kw"] == kw
                and r["impl"] == impl
            ),
            None,
        )

    out: list[str] = []
    t = row("early", "DRMAD", {"T": 10}, "theirs")
    probe = res_a.get("crash_probe") or {}
    if probe.get("crashed"):
        out.append(
            "DRMAD crashes (RuntimeError: a variable needed for gradient computation was "
            "modified in place) whenever the validation loss's graph saves the weight tensor, "
            "as any penalty on the weights does; see (a) and the `plain criterion` rows of "
            "(b)."
        )
    if t is not None and not t["error"] and len(set(t["h"])) == 1:
        out.append(
            f"DRMAD returns the same value for every hyperparameter ({t['h'][0]:.3g} at "
            f"`early`: rel. err {t['rel_err']:.3g}, cos {t['cos']:.3f} against the exact "
            f"hypergradient, {t['rel_err_unrolled']:.3g} against the unrolled one): its reverse "
            "pass subtracts one detached scalar from every entry."
        )
    for res in res_b:
        for r in res["summary"]:
            if r["impl"] != "theirs" or r["error"] or not r["pair"].startswith("DRMAD"):
                continue
            untuned = next(x for x in res["summary"] if x["impl"] == "untuned")
            if r["diverged_at_step"] is not None:
                out.append(
                    f"hyper_lr={res['hyper_lr']:g}: HippoTrainer's DRMAD run diverged (NaN "
                    f"losses from step {r['diverged_at_step']}, mean log_wd "
                    f"{r['log_wd_mean']:.3g}); the compat DRMAD reached val "
                    + ", ".join(
                        f"{x['val_bce']:.4f}"
                        for x in res["summary"]
                        if x["pair"] == r["pair"] and x["impl"] == "compat"
                    )
                    + "."
                )
            elif r["val_bce"] > untuned["val_bce"]:
                out.append(
                    f"hyper_lr={res['hyper_lr']:g}: HippoTrainer's DRMAD raised log_wd (mean "
                    f"{r['log_wd_mean']:.3g} from {LOG_WD0:g}) and ended with a validation BCE "
                    f"of {r['val_bce']:.4f}, worse than the untuned run's "
                    f"{untuned['val_bce']:.4f}."
                )
    errs = [
        (
            row(p, "Neumann", {"num_terms": n}, "theirs"),
            row(p, "Neumann", {"num_terms": n}, "compat"),
        )
        for p in ("early", "optimum")
        for n in (1, 5, 20)
    ]
    if all(a is not None and b is not None and not a["error"] for a, b in errs):
        th = ", ".join(f"{a['rel_err']:.3f}" for a, _ in errs)
        ou = ", ".join(f"{b['rel_err']:.3f}" for _, b in errs)
        out.append(
            "Neumann(num_terms=1, 5, 20) does not converge as terms are added (rel. err at "
            f"early then optimum: {th}; compat: {ou}): the recursion `p = lr * (p + v)` "
            "rescales the whole partial sum at every term (checks in (a))."
        )
    a = row("early", "HOAG", {"epsilon": 1e-12, "cg_max_iter": 31}, "theirs")
    b = row("early", "HOAG", {"epsilon": 1e-12, "cg_max_iter": 31}, "compat")
    if a is not None and b is not None and not a["error"]:
        out.append(
            f"HOAG(epsilon=1e-12, cg_max_iter=31) stalls at rel. err {a['rel_err']:.2g} "
            f"(compat: {b['rel_err']:.2g}) and takes {a['ms'] / b['ms']:.1f}x the time: the "
            "'+ 1e-8' in its CG denominators breaks conjugacy once ||r||^2 is small, and each "
            "Hessian-vector product rebuilds the gradient graph."
        )
    a = row("early", "T1T2", {}, "theirs")
    if a is not None and not a["error"]:
        out.append(
            "T1T2 omits the learning-rate factor of the one-step look-ahead (equal to "
            "`hg.implicit(..., hg.Identity(1.0))`, checks in (a)); with lr = 0.5 its error "
            "against the implicit hypergradient is about the same as the correct "
            f"look-ahead's ({a['rel_err']:.3f} vs "
            f"{row('early', 'T1T2', {}, 'compat')['rel_err']:.3f} at `early`)."
        )
    if not out:
        return ""
    return "## Findings on HippoTrainer 1.0.0\n\n" + "\n".join(f"- {x}" for x in out)


def plot_b(results: list[dict[str, Any]], path: Path) -> str | None:
    try:
        plt = pyplot()
    except Exception as exc:  # plots are optional
        return error_text(exc)
    pairs = [p for p in dict.fromkeys(r["pair"] for r in results[0]["summary"]) if p != "-"]
    fig, axes = plt.subplots(
        len(results), len(pairs), figsize=(4.6 * len(pairs), 4.0 * len(results)), squeeze=False
    )
    styles = {
        "theirs": {"color": "C3", "marker": "o", "markersize": 3},
        "compat": {"color": "C0", "marker": "s", "markersize": 3},
        "native": {"color": "C2", "marker": "^", "markersize": 3, "linestyle": "--"},
    }
    for row, res in enumerate(results):
        s = res["summary"]
        untuned = next((r for r in s if r["impl"] == "untuned"), None)
        for ax, pair in zip(axes[row], pairs):
            for r in s:
                if r["pair"] != pair or r["error"]:
                    continue
                pts = [c for c in r["curve"] if math.isfinite(c["val_bce"])]
                label = r["label"]
                if r["diverged_at_step"] is not None:
                    label += f" (NaN from step {r['diverged_at_step']})"
                ax.plot(
                    [c["seconds"] for c in pts],
                    [c["val_bce"] for c in pts],
                    label=label,
                    **styles[r["impl"]],
                )
            if untuned is not None:
                ax.plot(
                    [c["seconds"] for c in untuned["curve"]],
                    [c["val_bce"] for c in untuned["curve"]],
                    color="0.5",
                    linestyle=":",
                    label="untuned (plain SGD)",
                )
            finals = [r["val_bce"] for r in s if not r["error"] and math.isfinite(r["val_bce"])]
            lows = [
                c["val_bce"]
                for r in s
                if not r["error"]
                for c in r["curve"]
                if math.isfinite(c["val_bce"])
            ]
            ax.set_ylim(0.97 * min(lows), 1.6 * max(finals))  # the start (0.69) is off-scale
            ax.set_title(f"{pair}, hyper_lr={res['hyper_lr']:g}", fontsize=10)
            ax.set_xlabel("wall-clock seconds (sum of step times)")
            ax.set_ylabel("validation BCE")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=6)
    fig.suptitle(
        f"HippoTrainer 1.0.0 (red) vs hypergradient (blue: compat, green: native): "
        f"validation loss vs wall-clock, {results[0]['steps']} steps (start at 0.69 off-scale)"
    )
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    p = cli(__doc__)
    p.add_argument("--steps", type=int, help="training steps of part (b) (default 300, quick 20)")
    p.add_argument("--rounds", type=int, help="timed rounds of part (b) (default 3, quick 1)")
    p.add_argument("--repeats", type=int, help="timed calls in part (a) (default 7, quick 1)")
    p.add_argument("--hyper-lr", type=float, nargs="+", default=list(HYPER_LRS))
    p.add_argument("--no-hippotrainer", action="store_true", help="skip HippoTrainer")
    args = p.parse_args(argv)
    if rp.replot(args, "vs_hippotrainer", plot):
        return 0
    start(args)
    q = args.quick
    steps, rounds, repeats = (
        args.steps or (20 if q else 300),
        args.rounds or (1 if q else 3),
        args.repeats or (1 if q else 7),
    )
    hyper_lrs = args.hyper_lr[:1] if q else args.hyper_lr
    ht, ht_version = load_hippotrainer(skip=args.no_hippotrainer)
    rep = Report(
        "vs_hippotrainer",
        "HippoTrainer 1.0.0 vs hypergradient",
        args,
        hippotrainer=ht_version if ht else None,
    )
    rep.note(
        "float64; problem: per-feature L2 logistic regression on breast cancer (100 train / 200 "
        "validation / 269 test, one full batch per loader), 30 log weight decays from -3, the "
        "penalty inside the criterion (training and validation)",
        "rel. err = ||h - h*|| / ||h*||, cos = cosine(h, h*), h* = exact implicit "
        "hypergradient (hg.Exact on the same batches at the same parameters)",
    )
    if ht is None:
        rep.note(
            f"**HippoTrainer is not importable ({ht_version}): the comparison is SKIPPED and only "
            "our rows are run. Install it with `.venv/bin/pip install --no-deps "
            "hippotrainer==1.0.0`.**"
        )
    else:
        rep.note(f"HippoTrainer {ht_version}")
    data = breast_cancer_data(args.seed, y_column=True)
    res_a = part_a(data, ht, repeats, q)
    rep.section(markdown_a(res_a, repeats, ht is not None))
    res_b = [part_b(data, ht, steps, rounds, lr) for lr in hyper_lrs]
    for r in res_b:
        rep.section(markdown_b(r))
    findings = markdown_findings(res_a, res_b) if ht is not None else ""
    if findings:
        rep.section(findings)
    settings = {
        "lr": LR,
        "hyper_lrs": hyper_lrs,
        "inner_steps": INNER_STEPS,
        "log_wd0": LOG_WD0,
        "steps": steps,
        "rounds": rounds,
        "repeats": repeats,
    }
    rep.write(
        {
            "settings": settings,
            "hippotrainer_available": ht is not None,
            "a": res_a,
            "b": res_b,
            "plot": "vs_hippotrainer.png",
        },
        plot,
    )
    return 0


def plot(data: dict[str, Any], out: Path) -> Path:
    path = out / "vs_hippotrainer.png"
    for res in data["b"]:  # JSON null = NaN (a diverged run)
        for r in res["summary"]:
            r["val_bce"] = math.nan if r["val_bce"] is None else r["val_bce"]
            for c in r["curve"]:
                c["val_bce"] = math.nan if c["val_bce"] is None else c["val_bce"]
    err = plot_b(data["b"], path)
    if err:
        raise ImportError(err)
    return path


if __name__ == "__main__":
    sys.exit(main())
