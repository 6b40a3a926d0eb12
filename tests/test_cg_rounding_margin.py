"""CG on a singular system: an iterate's residual read within the products' rounding of
the start's does not make it the answer.

Found by hypothesis (``tests/test_solvers_singular.py``, ``n=3, rank=1, seed=1371,
maxiter=5``): a rank-1 ``A`` with ``b`` mostly outside its range; CG's steps along the
null space reached ``||x|| = 7e18``, whose true residual, read once, was exactly
``||b||`` and so accepted; the caller's ``A @ x`` (another rounding of the same product,
``eps ||A|| ||x||`` ~ ``||b||``) gave 1.64 ``||b||``: worse than ``x = 0``, which CG
promises never to return.
"""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg
from test_solvers_singular import singular


@pytest.mark.parametrize("maxiter", [3, 4, 5, 20])
def test_cg_returns_the_start_when_no_iterate_is_provably_better(maxiter):
    A, b, _ = singular(3, 1, 1371)
    sol = hg.CG(maxiter=maxiter, tol=0.0).solve(hg.MatrixOperator(A), b)
    true = float(torch.linalg.vector_norm(b - A @ sol.value))
    assert true <= float(b.norm()) * (1 + 1e-9)
    assert float(sol.value.norm()) < 1e3  # not the 7e18 iterate
    assert sol.residual_norm == pytest.approx(true, rel=1e-12)  # its own residual
