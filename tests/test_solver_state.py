"""Solver checkpoints: state_dict / load_state_dict resume bit for bit and load atomically.

Defect 3 of issue 9: resume was not bit-for-bit with ``Nystrom(seed=...)`` or
``NystromPCG(seed=..., refresh_every>1)`` because the generator state and the cached
sketch were not in the checkpoint. Defect 4: loading must validate everything first and
then assign, so a failing load changes nothing.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import hypergradient as hg

DT = torch.float64
N = 12


def system():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=DT))
    A = (Q * torch.logspace(0, 2, N, dtype=DT)) @ Q.T
    A = 0.5 * (A + A.T)
    bs = [torch.randn(N, generator=g, dtype=DT) for _ in range(7)]
    return A, bs


def roundtrip(state):
    """Through torch.save / torch.load(weights_only=True), the secure default."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def run(solver, A, bs):
    out = []
    for b in bs:
        sol = solver.solve(hg.MatrixOperator(A), b)
        out.append((sol.value, sol.num_hvps, sol.stats.get("sketch_hvps")))
    return out


FACTORIES = {
    "Nystrom": lambda seed: hg.Nystrom(rank=4, rho=0.1, seed=seed),
    "Nystrom-gaussian": lambda seed: hg.Nystrom(rank=4, rho=0.1, sketch="gaussian", seed=seed),
    "NystromPCG": lambda seed: hg.NystromPCG(rank=3, tol=1e-4, seed=seed, refresh_every=3),
    "Neumann-auto": lambda seed: hg.Neumann(maxiter=5, alpha="auto", power_iters=3, seed=seed),
}


@pytest.mark.parametrize("cut", [1, 2, 4])
@pytest.mark.parametrize("name", FACTORIES)
def test_checkpoint_mid_sequence_resumes_bit_for_bit(name, cut):
    A, bs = system()
    reference = run(FACTORIES[name](3), A, bs)
    first = FACTORIES[name](3)
    head = run(first, A, bs[:cut])
    state = roundtrip(first.state_dict())
    resumed = FACTORIES[name](1234)  # another seed: the checkpoint decides the continuation
    resumed.load_state_dict(state)
    tail = run(resumed, A, bs[cut:])
    for (x, n, s), (y, m, t) in zip(reference, head + tail):
        assert torch.equal(x, y) and n == m and s == t
    # Without the checkpoint the continuation differs (the test can fail).
    other = run(FACTORIES[name](1234), A, bs[cut:])
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(reference[cut:], other))


def test_nystrom_pcg_checkpoint_carries_the_sketch_and_the_call_counter():
    A, bs = system()
    solver = hg.NystromPCG(rank=3, seed=3, refresh_every=3)
    assert [s for _, _, s in run(solver, A, bs[:2])] == [3, 0]
    state = solver.state_dict()
    assert state["calls"] == 2 and state["U"].shape == (N, 3)
    assert state["eigenvalues"].shape == (3,) and state["full_rank"] is False
    assert state["generator"].dtype == torch.uint8
    fresh = hg.NystromPCG(rank=3, seed=3, refresh_every=3)
    fresh.load_state_dict(state)
    # the third call still uses the stored sketch, the fourth draws a new one
    assert [s for _, _, s in run(fresh, A, bs[2:4])] == [0, 3]
    # state_dict returns copies: solving does not change a saved checkpoint
    assert state["calls"] == 2


def test_nystrom_pcg_checkpoint_keeps_the_sketch_indefinite_flag():
    # A saddle: the sketch keeps the positive part and says so in every solve that uses it.
    # The flag was not checkpointed: a resumed copy's next solve reported no indefiniteness.
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=DT))
    A = (Q * torch.linspace(-1.0, 5.0, N, dtype=DT)) @ Q.T
    A, b = 0.5 * (A + A.T), torch.randn(N, generator=g, dtype=DT)
    solver = hg.NystromPCG(rank=N, seed=0, refresh_every=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert solver.solve(hg.MatrixOperator(A), b).stats.get("indefinite") is True
        state = roundtrip(solver.state_dict())
        assert state["indefinite"] is True
        resumed = hg.NystromPCG(rank=N, seed=1, refresh_every=100)
        resumed.load_state_dict(state)
        again = solver.solve(hg.MatrixOperator(A), b)
        got = resumed.solve(hg.MatrixOperator(A), b)
    assert again.stats.get("indefinite") is True and got.stats.get("indefinite") is True
    assert torch.equal(again.value, got.value)
    # a checkpoint written before the flag was kept loads, as positive definite
    old = {k: v for k, v in state.items() if k != "indefinite"}
    resumed.load_state_dict(old)
    assert resumed.state_dict()["indefinite"] is False


def test_unseeded_solvers_checkpoint_their_generator_too():
    A, bs = system()
    torch.manual_seed(0)
    a = hg.Nystrom(rank=4)
    state = a.state_dict()
    expected = run(a, A, bs[:2])
    torch.manual_seed(1)
    b = hg.Nystrom(rank=4)
    b.load_state_dict(state)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(expected, run(b, A, bs[:2])))


def test_global_generator_is_not_checkpointed():
    solver = hg.Nystrom(rank=2, generator=torch.default_generator)
    assert solver.state_dict() == {"generator": None}
    solver.load_state_dict({"generator": None})
    with pytest.raises(ValueError, match="generator"):
        solver.load_state_dict(hg.Nystrom(rank=2, seed=0).state_dict())
    with pytest.raises(ValueError, match="generator"):
        hg.Nystrom(rank=2, seed=0).load_state_dict({"generator": None})


def test_stateless_solvers_have_an_empty_state():
    for solver in (hg.CG(), hg.Exact(), hg.Identity(), hg.FixedPoint(), hg.Neumann(3, 0.1)):
        state = solver.state_dict()
        assert state in ({}, {"generator": None}), solver
        solver.load_state_dict(state)
    with pytest.raises(ValueError, match="unexpected keys \\['generator'\\]"):
        hg.CG().load_state_dict({"generator": None})
    with pytest.raises((TypeError, ValueError), match="dict"):
        hg.CG().load_state_dict([("generator", None)])


def _pcg_state():
    A, bs = system()
    solver = hg.NystromPCG(rank=3, seed=3, refresh_every=3)
    run(solver, A, bs[:1])
    return solver.state_dict()


def _corrupt(key, value):
    def edit(state):
        state = dict(state)
        if value is KeyError:
            del state[key]
        else:
            state[key] = value(state) if callable(value) else value
        return state

    return edit


BAD = {
    "missing-calls": (_corrupt("calls", KeyError), "calls"),
    "extra-key": (lambda s: {**s, "sketch": 1}, "sketch"),
    "generator-dtype": (_corrupt("generator", lambda s: s["generator"].float()), "generator"),
    "generator-shape": (_corrupt("generator", lambda s: s["generator"][:10]), "generator"),
    "generator-type": (_corrupt("generator", [1, 2]), "generator"),
    "calls-negative": (_corrupt("calls", -1), "calls"),
    "calls-float": (_corrupt("calls", 1.5), "calls"),
    "U-1d": (_corrupt("U", lambda s: s["U"][:, 0]), "`U`"),
    "U-int": (_corrupt("U", lambda s: s["U"].long()), "`U`"),
    "U-too-wide": (_corrupt("U", lambda s: torch.zeros(N, 5, dtype=DT)), "`U`"),
    "U-nan": (_corrupt("U", lambda s: torch.full_like(s["U"], float("nan"))), "`U`"),
    "eigenvalues-length": (
        _corrupt("eigenvalues", lambda s: s["eigenvalues"][:2]),
        "eigenvalues",
    ),
    "eigenvalues-dtype": (
        _corrupt("eigenvalues", lambda s: s["eigenvalues"].float()),
        "eigenvalues",
    ),
    "full_rank-int": (_corrupt("full_rank", 1), "full_rank"),
    "indefinite-int": (_corrupt("indefinite", 1), "indefinite"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoints_raise_naming_the_key_and_change_nothing(case):
    edit, key = BAD[case]
    A, bs = system()
    solver = hg.NystromPCG(rank=3, seed=3, refresh_every=3)
    run(solver, A, bs[:2])
    before = solver.state_dict()
    with pytest.raises(ValueError, match=key):
        solver.load_state_dict(edit(_pcg_state()))
    after = solver.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        if isinstance(before[k], torch.Tensor):
            assert torch.equal(before[k], after[k]), k
        else:
            assert before[k] == after[k], k
    # and the continuation is the one without the failed load
    ref = hg.NystromPCG(rank=3, seed=3, refresh_every=3)
    run(ref, A, bs[:2])
    expected, got = run(ref, A, bs[2:5]), run(solver, A, bs[2:5])
    assert all(torch.equal(x[0], y[0]) for x, y in zip(expected, got))


def test_empty_sketch_state_loads():
    solver = hg.NystromPCG(rank=3, seed=0)
    state = solver.state_dict()
    assert state["U"] is None and state["calls"] == 0
    solver.load_state_dict(roundtrip(state))
    with pytest.raises(ValueError, match="`eigenvalues`"):
        solver.load_state_dict({**state, "U": torch.zeros(N, 2, dtype=DT)})
