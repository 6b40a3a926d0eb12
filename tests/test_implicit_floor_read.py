"""``ImplicitInfo.inner_grad_floor`` is read when it is needed (issue 11, goal 3).

The stationarity check's rounding floor needs a host read of the operator's scale samples,
the parameters' norms and the loss. ``hg.implicit`` keeps them unread
(:class:`~hypergradient.methods.implicit_info.PendingFloor`) and the check reads the floor
only when its cheaper tests are inconclusive; any other reader of the field gets the same
float as before. The decisions are those of the eager check on every input.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import pickle
import warnings

import pytest
import torch

import hypergradient as hg
from hypergradient.methods import implicit_info
from hypergradient.methods.implicit_info import ImplicitInfo, PendingFloor, gradient_floor

DT = torch.float64
warn_not_stationary = __import__(
    "hypergradient.methods.implicit", fromlist=["warn_not_stationary"]
).warn_not_stationary


def _ridge(shift=0.0, dtype=DT):
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(40, 6, generator=gen, dtype=DT)
    y = torch.randn(40, generator=gen, dtype=DT)
    h = torch.full((6,), 0.3, dtype=DT)
    w = torch.linalg.solve(X.T @ X / 40 + torch.diag(h), X.T @ y / 40) + shift
    Xd, yd = X.to(dtype), y.to(dtype)

    def f(p, hp):
        return ((Xd @ p - yd) ** 2).mean() / 2 + 0.5 * (hp * p * p).sum()

    def g(p, hp):
        return ((p - 1) ** 2).sum()

    return f, g, w.to(dtype), h.to(dtype)


def _count_reads(monkeypatch):
    reads = []
    real = PendingFloor.read
    monkeypatch.setattr(PendingFloor, "read", lambda self: reads.append(1) or real(self))
    return reads


def test_the_floor_is_read_only_when_the_check_needs_it(monkeypatch):
    reads = _count_reads(monkeypatch)
    f, g, w, h = _ridge()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hg.implicit(f, g, w, h, hg.CG(maxiter=10))  # stationary: ratio test conclusive
    assert reads == []
    with pytest.warns(hg.HypergradientWarning, match="stationarity="):
        hg.implicit(f, g, w + 0.1, h, hg.CG(maxiter=10))  # far: the floor is read
    assert reads == [1]


@pytest.mark.parametrize("dtype", [torch.float32, DT])
def test_the_field_is_the_eager_floor_taken_at_the_call(dtype):
    f, g, w, h = _ridge(dtype=dtype)
    params = w.clone()
    _, eager = hg.implicit(f, g, params, h, hg.CG(maxiter=10), return_info=True)
    want = eager.inner_grad_floor  # read at once: what the eager check computed
    _, info = hg.implicit(f, g, params, h, hg.CG(maxiter=10), return_info=True)
    assert isinstance(info.__dict__["_inner_grad_floor"], PendingFloor)
    params.mul_(1e6)  # an in-place change after the call does not move the floor
    floor = info.inner_grad_floor
    assert isinstance(floor, float) and floor == want > 0.0
    assert info.__dict__["_inner_grad_floor"] == floor  # read once, kept
    eps = torch.finfo(dtype).eps  # 8 eps (||H|| ||theta|| + ...): well above eps ||theta||
    assert floor > implicit_info.GRAD_ROUNDING * eps * 0.1 * float(w.double().norm())
    op = hg.HessianOperator(f, w, h)
    assert gradient_floor(op) == PendingFloor(op).read() == 0.0  # no product yet: ||H|| = 0


def test_copies_pickles_and_records_read_it():
    f, g, w, h = _ridge(shift=0.01)
    infos = [hg.implicit(f, g, w, h, hg.CG(maxiter=10), return_info=True)[1] for _ in range(5)]
    want = infos[0].inner_grad_floor
    assert want > 0.0
    assert pickle.loads(pickle.dumps(infos[1])).inner_grad_floor == want
    assert copy.deepcopy(infos[2]).inner_grad_floor == want
    assert infos[3].as_dict()["inner_grad_floor"] == want
    assert dataclasses.replace(infos[4], solver="x").inner_grad_floor == want
    assert ImplicitInfo().inner_grad_floor == 0.0
    assert ImplicitInfo(inner_grad_floor=2.5).inner_grad_floor == 2.5


def _old_decision(inner, outer, loss, floor, ratio):
    """The eager check's decision (the floor read first)."""
    loss = loss if math.isfinite(loss) else 0.0
    limit = max(1.5e-8 * (1.0 + abs(loss)), floor or 0.0)
    return math.isfinite(inner) and inner > ratio * outer and inner > limit


def test_the_decisions_are_the_eager_checks_on_every_input():
    values = [0.0, 1e-9, 3e-8, 1e-3, 0.04, 1.0, 50.0, math.inf, math.nan]
    for inner, outer, loss, floor in itertools.product(values, values, values[:6], values[:6]):
        info = ImplicitInfo(
            inner_grad_norm=inner, outer_grad_norm=outer, inner_loss=loss, inner_grad_floor=floor
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warn_not_stationary(info, 0.05, "g")
        assert bool(caught) == _old_decision(inner, outer, loss, floor, 0.05)
