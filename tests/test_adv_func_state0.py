"""``Trajectory.state0`` of another dtype, integer or non-finite (adversarial review).

A float64 momentum buffer for a float32 model made the replay fail deep in torch
("addmv input tensors must have the same dtype"), an integer one with "only Tensors of
floating point dtype can require gradients", and a NaN one surfaced as "inner_loss at step 1
is not finite: check batch 1". Now the buffers are converted to the parameters' dtype (as
torch keeps them), and the other two are refused naming ``state0[i]``. The hypergradient
from a resumed momentum run equals that of plain autograd through the same steps.
"""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg
from hypergradient._vocab import ArgumentTypeError, NonFiniteHypergradientError

g = torch.Generator().manual_seed(0)
X, Y = torch.randn(10, 3, generator=g), torch.randn(10, generator=g)
P0, BUF = torch.randn(3, generator=g), torch.randn(3, generator=g)


def inner(p, h, b):
    return ((X @ p - Y) ** 2).mean() + h * (p**2).sum()


def outer(p, h):
    return ((X @ p - Y + 1) ** 2).mean()


def _problem(state0):
    traj = hg.methods.Trajectory(
        inner, P0, hg.optim.sgd(0.1, momentum=0.9), [None] * 3, state0=state0, step0=5
    )
    h = torch.tensor(0.1)
    return hg.Problem(lambda p, hh: inner(p, hh, None), outer, None, h, trajectory=traj)


def _reference() -> float:
    """Plain autograd through the three resumed momentum steps (float64 throughout)."""
    h = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    p, buf = P0.double(), BUF.double()
    X64, Y64 = X.double(), Y.double()
    for _ in range(3):
        leaf = p if p.requires_grad else p.requires_grad_(True)
        grad = torch.autograd.grad(
            ((X64 @ leaf - Y64) ** 2).mean() + h * (leaf**2).sum(), leaf, create_graph=True
        )[0]
        buf = 0.9 * buf + grad
        p = leaf - 0.1 * buf
    return float(torch.autograd.grad(((X64 @ p - Y64 + 1) ** 2).mean(), h)[0])


def test_a_float64_buffer_for_a_float32_model_is_converted():
    out32, info = hg.Unrolled()(_problem([BUF]))
    out64, _ = hg.Unrolled()(_problem([BUF.double()]))
    assert out64.dtype == torch.float32 and info.params.dtype == torch.float32
    assert torch.equal(out32, out64)
    assert float(out32) == pytest.approx(_reference(), rel=1e-4)


def test_integer_and_non_finite_buffers_are_refused_naming_them():
    with pytest.raises(ArgumentTypeError, match=r"state0\[0\] has dtype torch.int64"):
        hg.Unrolled()(_problem([torch.ones(3, dtype=torch.int64)]))
    with pytest.raises(NonFiniteHypergradientError, match=r"state0\[0\]"):
        hg.Unrolled()(_problem([torch.tensor([0.0, float("nan"), 0.0])]))
