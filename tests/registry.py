"""The method registry of the contract tests: one row per method configuration.

Each row says how to build the method, the problem it is checked on, the exact reference
for that problem, and the tolerance. ``tests/test_method_contract.py`` runs the same
contract over every row (exactness, resume bit for bit, rollback of a failed call, plain
config, bad input); ``tests/test_distributed.py`` runs distributed equality (2 gloo ranks
against one process) over it. Adding a method: one row here.

References (all float64, none computed by library code):

- ``ridge``: closed forms. ``f = 0.5 mean((X w - y)^2) + 0.5 sum(exp(h) w^2)``,
  ``g = 0.5 mean((Xv w - yv)^2)``; ``w* = A^{-1} X^T y / n`` with
  ``A = X^T X / n + diag(exp h)``; ``dg/dh = -exp(h) w* (A + damping I)^{-1} grad g``.
  The truncated Neumann series is summed densely; T1T2 is the derivative of one explicit
  SGD step.
- ``trajectory``: central finite differences of the same inner loop (momentum SGD, the
  learning rate a hyperparameter); truncation: plain autograd through the loop with its
  first ``T - K`` steps detached.
- ``linear``: a quadratic inner loss whose hyperparameter enters linearly, where DrMAD is
  exact (the reverse recursion does not depend on the states): finite differences.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import hypergradient as hg

DT = torch.float64
N, D = 40, 6  # ridge data: samples, features
T, TRAJ_D = 6, 5  # trajectory: steps, features
LR = 0.2


# ----------------------------------------------------------------------------- data


def _ridge_data():
    g = torch.Generator().manual_seed(11)
    X = torch.randn(N, D, generator=g, dtype=DT)
    y = X @ torch.randn(D, generator=g, dtype=DT) + 0.3 * torch.randn(N, generator=g, dtype=DT)
    Xv = torch.randn(N, D, generator=g, dtype=DT)
    yv = Xv @ torch.randn(D, generator=g, dtype=DT)
    h = torch.linspace(-1.5, 0.5, D, dtype=DT)
    return X, y, Xv, yv, h


def _traj_data():
    g = torch.Generator().manual_seed(7)
    X = torch.randn(N, TRAJ_D, generator=g, dtype=DT)
    y = torch.randn(N, generator=g, dtype=DT)
    Xv = torch.randn(N, TRAJ_D, generator=g, dtype=DT)
    yv = torch.randn(N, generator=g, dtype=DT)
    w0 = 0.1 * torch.randn(TRAJ_D, generator=g, dtype=DT)
    return X, y, Xv, yv, w0


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rows of ``t`` for ``rank`` of ``world`` equal shards."""
    n = t.shape[0] // world
    return t[rank * n : (rank + 1) * n]


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    """A problem with its exact hypergradient.

    ``problem(rank, world, make_inner=None)`` builds the problem on one data shard
    (``world=1``: all the data); ``make_inner`` replaces the inner loss builder (bad-data
    and failure tests). ``reference`` is the exact answer on all the data.
    """

    problem: Callable[..., hg.Problem]
    reference: Any
    hparams: Callable[[], Any]
    data: tuple = field(default=())


def ridge_losses(X, y, Xv, yv, wrap=lambda h: h):
    def inner(w, h):
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (wrap(h).exp() * w**2).sum()

    def outer(w, h):
        return 0.5 * ((Xv @ w - yv) ** 2).mean()

    return inner, outer


def _ridge_closed(X, y, Xv, yv, h):
    A = X.T @ X / N + torch.diag(h.exp())
    w = torch.linalg.solve(A, X.T @ y / N)
    gw = Xv.T @ (Xv @ w - yv) / N
    return A, w, gw


@functools.cache
def _ridge_lambda_max() -> float:
    A = _ridge_closed(*_ridge_data())[0]
    return float(torch.linalg.eigvalsh(A)[-1])


@functools.cache
def ridge_case(
    kind: str = "solve",
    damping: float = 0.0,
    lr: float = 0.5,
    iters: int = 10,
    alpha: float | None = None,
):
    """Implicit methods at the ridge optimum; ``kind``: solve, neumann (step ``alpha``,
    default ``lr``) or t1t2."""
    X, y, Xv, yv, h = _ridge_data()
    A, w, gw = _ridge_closed(X, y, Xv, yv, h)
    if kind == "solve":
        ref = -h.exp() * w * torch.linalg.solve(A + damping * torch.eye(D, dtype=DT), gw)
        prev = None
    elif kind == "neumann":  # alpha * sum_{j<=k} (I - alpha A)^j b
        step = lr if alpha is None else alpha
        term, total = gw.clone(), gw.clone()
        for _ in range(iters):
            term = term - step * (A @ term)
            total = total + term
        ref = -h.exp() * w * (step * total)
        prev = None
    else:  # t1t2: one SGD step from prev; dw'/dh_j = -lr exp(h_j) prev_j e_j
        prev = w + 0.05 * torch.linspace(-1, 1, D, dtype=DT)
        after = prev - lr * (A @ prev - X.T @ y / N)
        ref = -lr * h.exp() * prev * (Xv.T @ (Xv @ after - yv) / N)
        w = after

    def problem(rank=0, world=1, make_inner=None, hparams=None):
        data = [shard(t, rank, world) for t in (X, y, Xv, yv)]
        inner, outer = (make_inner or ridge_losses)(*data)
        return hg.Problem(
            inner,
            outer,
            w.clone(),
            h.clone() if hparams is None else hparams,
            lr=lr,
            prev_params=None if prev is None else prev.clone(),
        )

    return Case(problem, ref, lambda: h.clone(), (X, y, Xv, yv))


def traj_losses(X, y, Xv, yv):
    def inner(w, h, batch=None):
        r = X @ w - y
        return 0.5 * (r**2).mean() + 0.05 * (r**4).mean() + (0.5 * (h["decay"] * w**2).sum())

    def outer(w, h):
        return 0.5 * ((Xv @ w - yv) ** 2).mean()

    return inner, outer


def linear_losses(X, y, Xv, yv):
    def inner(w, h, batch=None):  # d/dh grad_w f = I: DrMAD is exact
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.1 * (w**2).sum() + (h["b"] * w).sum()

    def outer(w, h):
        return 0.5 * ((Xv @ w - yv) ** 2).mean()

    return inner, outer


def _traj_hparams(linear: bool) -> dict[str, torch.Tensor]:
    if linear:
        return {"b": torch.linspace(-0.2, 0.3, TRAJ_D, dtype=DT)}
    return {"decay": torch.linspace(0.05, 0.3, TRAJ_D, dtype=DT), "lr": torch.tensor(LR, dtype=DT)}


def _optimizer(h: dict[str, torch.Tensor]) -> hg.optim.FunctionalOptimizer:
    return hg.optim.sgd(lr=h.get("lr", LR), momentum=0.7)


def run_loop(inner, outer, w0, h, steps=T, detach_before=0):
    """The inner loop written directly (momentum SGD), returning the outer loss."""
    opt = _optimizer(h)
    p = [w0.clone()]
    state = opt.init(p)
    for t in range(steps):
        g = torch.func.grad(inner)(p[0], h)
        p, state = opt.update(p, [g], state, t)
        if t + 1 == detach_before:  # truncation: theta and state are constants from here
            p, state = [x.detach() for x in p], [x.detach() for x in state]
    return outer(p[0], h)


def central_differences(loss_of_h, h, eps=1e-6):
    out = {}
    for k, v in h.items():
        grad = torch.zeros_like(v).reshape(-1)
        for i in range(v.numel()):
            e = torch.zeros(v.numel(), dtype=DT)
            e[i] = eps
            plus = loss_of_h({**h, k: v + e.reshape(v.shape)})
            minus = loss_of_h({**h, k: v - e.reshape(v.shape)})
            grad[i] = (plus - minus) / (2 * eps)
        out[k] = grad.reshape(v.shape)
    return out


@functools.cache
def trajectory_case(linear: bool = False, truncate: int | None = None):
    """Trajectory methods on ``T`` momentum-SGD steps from ``w0``."""
    X, y, Xv, yv, w0 = _traj_data()
    losses = linear_losses if linear else traj_losses
    inner, outer = losses(X, y, Xv, yv)
    h0 = _traj_hparams(linear)
    if truncate is None:
        ref = central_differences(lambda h: run_loop(inner, outer, w0, h), h0)
    else:
        hh = {k: v.clone().requires_grad_(True) for k, v in h0.items()}
        value = run_loop(inner, outer, w0, hh, detach_before=T - truncate)
        ref = dict(zip(hh, torch.autograd.grad(value, list(hh.values()))))

    def problem(rank=0, world=1, make_inner=None, hparams=None):
        data = [shard(t, rank, world) for t in (X, y, Xv, yv)]
        f, g = (make_inner or losses)(*data)
        h = {k: v.clone() for k, v in h0.items()} if hparams is None else hparams
        traj = hg.Trajectory(f, w0.clone(), _optimizer(h), [None] * T)
        return hg.Problem(lambda p, hh: f(p, hh, None), g, w0.clone(), h, trajectory=traj)

    return Case(problem, ref, lambda: {k: v.clone() for k, v in h0.items()}, (X, y, Xv, yv))


# ----------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class MethodRow:
    """One method configuration of the registry.

    Attributes:
        id: test id.
        make: builds a fresh method.
        case: builds the problem and its reference (:class:`Case`).
        tol: relative error allowed against the reference (single process).
        reference: what the reference is.
        randomized: the method draws random numbers (a sketch): bit-for-bit resume and
            rollback need the solver's generator in its state_dict.
        trajectory: a trajectory method (losses take a batch argument).
        calls: calls on the same problem before the result is compared with the reference
            (HOAG converges over calls through its warm start).
    """

    id: str
    make: Callable[[], hg.Method]
    case: Callable[[], Case]
    tol: float
    reference: str
    randomized: bool = False
    trajectory: bool = False
    calls: int = 1


METHODS = [
    MethodRow(
        "t1t2", hg.T1T2, lambda: ridge_case("t1t2"), 1e-12, "closed-form derivative of one step"
    ),
    MethodRow(
        "implicit-exact",
        lambda: hg.Implicit(hg.Exact()),
        ridge_case,
        1e-11,
        "closed-form dense solve",
    ),
    MethodRow(
        "implicit-cg-damped",
        lambda: hg.Implicit(hg.CG(maxiter=50, tol=1e-13), damping=0.3),
        lambda: ridge_case(damping=0.3),
        1e-10,
        "closed-form dense solve of the damped system",
    ),
    MethodRow(
        "implicit-cg-auto-damping",
        lambda: hg.Implicit(
            hg.CG(maxiter=50, tol=1e-13), damping=hg.solvers.AutoDamping(seed=0, refresh_every=2)
        ),
        # Lanczos on 6 unknowns finds the spectrum exactly: damping = 1e-3 lambda_max
        lambda: ridge_case(damping=1e-3 * _ridge_lambda_max()),
        1e-10,
        "closed-form dense solve of the system damped by 1e-3 lambda_max (auto damping)",
        randomized=True,
    ),
    MethodRow(
        "ift-default-neumann",
        lambda: hg.IFT(seed=0),  # the default solver; seeded: its estimate draws a start
        # lr = 0.5 converges (lr lambda_max = 1.25) but exceeds 1 / lambda_max = 0.4, so the
        # safe default steps by 1 / lambda_est; the default 10-product Lanczos estimate is
        # within 2e-4 of lambda_max here (safety factor 1), hence the tolerance.
        lambda: ridge_case("neumann", alpha=1 / _ridge_lambda_max()),
        1e-5,
        "the 11-term Neumann series with alpha = min(lr, 1 / lambda_max), summed densely",
        randomized=True,
    ),
    MethodRow(
        "ift-fixed-step",
        lambda: hg.IFT(alpha=0.5),
        lambda: ridge_case("neumann"),
        1e-12,
        "the 11-term Neumann series with alpha = lr (Lorraine et al.), summed densely",
    ),
    MethodRow(
        "ift-nystrom",
        lambda: hg.IFT(hg.Nystrom(rank=D, rho=1e-11, sketch="gaussian", seed=0)),
        ridge_case,
        1e-7,
        "closed-form dense solve (full-rank sketch)",
        randomized=True,
    ),
    MethodRow(
        "implicit-nystrom-pcg",
        lambda: hg.Implicit(hg.NystromPCG(rank=3, maxiter=50, tol=1e-13, seed=0, refresh_every=2)),
        ridge_case,
        1e-10,
        "closed-form dense solve",
        randomized=True,
    ),
    MethodRow(
        "hoag",
        # warm restarts kept after max-iterations exits (the paper's HOAG on a convex problem)
        lambda: hg.HOAG(maxiter=2, tol=1e-13, decay=0.9, reset_on=("negative_curvature",)),
        ridge_case,
        1e-9,
        "closed-form dense solve, reached over 10 calls of 2 CG steps each (warm starts)",
        calls=10,
    ),
    MethodRow(
        "implicit-cg-warm-start",
        # reuse across calls: 2 CG steps per call from the previous call's solution
        lambda: hg.Implicit(hg.CG(maxiter=2, tol=0.0), warm_start=True),
        ridge_case,
        1e-9,
        "closed-form dense solve, reached over 10 calls of 2 CG steps each (warm starts)",
        calls=10,
    ),
    MethodRow(
        "hoag-default-resets",
        # the default drops the warm start after a max-iterations exit: each call converges
        # (CG on 6 unknowns) and the third starts from the second's solution
        lambda: hg.HOAG(tol=1e-12, min_tol=1e-12),
        ridge_case,
        1e-9,
        "closed-form dense solve (CG to relative residual 1e-12, warm-started)",
        calls=3,
    ),
    MethodRow(
        "unrolled",
        hg.Unrolled,
        trajectory_case,
        1e-7,
        "central finite differences of the loop",
        trajectory=True,
    ),
    MethodRow(
        "unrolled-checkpointed",
        lambda: hg.Unrolled(checkpoint_every=3),
        trajectory_case,
        1e-7,
        "central finite differences of the loop",
        trajectory=True,
    ),
    MethodRow(
        "unrolled-truncated",
        lambda: hg.Unrolled(truncate=3),
        lambda: trajectory_case(truncate=3),
        1e-12,
        "autograd through the loop with its first T - 3 steps detached",
        trajectory=True,
    ),
    MethodRow(
        "forward-mode",
        hg.ForwardMode,
        trajectory_case,
        1e-7,
        "central finite differences of the loop",
        trajectory=True,
    ),
    MethodRow(
        "drmad",
        hg.DrMAD,
        lambda: trajectory_case(linear=True),
        1e-7,
        "central finite differences (exact case: linear hyperparameter, quadratic loss)",
        trajectory=True,
    ),
]

ROWS = {row.id: row for row in METHODS}


def rel(a: Any, b: Any) -> float:
    """Relative error of a tree against a reference tree (flattened)."""
    fa = torch.cat([t.reshape(-1).double() for t in hg._tree.flatten(a, "a")[0]])
    fb = torch.cat([t.reshape(-1).double() for t in hg._tree.flatten(b, "b")[0]])
    return float((fa - fb).norm() / fb.norm())
