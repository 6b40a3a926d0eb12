"""Property tests: every solver on random indefinite and ill-scaled symmetric systems.

Issue 10, item 6. For symmetric matrices with condition numbers up to 1e12, entries scaled
by 1e-20..1e20 (and right-hand sides independently so), negative and zero eigenvalues,
in float32 and float64, every solver must either

- return a finite result of the right shape and dtype, with a ``Status``; ``converged``
  only if the returned ``x`` meets the tolerance, recomputed here in float64 from the
  matrix and right-hand side as the solver saw them, up to the rounding error of
  evaluating a residual in the working precision (a CG-family least-squares answer,
  ``stats["null_space"]``: ``b - A x`` normal to the range, ``||A (b - A x)||`` within
  the tolerance and the deflated directions' ``10 sqrt(eps) ||A||``, see
  :func:`converged_claim_holds`); CG, NystromPCG, FixedPoint and a
  diverged Neumann never worse than ``x = 0``; or
- raise a library error (``NonFiniteHypergradientError`` when a quantity overflows,
  ``ValueError`` for Neumann's "lambda_max <= 0"),

never an internal torch error and never a silently wrong ``converged``.
"""

from __future__ import annotations

import math
import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hypergradient as hg
from hypergradient._vocab import HypergradientWarning, NonFiniteHypergradientError, Status

DT = torch.float64
SETTINGS = settings(
    max_examples=50,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def systems(draw):
    n = draw(st.integers(1, 8))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    log_cond = draw(st.floats(0.0, 12.0))
    a_scale = 10.0 ** draw(st.integers(-20, 20))
    b_scale = 10.0 ** draw(st.integers(-20, 20))
    signs = draw(st.lists(st.sampled_from([1.0, 1.0, 1.0, -1.0, 0.0]), min_size=n, max_size=n))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    magnitudes = torch.logspace(0.0, -log_cond, n, dtype=DT)[torch.randperm(n, generator=g)]
    evals = a_scale * magnitudes * torch.tensor(signs, dtype=DT)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    A = (Q * evals) @ Q.T
    A = (0.5 * (A + A.T)).to(dtype)
    A = 0.5 * (A + A.T)  # exactly symmetric after rounding
    b = (b_scale * torch.randn(n, generator=g, dtype=DT)).to(dtype)
    if not bool(b.any()):
        b[0] = b_scale
    eps = torch.finfo(dtype).eps
    tol = 10.0 ** draw(st.floats(math.log10(eps) + 3, -1.0))
    return A, b, tol


def solvers(A: torch.Tensor, tol: float) -> dict[str, hg.Solver]:
    n = A.shape[0]
    top = float(torch.linalg.matrix_norm(A.to(DT), ord=2)) or 1.0
    return {
        "Exact": hg.Exact(),
        "CG": hg.CG(maxiter=3 * n + 5, tol=tol),
        "Neumann": hg.Neumann(30, alpha=1.0 / top, tol=tol),
        "Neumann-auto": hg.Neumann(30, alpha="auto", tol=tol, power_iters=8, seed=0),
        "Nystrom": hg.Nystrom(rank=max(1, n // 2), rho=1e-3 * top, seed=0),
        "Nystrom-gaussian": hg.Nystrom(rank=n, rho=1e-3 * top, sketch="gaussian", seed=0),
        "NystromPCG": hg.NystromPCG(rank=max(1, n // 2), maxiter=3 * n + 5, tol=tol, seed=0),
        "FixedPoint": hg.FixedPoint(maxiter=60, tol=tol, omega=1.0 / top),
        "Identity": hg.Identity(),
    }


NEVER_WORSE_THAN_ZERO = {"CG", "NystromPCG", "FixedPoint"}


def check(name: str, solver: hg.Solver, A: torch.Tensor, b: torch.Tensor, tol: float) -> str:
    op = hg.MatrixOperator(A)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", HypergradientWarning)
            sol = solver.solve(op, b)
    except NonFiniteHypergradientError:
        return "error"
    except ValueError as error:  # a documented refusal, e.g. Neumann's lambda_max <= 0
        assert "lambda_max" in str(error), (name, error)
        return "error"
    assert isinstance(sol.status, Status), name
    assert sol.value.shape == b.shape and sol.value.dtype == b.dtype, name
    assert bool(torch.isfinite(sol.value).all()), (name, sol.status)
    assert sol.num_hvps == op.num_matvecs, name
    A64, b64, x64 = A.to(DT), b.to(DT), sol.value.to(DT)
    n = b.numel()
    eps = torch.finfo(b.dtype).eps
    bnorm = float(b64.norm())
    true = float((b64 - A64 @ x64).norm())
    anorm = float(torch.linalg.matrix_norm(A64, ord=2))
    # the rounding error of a residual evaluated in the working precision
    slack = 16 * math.sqrt(n) * eps * (bnorm + anorm * float(x64.norm()))
    if sol.status == Status.CONVERGED:
        assert sol.converged is True
        assert converged_claim_holds(sol, A, b, tol), (name, true / bnorm, tol)
    elif sol.status == Status.EXACT:  # a dense solve: its reported residual is the truth
        assert abs(sol.residual_norm - true) <= slack + 1e-9 * true, (name, true)
    else:
        assert sol.converged in (False, None), name
    if name in NEVER_WORSE_THAN_ZERO or sol.status == Status.DIVERGED:
        assert true <= bnorm * (1 + 1e-6) + slack, (name, sol.status, true / bnorm)
    return str(sol.status)


def converged_claim_holds(sol: hg.Solution, A: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """``||b - A x|| <= tol ||b||`` up to the rounding of a residual in the working
    precision; for a least-squares answer of a CG-family solve that deflated ``k`` null
    directions (``stats["null_space"]``) the normal equations instead: ``||A (b - A x)|| <=
    ||A|| (tol ||b|| + 20 sqrt(k eps) ||b||)`` (the deflated directions ``w`` have ``||A w||
    <= 10 sqrt(eps) ||A||``), with the same rounding."""
    eps = torch.finfo(b.dtype).eps
    A64, b64, x64 = A.to(DT), b.to(DT), sol.value.to(DT)
    bnorm, anorm = float(b64.norm()), float(torch.linalg.matrix_norm(A64, ord=2))
    slack = 16 * math.sqrt(b.numel()) * eps * (bnorm + anorm * float(x64.norm()))
    r = b64 - A64 @ x64
    k = sol.stats.get("null_space")
    if not k:
        return float(r.norm()) <= tol * bnorm * (1 + 1e-6) + slack
    normal = float((A64 @ r).norm())
    return normal <= anorm * (tol * bnorm * (1 + 1e-6) + 20 * math.sqrt(k * eps) * bnorm + slack)


@SETTINGS
@given(systems())
def test_every_solver_is_finite_and_flagged_or_raises_a_library_error(problem):
    A, b, tol = problem
    for name, solver in solvers(A, tol).items():
        check(name, solver, A, b, tol)


@SETTINGS
@given(systems(), st.floats(0.0, 1.0))
def test_warm_starts_do_not_break_the_contract(problem, weight):
    # a warm start somewhere between 0 and a (possibly overflowing) exact solution
    A, b, tol = problem
    exact = torch.linalg.lstsq(A.to(DT), b.to(DT).unsqueeze(1)).solution.squeeze(1)
    x0 = (weight * exact).to(b.dtype)
    if not bool(torch.isfinite(x0).all()):
        x0 = torch.zeros_like(b)
    for name in ("CG", "NystromPCG", "FixedPoint", "Neumann"):
        solver = solvers(A, tol)[name]
        op = hg.MatrixOperator(A)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", HypergradientWarning)
                sol = solver.solve(op, b, x0=x0)
        except NonFiniteHypergradientError:
            continue
        assert bool(torch.isfinite(sol.value).all()), name
        if sol.status == Status.CONVERGED:
            assert converged_claim_holds(sol, A, b, tol), name


def test_the_generator_covers_what_it_claims():
    # guards the strategy: indefinite, singular, ill-conditioned and both dtypes occur
    seen = {"indefinite": False, "singular": False, "float32": False, "cond>1e10": False}

    # 300 draws (cheap: 8 x 8 eigenvalues): a regime with a 1-in-6 chance per draw is then
    # missed with probability ~1e-24, whatever sequence hypothesis derives for this run
    @settings(max_examples=300, deadline=None, database=None, derandomize=True)
    @given(systems())
    def probe(problem):
        A, _, _ = problem
        ev = torch.linalg.eigvalsh(A.to(DT))
        top = float(ev.abs().max())
        seen["indefinite"] |= bool((ev < -1e-3 * top).any() and (ev > 1e-3 * top).any())
        seen["singular"] |= bool((ev.abs() <= 1e-14 * top).any())
        seen["float32"] |= A.dtype == torch.float32
        small = ev.abs()[ev.abs() > 1e-14 * top]
        seen["cond>1e10"] |= bool(small.numel() and top / float(small.min()) > 1e10)

    probe()
    assert all(seen.values()), seen
