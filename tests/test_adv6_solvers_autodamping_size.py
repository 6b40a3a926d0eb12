"""An :class:`AutoDamping` reused on an operator of another size (another model) estimates
again instead of applying the cached damping of the first model.

An ``AutoDamping()`` (``refresh_every=10``) used first on a model with spectrum [1, 1000]
caches the damping ``1e-3 * 1000 = 1``; reused on a model with spectrum [0.01, 1] it applied
that damping, 100 times the new spectrum's scale: the solve "converged" to a solution 98.6 %
off the undamped one, without any warning. Reference: the dense float64 solve of
``(A + d I) x = b`` with ``d`` the damping a fresh estimate picks for that model.
"""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg
from hypergradient.solvers import AutoDamping, auto_damping, damped_solve

F64 = torch.float64


def _models():
    A1 = torch.diag(torch.linspace(1.0, 1000.0, 30, dtype=F64))
    A2 = torch.diag(torch.linspace(0.01, 1.0, 20, dtype=F64))
    return A1, A2


def test_a_model_of_another_size_gets_its_own_damping():
    A1, A2 = _models()
    auto = AutoDamping(seed=0)
    damped_solve(hg.CG(), hg.MatrixOperator(A1), torch.ones(30, dtype=F64), None, auto)
    b = torch.ones(20, dtype=F64)
    sol, _, stats = damped_solve(hg.CG(), hg.MatrixOperator(A2), b, None, auto)
    assert stats["damping_estimated"] is True  # was False (the first model's 1.0)
    d = stats["damping"]
    fresh = auto_damping(hg.MatrixOperator(A2), rel=1e-3, seed=0)
    assert d == pytest.approx(fresh.damping, rel=1e-6)
    assert d == pytest.approx(1e-3, rel=1e-6)  # rel * lambda_max of the new model
    want = torch.linalg.solve(A2 + d * torch.eye(20, dtype=F64), b)
    assert torch.allclose(sol.value, want, rtol=1e-6)
    undamped = torch.linalg.solve(A2, b)
    assert float((sol.value - undamped).norm() / undamped.norm()) < 0.1  # was 0.986


def test_the_same_model_keeps_its_cached_damping():
    A1, _ = _models()
    auto = AutoDamping(seed=0)
    op = hg.MatrixOperator(A1)
    b = torch.ones(30, dtype=F64)
    first = damped_solve(hg.CG(), op, b, None, auto)[2]
    second = damped_solve(hg.CG(), op, b, None, auto)[2]
    assert first["damping_estimated"] is True and second["damping_estimated"] is False
    assert second["damping"] == first["damping"]


def test_the_size_is_checkpointed_and_old_checkpoints_load():
    A1, A2 = _models()
    auto = AutoDamping(seed=0)
    damped_solve(hg.CG(), hg.MatrixOperator(A1), torch.ones(30, dtype=F64), None, auto)
    state = auto.state_dict()
    assert state["size"] == 30
    resumed = AutoDamping(seed=0)
    resumed.load_state_dict(state)
    stats = damped_solve(hg.CG(), hg.MatrixOperator(A2), torch.ones(20, dtype=F64), None, resumed)[
        2
    ]
    assert stats["damping_estimated"] is True
    old = {k: v for k, v in state.items() if k != "size"}
    AutoDamping(seed=0).load_state_dict(old)  # before the key existed: size unknown
    fresh = AutoDamping(seed=0)
    with pytest.raises(ValueError, match="size"):
        fresh.load_state_dict({**state, "size": -1})
    assert fresh.estimate is None
