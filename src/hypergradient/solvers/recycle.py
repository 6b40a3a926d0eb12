"""Conjugate gradient that recycles spectral information from one solve to the next.

Where the products go (``Theta`` is never refreshed by products, so its error grows as
the operator drifts). Measured on dense replays of ``benchmarks/reuse.py`` (digits MLP, 30
hyper-steps, ``rank=200, smallest=20``, one torch thread; cold CG 1,735 products to a 1e-2
hypergradient). **A single replay is one draw of a chaotic process**: perturbing each
right-hand side by 1e-12 relative moves the total by up to 20% (the previous rule: 608, 579,
708, 587), and so does the BLAS thread count (718 with two threads). The figures below before
the last paragraph are single draws and differ by less than that.

- What an oracle would give (products not spent): the exact eigenpairs of each operator 236;
  those of the previous operator 334; the kept ``U`` with the exact current ``U^T A U`` 543,
  rotating ``U`` to its eigenvectors after each solve 570; exact bottom eigenvectors 456.
- Tried, not kept (single draws, 608-655 for the rule of the time): refreshing 2-5 pairs
  with products, a Galerkin-deflated warm start, ``INSIDE`` 1e-2/1e-4, ranks 300/400
  (630-1,072); extrapolated or Galerkin warm starts on past solutions (647-826); ranks
  100/150/250 (767/679/650), ``smallest`` 10/30/40 (650/647/666), larger spaces (150-400
  with 40-60 bottom pairs: 703-868); ``harvest=32`` 675; harmonic
  (639) or refined (615, ~20x the cost) Ritz vectors; the bottom ``Theta`` corrected from the
  harvest's Petrov-Galerkin estimates (672-1,012); updating ``Theta`` by the decays' change
  (633-652: the drift is the weights'); the inner L-BFGS's secant pairs as harvest
  (940-1,008); a longer first solve (660-790); restarts inside a solve (677-961); dropping old
  pairs (636-754); a Jacobi scaling under the recycled preconditioner (estimated: 1,606-2,022;
  exact, not free: 522 against cold CG's 1,331). Without the warm start 1,096.
- ``--size 100k``, first 10 hyper-steps (cold CG 243, TorchOpt 253, 3x: 84): the same warm
  preconditioner from Ritz pairs of the current operator (800 Lanczos steps, not counted)
  needs 98 products with 16/4 pairs (the benchmark's), 87 with 128/16, 85 with 256/32 and 77
  with 512/64: 3x there needs hundreds of pairs of the current operator at every step.

The adopted rules, over an ensemble (the digits sequences of seeds 0-2, each also with
1e-12 perturbations: 8 runs): a slow solve drops the bottom group, a second in a row all of it
(:func:`_top`); :data:`DEPENDENT` 1e-3 instead of 1e-4; :data:`CONSISTENT`;
:data:`BOTTOM_TARGET`. The last three: mean 656 products before, 629 after, fewer
in every run; worst 735 before, 726 after; seed 0 (the benchmark's) 579-708 before,
562-581 after. On sequences not used to choose them: seed 3 554 -> 531, hidden width 24
(seed 0, two runs) 637 / 666 -> 623 / 631. What :data:`CONSISTENT` removes: a top value
that grew to 20 while ``lambda_max`` was 0.6 (its true Rayleigh quotient 0.015) and hid a
low-curvature direction from CG for the rest of the sequence.

Time. At ``n = 1e5`` (float32, ``k = 20``, ``m = 16``) a solve's work beyond its products
is 20-25 ms on one core (Rayleigh-Ritz ~13, the preconditioner ~0.5 a call, the recorder's
copies ~0.2 a product), about five Hessian-vector products of ``reuse.py --size 100k``;
on digits (``k = 220``) the eigenproblem of order ``k + m`` is about half of it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .. import _tree, _vocab
from .._vocab import ArgumentTypeError, Status
from ..operators import DampedOperator, LinearOperator
from .base import Solution, Solver, check_keys, check_tensor, convergence_rate
from .cg import conjugate_gradient
from .cg_status import relative_tol
from .recycle_basis import Basis, Recorder

__all__ = ["STALE_SLOWDOWN", "Basis", "RecycledCG"]  # Basis: from recycle_basis

#: ``RecycledCG`` forgets the bottom group of its recycled space (all of it when ``smallest``
#: is 0) once a solve converges this many times slower (``base.convergence_rate``: ``-log(final
#: / start residual)`` per iteration) than the plain CG solve that started it.
STALE_SLOWDOWN = 1.5

#: The Rayleigh-Ritz step drops the combinations of the harvest ``P`` whose part off
#: ``span[U]`` has a squared norm ``s`` below this (nearly dependent columns). The stale
#: ``Theta``'s error enters such a combination's Rayleigh quotient divided by ``s``.
DEPENDENT = 1e-3

#: The Rayleigh-Ritz step drops a new Ritz value above this multiple of the largest value it
#: can vouch for: the kept ``Theta``'s largest and the harvest's own largest Ritz value
#: (exact, current operator). Above it, a value comes from the stale ``Theta``'s error
#: amplified through a nearly dependent combination, not from the operator.
CONSISTENT = 1.2

#: The bottom group's directions are mapped near ``BOTTOM_TARGET * sigma`` instead of
#: ``sigma``: their stale ``Theta`` are biased low (the smallest of noisy values are kept).
BOTTOM_TARGET = 0.5

#: A harvested combination whose part off ``span[U]`` has a squared norm below this replaces
#: the direction of ``U`` it covers (its Rayleigh quotients are exact, ``Theta`` is stale).
INSIDE = 1e-3


class RecycledCG(Solver):
    """CG preconditioned by Ritz pairs recycled from the previous solves (a spectral LMP).

    Consecutive hyper-steps solve nearly the same system ``A_t x = b_t``. Every solve keeps
    the pairs ``(p_j, A p_j)`` its iterations computed anyway (up to ``harvest``), and a
    Rayleigh-Ritz step on ``span[U, p_1..p_m]`` turns them, with the kept basis ``U``, into
    new Ritz pairs ``(theta_i, u_i)``: the ``rank`` largest and the ``smallest`` smallest
    are kept (``U`` orthonormal, n x k). The next solve is CG preconditioned by the
    limited-memory spectral preconditioner (Gratton, Sartenaer & Tshimanga 2011; the
    deflation idea of Saad, Yeung, Erhel & Guyomarc'h 2000 and the recycling of Parks, de
    Sturler et al. 2006, without their ``A U`` products)::

        M^{-1} = I + U (T Theta^{-1} - I) U^T,   sigma = min(theta of the top group)

    with ``T = sigma`` on the top group and :data:`BOTTOM_TARGET` ``* sigma`` on the bottom
    group, which maps each kept eigen-direction of ``A`` near ``sigma``: the largest eigenvalues
    come down and the smallest go up, so the condition number of what CG sees is that of
    the rest of the spectrum. The Rayleigh-Ritz step needs ``Z^T A Z`` on
    ``span[U, P]``: ``P^T A P`` and ``U^T (A P)`` are exact (current operator, from the
    stored products); only ``U^T A U`` is the previous one, ``Theta``. No product is spent
    on recycling. The harvest is projected off ``U`` in small matrices only (Gram
    ``P^T P - C^T C`` with ``C = U^T P``, an ``m x m`` eigen-decomposition); where a
    harvested direction lies (nearly, :data:`INSIDE`) in ``span[U]``, the direction of
    ``U`` it covers is dropped in its favour, since its products are exact and ``Theta``
    is stale there (on ``benchmarks/reuse.py`` this took the digits sequence from 1,132
    to 632 products against keeping ``U`` whole). The new ``U = U M_1 + P M_2`` is kept as
    blocks and a coefficient matrix (:class:`Basis`) until it is :data:`LAZY` too wide.

    Safeguards: ``M`` is symmetric positive definite whatever the kept pairs (``theta > 0``,
    ``U`` orthonormal), so CG converges on a positive-definite operator whatever the
    recycled space; stale information only slows it. Damping is tracked: when the operator
    is a :class:`~hypergradient.operators.DampedOperator` the kept ``Theta`` is that of the
    undamped operator, shifted by the current damping (the eigenvectors do not move). A
    solve that converges ``STALE_SLOWDOWN`` (1.5) times slower than the plain CG solve that
    started the space drops its bottom group (``stats["recycle_stale"]``). A preconditioned solve
    that meets negative curvature or diverges is repeated as plain CG from the same start
    and the one with the smaller residual is returned (``stats["recycle_fallback"]``; both
    solves' products counted), and the space is dropped. A change of size drops it too.
    A new Ritz value above :data:`CONSISTENT` (1.2) times the largest the step can vouch for
    (the kept ``Theta``'s, the harvest's own) is dropped (``stats["recycle_inconsistent"]``).

    Args:
        rank: largest Ritz pairs kept (the top of the spectrum).
        smallest: smallest Ritz pairs kept (the bottom of the spectrum).
        maxiter, tol, atol: as :class:`~hypergradient.solvers.CG`.
        harvest: products of a solve kept for the next Rayleigh-Ritz step (memory).

    Cost: the products of CG (one per iteration, plus the warm start's), nothing more.
    Per iteration ``M^{-1} r`` (:meth:`Basis.preconditioner`), ``4 n w`` flops for the
    deferred blocks' width ``w`` in ``[k, 1.25 k]``. Per solve, the Rayleigh-Ritz step:
    ``P X^T``, ``W X^T`` on the block ``X = [p_1; A p_1; ...]`` (``2 n m (m + k)`` flops),
    eigenproblems of order ``k + m`` and ``m`` (two, :data:`CONSISTENT`'s bound) and, every
    few solves, the rotation (``2 n k w``); ``k = rank + smallest``, ``m <= harvest``.
    Memory: ``U`` (``n k``) across solves, ``2 n m`` during a solve. ``reset()`` forgets
    ``U``; ``U``, ``Theta`` and the reference rate are in :meth:`state_dict`.

    Limits: ``Theta`` is never refreshed by products, so its error grows as the operator
    drifts; the module docstring says where the products go on ``benchmarks/reuse.py``.
    """

    requires_symmetric = True

    def __init__(
        self,
        rank: int = 100,
        smallest: int = 10,
        maxiter: int = 100,
        tol: float = 1e-6,
        atol: float = 0.0,
        harvest: int = 64,
    ):
        self.rank = _vocab.as_int(rank, "rank", min=1)
        self.smallest = _vocab.as_int(smallest, "smallest", min=0)
        self.maxiter = _vocab.as_int(maxiter, "maxiter", min=1)
        self.tol = relative_tol(tol)
        self.atol = _vocab.as_float(atol, "atol", min=0.0)
        self.harvest = _vocab.as_int(harvest, "harvest", min=1)
        self.reset()

    def config(self) -> dict[str, Any]:
        keys = ("rank", "smallest", "maxiter", "tol", "atol", "harvest")
        return {k: getattr(self, k) for k in keys}

    def reset(self) -> None:
        """Forget the recycled space; the next solve is plain CG (and starts a new one)."""
        self._U: Basis | None = None
        self._theta: Tensor | None = None  # Ritz values of the undamped operator
        self._base: float | None = None  # convergence rate of the solve that started U
        self._trimmed = False  # the last solve was slow and dropped the bottom group

    # -- checkpoints ------------------------------------------------------------------
    _KEYS = ("U", "theta", "base_rate", "trimmed")

    def state_dict(self) -> dict[str, Any]:
        """``U`` (its deferred rotations multiplied out, also in the solver, so that a
        resumed copy continues bit for bit), ``theta``, ``base_rate`` and ``trimmed``."""
        if self._U is not None:
            self._U = Basis((self._U.rows(),))
        U, th = self._U, self._theta
        return {
            "U": None
            if U is None
            else U.rows().detach().T.clone(memory_format=torch.contiguous_format),
            "theta": None if th is None else th.detach().clone(),
            "base_rate": self._base,
            "trimmed": self._trimmed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._U, self._theta, self._base, self._trimmed = _loaded(self, state)

    def snapshot(self) -> Any:
        """The kept tensors by reference: a solve replaces them, never modifies them."""
        return (self._U, self._theta, self._base, self._trimmed)

    def restore(self, snapshot: Any) -> None:
        self._U, self._theta, self._base, self._trimmed = snapshot

    # -- solve ------------------------------------------------------------------------
    def _space(self, op: LinearOperator, shift: float) -> tuple[Basis, Tensor] | None:
        """The kept ``(U, Theta)`` for this operator (``Theta`` shifted by its damping)."""
        U, th = self._U, self._theta
        if U is None or th is None or U.shape[0] != op.size:
            self.reset()
            return None
        U, th = U.to(op.device, op.dtype), th.to(op.device, op.dtype) + shift
        keep = th > 0
        if not bool(keep.all()):
            U, th = U.select(keep), th[keep]
        return (U, th) if th.numel() else None

    def _preconditioner(self, U: Basis, th: Tensor) -> Any:
        """``M^{-1}``: the top group mapped to ``sigma`` (the smallest top value), the bottom
        group to :data:`BOTTOM_TARGET` ``* sigma``."""
        bottom = self.smallest if th.numel() > self.smallest else 0
        order = torch.argsort(th)
        target = th[order[bottom]].expand(th.shape).clone()
        target[order[:bottom]] *= BOTTOM_TARGET
        return U.preconditioner(target / th - 1.0)

    def solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> Solution:
        self.validate(op, b, x0)
        shift = float(op.damping) if isinstance(op, DampedOperator) else 0.0
        space = self._space(op, shift)
        rec = Recorder(op, self.harvest)
        start = op.num_matvecs
        pre = None if space is None else self._preconditioner(*space)
        top = 0.0 if space is None else float(space[1].max())  # (a lower bound of ||A||)
        sol = conjugate_gradient(rec, b, x0, self.maxiter, self.tol, self.atol, pre, None, top)
        sol.stats["recycled"] = 0 if space is None else int(space[1].numel())
        if space is not None and sol.status in (Status.NEGATIVE_CURVATURE, Status.DIVERGED):
            sol = self._fallback(op, b, x0, sol)
            space, rec.count = None, 0
        sol.num_hvps = op.num_matvecs - start
        if sol.status in (Status.CONVERGED, Status.MAX_ITERATIONS) and _healthy(sol):
            space = self._judge(sol, space)
            if rec.count and self._rayleigh_ritz(space, *rec.pairs(), shift):
                sol.stats["recycle_inconsistent"] = True
        return sol

    def _fallback(
        self, op: LinearOperator, b: Tensor, x0: Tensor | None, first: Solution
    ) -> Solution:
        """Plain CG after a preconditioned solve that met negative curvature or diverged."""
        self.reset()
        plain = conjugate_gradient(op, b, x0, self.maxiter, self.tol, self.atol)
        better = plain if (plain.residual_norm or 0.0) <= (first.residual_norm or 0.0) else first
        better.stats["recycle_fallback"] = str(first.status)
        return better

    def _judge(
        self, sol: Solution, space: tuple[Basis, Tensor] | None
    ) -> tuple[Basis, Tensor] | None:
        """After a slow solve (:data:`STALE_SLOWDOWN`), drop the bottom group (:func:`_top`);
        after two slow solves in a row, the whole space (its top group is then stale too)."""
        rate, trimmed = convergence_rate(sol), self._trimmed
        if rate is None:
            return space
        self._trimmed = False
        if space is None:
            self._base = rate
        elif self._base is not None and rate * STALE_SLOWDOWN < self._base:
            sol.stats["recycle_stale"] = True
            self._trimmed = not trimmed
            return None if trimmed else _top(space, self.smallest)
        return space

    def _rayleigh_ritz(
        self, space: tuple[Basis, Tensor] | None, P: Tensor, AP: Tensor, X: Tensor, shift: float
    ) -> int:
        """New ``(U, Theta)`` from ``span[U, P^T]`` (``P``: the kept vectors as rows, ``X``
        the block of ``P`` and ``A P`` interleaved); returns how many Ritz values it dropped
        as inconsistent (:data:`CONSISTENT`)."""
        wide = _tree.wide_dtype(P.device)
        PX = (P @ X.T).to(wide)
        G, D = PX[:, 0::2], PX[:, 1::2]
        G, D = 0.5 * (G + G.T), 0.5 * (D + D.T)
        eps = torch.finfo(P.dtype).eps
        floor = max(DEPENDENT, 10 * math.sqrt(eps))
        k, top, dropped = 0, None, 0
        if space is not None:
            U, th = space
            harvest_top = torch.linalg.eigvalsh(_orthonormal(G, D, floor)[1])[-1]
            top = max(float(th.max()), float(harvest_top))
            UX = U.tmul(X.T).to(wide)
            C, UAP = UX[:, 0::2], UX[:, 1::2]  # exact, current operator
            s, V = torch.linalg.eigh(G - C.T @ C)
            inside = s < INSIDE
            N, thw = None, th.to(wide)
            if bool(inside.any()):
                a = C @ V[:, inside]
                Qc, _ = torch.linalg.qr(a, mode="complete")
                N = Qc[:, a.shape[1] :]
                C, UAP, Th = N.T @ C, N.T @ UAP, (N.T * thw) @ N
                ThC = Th @ C
            else:
                Th, ThC = torch.diag(thw), thw[:, None] * C
            k = C.shape[0]
            B = UAP - ThC
            G = G - C.T @ C
            CtU = C.T @ UAP
            D = D - CtU - CtU.T + C.T @ ThC
        R, Hq = _orthonormal(G, D, floor)
        if space is not None:
            Bq = B @ R
            Hq = torch.cat([torch.cat([Th, Bq], 1), torch.cat([Bq.T, Hq], 1)])
        lam, Y = torch.linalg.eigh(0.5 * (Hq + Hq.T))
        if top is not None:  # (:data:`CONSISTENT`)
            ok = lam <= CONSISTENT * top
            dropped = int((~ok).sum())
            lam, Y = (lam[ok], Y[:, ok]) if dropped else (lam, Y)
        n = lam.numel()
        idx = sorted(set(range(min(self.smallest, n))) | set(range(max(0, n - self.rank), n)))
        pick = torch.tensor(idx, dtype=torch.long, device=lam.device)
        lam, Y = lam[pick], Y[:, pick]
        positive = lam > 0
        lam, Y = lam[positive], Y[:, positive]
        if not lam.numel():
            self.reset()
            return dropped
        M2 = R @ Y[k:]  # P: a view of the recorder's block, copied only if kept (settled)
        if space is None:
            self._U = Basis((P,), M2.to(P.dtype)).settled()
        else:
            M1 = Y[:k] - C @ M2
            if N is not None:
                M1 = N @ M1
            self._U = space[0].rotated(M1.to(P.dtype), P, M2.to(P.dtype))
        self._theta = (lam - shift).to(P.dtype)
        return dropped


def _loaded(solver: RecycledCG, state: Mapping[str, Any]) -> tuple:
    """:meth:`RecycledCG.load_state_dict`'s checked ``(U, theta, base_rate, trimmed)``."""
    state = {"trimmed": False} | dict(state) if isinstance(state, Mapping) else state
    check_keys(state, solver._KEYS, solver)  # a checkpoint from before "trimmed" loads
    U, th, base, trimmed = (state[k] for k in solver._KEYS)
    if base is not None:
        base = _vocab.as_float(base, "base_rate", min=0.0)
    if (U is None) != (th is None):
        raise ValueError(
            "RecycledCG.load_state_dict: `U` and `theta` are both tensors or both None."
        )
    if U is not None:
        U = check_tensor(U, "U", solver, shape=(None, None), floating=True)
        if U.shape[1] > solver.rank + solver.smallest:
            raise ValueError(
                f"RecycledCG.load_state_dict: `U` has {U.shape[1]} columns, more than "
                f"rank + smallest = {solver.rank + solver.smallest}; the checkpoint is from "
                "another solver."
            )
        th = check_tensor(th, "theta", solver, dtype=U.dtype, shape=(U.shape[1],), floating=True)
        U, th = Basis((U.T.clone(memory_format=torch.contiguous_format),)), th.clone()
    if not isinstance(trimmed, bool):
        got = type(trimmed).__name__
        raise ArgumentTypeError(f"RecycledCG.load_state_dict: `trimmed` must be a bool, got {got}.")
    return U, th, base, trimmed


def _top(space: tuple[Basis, Tensor], smallest: int) -> tuple[Basis, Tensor] | None:
    """The space without its ``smallest`` pairs (None without a top group left).

    A solve :data:`STALE_SLOWDOWN` times slower than the first is a harder bottom of the
    spectrum (a smaller damping, a near-singular Hessian) or stale bottom pairs, whose
    ``theta`` set the largest scalings ``sigma / theta``; the top group still deflates the
    top. On ``benchmarks/reuse.py``'s dense digits replay, dropping the bottom group instead
    of the whole space: 608 products instead of 655, and at each target in 0.7-1.25e-2; on
    ``--size 100k``'s first 10 hyper-steps 126 instead of 136."""
    U, th = space
    if not smallest or th.numel() <= smallest:
        return None
    keep = torch.ones_like(th, dtype=torch.bool)
    keep[torch.argsort(th)[:smallest]] = False
    return U.select(keep), th[keep]


def _orthonormal(G: Tensor, D: Tensor, floor: float) -> tuple[Tensor, Tensor]:
    """``R`` with ``R^T G R = I`` on ``G``'s eigenvalues above ``floor * max(1, largest)``, and
    ``R^T D R`` (the pencil ``(D, G)`` on an orthonormal basis)."""
    s, V = torch.linalg.eigh(0.5 * (G + G.T))
    keep = s > floor * max(1.0, float(s.max()))
    R = V[:, keep] / s[keep].sqrt()
    return R, R.T @ (0.5 * (D + D.T)) @ R


def _healthy(sol: Solution) -> bool:
    """Not a least-squares solve (a singular operator, :mod:`.cg_singular`): whose first
    run's directions gathered the null space (Ritz values ~ 0), so the space is kept as it
    was."""
    return "null_space" not in sol.stats
