"""Adversarial review of ``hg.meta`` (round 8): where a solver's warnings point.

Each test failed on the code before the review:

- ``IMAML``'s linear solve runs ``hg.implicit``, whose solver warnings (CG stopped at
  ``maxiter``, CG met negative curvature, Nystrom's indefinite sketch) carry a fixed
  ``stacklevel`` for a user calling ``hg.implicit`` directly: through ``hg.meta`` they
  pointed into ``hypergradient/meta/imaml.py`` (or ``solvers/damping.py``), so the
  default filter showed one per process for all of a user's meta-training loops, and a
  ``filterwarnings`` on the user's module missed them. iMAML's own warnings already
  pointed at the user's line.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg
from hypergradient import meta

DT = torch.float64


def logistic(p, batch):
    x, y = batch
    return torch.nn.functional.softplus(-y * (x @ p)).sum()


def tasks():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g, dtype=DT)
    y = torch.sign(torch.randn(6, generator=g, dtype=DT))
    return [((x, y), (x + 0.1, y))]


def solver_warnings(caught, text):
    hgw = hg.HypergradientWarning
    return [w for w in caught if issubclass(w.category, hgw) and text in str(w.message)]


@pytest.mark.parametrize("vectorize", [False, True])
def test_a_solver_stopped_at_maxiter_warns_at_the_callers_line(vectorize):
    theta = torch.zeros(4, dtype=DT)
    learner = meta.IMAML(
        logistic, lam=1.0, inner_steps=300, inner_lr=0.1, solver=hg.CG(maxiter=1),
        vectorize=vectorize,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grad, info = learner.step(theta, tasks())
    (w,) = solver_warnings(caught, "stopped at maxiter=1")
    assert w.filename == __file__, w.filename
    assert info.converged is False and info.status == hg.Status.MAX_ITERATIONS
    # the numbers are those of the one CG step: x = (b.b / b.A b) b, times lam
    (support, query), lam = tasks()[0], 1.0
    phi = meta.adapt(logistic, theta, support, steps=300, lr=0.1, lam=lam)
    b = torch.func.grad(lambda p: logistic(p, query))(phi)
    A = torch.func.hessian(lambda p: logistic(p, support))(phi) + lam * torch.eye(4, dtype=DT)
    ref = lam * float(b @ b) / float(b @ A @ b) * b
    assert torch.allclose(grad, ref, rtol=1e-10, atol=1e-14)


def test_negative_curvature_and_an_indefinite_sketch_warn_at_the_callers_line():
    theta = torch.zeros(4, dtype=DT)

    def concave(p, batch):
        return -logistic(p, batch)

    for solver, text in [(hg.CG(), "non-positive curvature"), (hg.Nystrom(rank=4), "Nystrom")]:
        learner = meta.IMAML(concave, lam=0.1, inner_steps=3, inner_lr=0.01, solver=solver)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            learner.step(theta, tasks())
        found = solver_warnings(caught, text)
        assert found and all(w.filename == __file__ for w in found), [
            (w.filename, str(w.message)[:60]) for w in found
        ]


def test_an_error_filter_still_raises_the_solvers_warning():  # (a guard of the relay)
    theta = torch.zeros(4, dtype=DT)
    solver = hg.RecycledCG(maxiter=1)
    learner = meta.IMAML(logistic, lam=1.0, inner_steps=300, inner_lr=0.1, solver=solver)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        learner.step(theta, tasks())  # keeps a recycled space
    saved = solver.snapshot()
    assert saved[0] is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)
        with pytest.raises(hg.HypergradientWarning, match="stopped at maxiter=1"):
            learner.step(theta + 0.5, tasks())
    assert all(a is b for a, b in zip(solver.snapshot(), saved))  # put back


def test_other_warnings_of_the_solve_keep_their_place_and_module_filters():  # (a guard)
    def noisy(p, batch):
        warnings.warn("from the loss", UserWarning, stacklevel=1)
        return logistic(p, batch)

    learner = meta.IMAML(noisy, lam=1.0, inner_steps=5, inner_lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learner.step(torch.zeros(4, dtype=DT), tasks())
    lines = {(w.filename, w.lineno) for w in caught if "from the loss" in str(w.message)}
    assert len(lines) == 1 and next(iter(lines))[0] == __file__
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", "from the loss", UserWarning, module=__name__)
        learner.step(torch.zeros(4, dtype=DT), tasks())
    assert not [w for w in caught if "from the loss" in str(w.message)]
