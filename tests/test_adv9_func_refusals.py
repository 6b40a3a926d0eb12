"""Misuse of the functional API is named before anything is spent (adversarial round 9).

Before: a solver called directly with a right-hand side ``b`` of another dtype than its
operator's (``hg.CG().solve(hg.MatrixOperator(A64), b32)``) failed inside torch with
"addmv input tensors must have the same dtype" (CG, NystromPCG, RecycledCG, Neumann,
Nystrom, FixedPoint), naming nothing; a ``fixed_point_map`` returning a tuple for dict
``params`` was refused with "got shapes [(2,), (3, 1)], expected [(2,), (3, 1)]"; and
``hg.unrolled`` / ``hg.forward_mode`` / ``hg.drmad`` took their batches from an iterator
before refusing a bad ``truncate``, ``hvp``, ``checkpoint_every``, ``chunk_size``,
``anchors``, ``return_info`` (the last after the whole computation), ``params0`` or
``hparams``, so a retry silently trained on later batches.
"""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg
from hypergradient._vocab import ArgumentTypeError

DT = torch.float64
N = 6

SOLVERS = {
    "exact": lambda: hg.Exact(),
    "cg": lambda: hg.CG(),
    "nystrom_pcg": lambda: hg.NystromPCG(rank=2),
    "recycled_cg": lambda: hg.RecycledCG(),
    "neumann": lambda: hg.Neumann(20, "auto"),
    "nystrom": lambda: hg.Nystrom(rank=3, rho=0.1),
    "fixed_point": lambda: hg.FixedPoint(),
    "identity": lambda: hg.Identity(),
}


def _system():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(N, N, generator=g, dtype=DT)
    return m @ m.T + torch.eye(N, dtype=DT), torch.randn(N, generator=g, dtype=DT)


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("op_dtype,b_dtype", [(DT, torch.float32), (torch.float32, DT)])
def test_a_right_hand_side_of_another_dtype_is_named_before_any_product(name, op_dtype, b_dtype):
    a, b = _system()
    op = hg.MatrixOperator(a.to(op_dtype))
    with pytest.raises(ArgumentTypeError, match=r"`b` has dtype .* b\.to\(op\.dtype\)"):
        SOLVERS[name]().solve(op, b.to(b_dtype))
    assert op.num_matvecs == 0


@pytest.mark.parametrize("name", ["exact", "cg", "nystrom_pcg", "recycled_cg", "neumann"])
def test_a_right_hand_side_of_the_operators_dtype_still_solves(name):
    a, b = _system()
    solver = SOLVERS[name]() if name != "neumann" else hg.Neumann(3000, "auto")
    x = solver.solve(hg.MatrixOperator(a), b).value
    assert x.dtype == DT
    assert torch.allclose(x, torch.linalg.solve(a, b), rtol=1e-5, atol=1e-8)


def test_a_fixed_point_map_of_another_structure_is_named():
    theta = {"a": torch.zeros(2, dtype=DT), "b": torch.zeros(3, 1, dtype=DT)}
    phi = torch.tensor(0.5, dtype=DT)

    def step(t, p):
        return {k: 0.5 * v + p for k, v in t.items()}

    def outer(t, p):
        return sum(v.sum() for v in t.values())

    with pytest.raises(
        ValueError, match=r"got a tuple of 2, expected a dict with keys \['a', 'b'\]"
    ):
        hg.implicit_fixed_point(lambda t, p: tuple(step(t, p).values()), outer, theta, phi)
    with pytest.raises(ValueError, match=r"got a tensor, expected a dict"):
        hg.implicit_fixed_point(
            lambda t, p: torch.cat([step(t, p)["a"], step(t, p)["b"][:, 0]]), outer, theta, phi
        )
    # the right structure: T(t) = t / 2 + p, t* = 2 p, d/dp sum(t*) = 2 per element (5)
    assert float(hg.implicit_fixed_point(step, outer, theta, phi, hg.Exact())) == pytest.approx(
        10.0
    )


def _f(t, h, batch):
    return ((t - batch) ** 2).sum() * h.exp()


def _g(t, h):
    return t.sum()


T0 = torch.zeros(3, dtype=DT)
H0 = torch.tensor(0.1, dtype=DT)
BAD_SETTINGS = {
    "unrolled_truncate": lambda it: hg.unrolled(
        _f, _g, T0, H0, 3, hg.optim.sgd(0.1), batches=it, truncate=5
    ),
    "unrolled_hvp": lambda it: hg.unrolled(
        _f, _g, T0, H0, 3, hg.optim.sgd(0.1), batches=it, hvp="dbl"
    ),
    "unrolled_checkpoint": lambda it: hg.unrolled(
        _f, _g, T0, H0, 3, hg.optim.sgd(0.1), batches=it, checkpoint_every=0
    ),
    "unrolled_return_info": lambda it: hg.unrolled(
        _f, _g, T0, H0, 3, hg.optim.sgd(0.1), batches=it, return_info="yes"
    ),
    "forward_chunk": lambda it: hg.forward_mode(
        _f, _g, T0, H0, 3, hg.optim.sgd(0.1), batches=it, chunk_size=0
    ),
    "forward_return_info": lambda it: hg.forward_mode(
        _f, _g, T0, H0, 3, hg.optim.sgd(0.1), batches=it, return_info=1
    ),
    "drmad_anchors": lambda it: hg.drmad(
        _f, _g, T0, H0, 3, hg.optim.sgd(0.1), batches=it, anchors=-1
    ),
    "drmad_return_info": lambda it: hg.drmad(
        _f, _g, T0, H0, 3, hg.optim.sgd(0.1), batches=it, return_info=None
    ),
    "unrolled_params0_float": lambda it: hg.unrolled(
        _f, _g, 0.0, H0, 3, hg.optim.sgd(0.1), batches=it
    ),
    "forward_hparams_none": lambda it: hg.forward_mode(
        _f, _g, T0, None, 3, hg.optim.sgd(0.1), batches=it
    ),
    "drmad_hparams_int": lambda it: hg.drmad(
        _f, _g, T0, torch.tensor(1), 3, hg.optim.sgd(0.1), batches=it
    ),
}


@pytest.mark.parametrize("name", list(BAD_SETTINGS))
def test_a_bad_setting_is_refused_before_a_batch_is_taken(name):
    taken = []

    def batches():
        for i in range(6):
            taken.append(i)
            yield torch.full((3,), float(i), dtype=DT)

    with pytest.raises(ValueError):
        BAD_SETTINGS[name](batches())
    assert taken == []


def test_good_settings_take_exactly_steps_batches_and_match_the_loop():
    it = iter([torch.full((3,), float(i), dtype=DT) for i in range(6)])
    out = hg.unrolled(_f, _g, T0, H0, 3, hg.optim.sgd(0.1), batches=it, truncate=3)
    assert len(list(it)) == 3
    # t <- t - 0.2 e^h (t - b_k): linear, so d sum(t_3) / dh by autograd through the loop
    h = H0.clone().requires_grad_(True)
    t = T0.clone()
    for k in range(3):
        t = t - 0.1 * 2 * h.exp() * (t - k)
    (want,) = torch.autograd.grad(t.sum(), h)
    assert float(out) == pytest.approx(float(want), rel=1e-12)
