"""CG's negative-curvature warning says when the answer it keeps is ``x = 0``.

On an indefinite Hessian CG stops at the first direction with ``p^T H p <= 0`` and returns
its best iterate by residual. When no iterate improved on the start, that is ``x = 0`` and
the hypergradient is the direct term alone (0 for a validation loss that does not read the
hyperparameters), yet the warning said "The partial solution is used". In the round-15 nets
probe a tied-embedding network trained by Adam got exactly-zero hypergradients from
``Implicit(CG)``, ``IFT(CG)``, ``IFT(NystromPCG)`` and ``HOAG`` on a CNN with BatchNorm,
each with that message. The warning now says that ``x = 0`` is used; a nonzero partial
solution keeps the old wording. References: closed forms of CG's first step.
"""

from __future__ import annotations

import warnings

import torch

import hypergradient as hg

DT = torch.float64


def _solve(A, b):
    def f(w, h):
        return 0.5 * w @ A @ w - h @ w  # d/dh grad_w f = -I: the hypergradient is x = H^-1 b

    def g(w, h):
        return b @ w

    w, h = torch.zeros(3, dtype=DT), torch.zeros(3, dtype=DT)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out, info = hg.implicit(f, g, w, h, solver=hg.CG(maxiter=10), return_info=True)
    texts = [str(r.message) for r in rec if issubclass(r.category, hg.HypergradientWarning)]
    return out, info, texts


def test_a_kept_start_is_named_as_zero():
    A = torch.tensor(
        [
            [5.212845791728895, 5.36549282527333, 0.43574075204447643],
            [5.36549282527333, 3.985681868205904, -0.4131914587183728],
            [0.43574075204447643, -0.4131914587183728, 0.8014723400651967],
        ],
        dtype=DT,
    )
    b = torch.tensor([-0.2665963045720212, 0.18942346075724142, -0.21902281098819965], dtype=DT)
    assert float(torch.linalg.eigvalsh(A).min()) < 0
    out, info, texts = _solve(A, b)
    assert info.status == hg.Status.NEGATIVE_CURVATURE
    assert torch.equal(out, torch.zeros(3, dtype=DT))  # CG's best iterate is the start
    assert info.relative_residual == 1.0
    exact = torch.linalg.solve(A, b)
    assert float(exact.norm()) > 0.1  # the implicit part that x = 0 drops
    assert len(texts) == 1
    assert "No iterate improved on x = 0" in texts[0]
    assert "partial solution" not in texts[0]


def test_a_nonzero_partial_solution_keeps_its_wording():
    A = torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 3.0]], dtype=DT)  # -1, 3, 3
    b = torch.tensor([1.0, 0.0, 1.0], dtype=DT)
    out, info, texts = _solve(A, b)
    # first CG step: alpha = b.b / b.Ab = 2 / 4, x1 = b / 2; then p^T A p < 0
    assert torch.allclose(out, torch.tensor([0.5, 0.0, 0.5], dtype=DT), rtol=0, atol=1e-15)
    assert info.status == hg.Status.NEGATIVE_CURVATURE
    assert len(texts) == 1 and "The partial solution is used" in texts[0]
