"""One vocabulary for every solver: argument checks, parameter names, seeds, status, config.

Issue 9: the same argument gets the same check and the same message everywhere (numpy
integer scalars accepted, bool refused where a number is meant); ``maxiter``, ``tol``,
``atol``, ``seed``/``generator`` for every solver, ``Neumann(iters=)`` deprecated;
``Neumann(seed=None)`` used to crash inside torch.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import hypergradient as hg
from hypergradient._vocab import ArgumentTypeError, Status

DT = torch.float64

# every integer and float argument of every solver, with a valid value
INT_ARGS = [
    (hg.CG, "maxiter", 5),
    (hg.Neumann, "maxiter", 5),
    (hg.Neumann, "power_iters", 5),
    (hg.Neumann, "seed", 5),
    (hg.Nystrom, "rank", 5),
    (hg.Nystrom, "chunk_size", 5),
    (hg.Nystrom, "seed", 5),
    (hg.NystromPCG, "rank", 5),
    (hg.NystromPCG, "maxiter", 5),
    (hg.NystromPCG, "chunk_size", 5),
    (hg.NystromPCG, "refresh_every", 5),
    (hg.NystromPCG, "seed", 5),
    (hg.FixedPoint, "maxiter", 5),
    (hg.Exact, "max_size", 5),
    (hg.Exact, "chunk_size", 5),
]
FLOAT_ARGS = [
    (hg.CG, "tol", 0.5),
    (hg.CG, "atol", 0.5),
    (hg.Neumann, "alpha", 0.5),
    (hg.Neumann, "tol", 0.5),
    (hg.Neumann, "divergence_factor", 0.5),
    (hg.Nystrom, "rho", 0.5),
    (hg.NystromPCG, "tol", 0.5),
    (hg.NystromPCG, "atol", 0.5),
    (hg.NystromPCG, "mu", 0.5),
    (hg.FixedPoint, "tol", 0.5),
    (hg.FixedPoint, "atol", 0.5),
    (hg.FixedPoint, "omega", 0.5),
    (hg.Identity, "scale", 0.5),
    (hg.Exact, "rcond", 0.5),
]


def _id(case):
    return f"{case[0].__name__}-{case[1]}"


#: Neumann's arguments for the estimated step: with a fixed alpha they are refused.
AUTO_ONLY = {"power_iters", "seed", "generator", "refresh_every", "alpha_max"}


def make(cls, **kwargs):
    """``cls(**kwargs)``, with ``alpha="auto"`` for Neumann's estimate-only arguments."""
    if cls is hg.Neumann and AUTO_ONLY & set(kwargs):
        kwargs.setdefault("alpha", "auto")
    return cls(**kwargs)


@pytest.mark.parametrize("case", INT_ARGS, ids=_id)
def test_numpy_integers_are_accepted_everywhere(case):
    cls, name, value = case
    for np_value in (np.int64(value), np.int32(value), np.uint8(value)):
        solver = make(cls, **{name: np_value})
        assert getattr(solver, name) == value and type(getattr(solver, name)) is int


@pytest.mark.parametrize("case", FLOAT_ARGS, ids=_id)
def test_numpy_floats_are_accepted_everywhere(case):
    cls, name, value = case
    solver = make(cls, **{name: np.float32(value)})
    assert getattr(solver, name) == value and type(getattr(solver, name)) is float


@pytest.mark.parametrize("case", INT_ARGS + FLOAT_ARGS, ids=_id)
def test_bool_is_refused_where_a_number_is_meant(case):
    cls, name, _ = case
    for flag in (True, np.bool_(True)):
        with pytest.raises(ArgumentTypeError, match=f"`{name}`"):
            make(cls, **{name: flag})


@pytest.mark.parametrize("case", INT_ARGS + FLOAT_ARGS, ids=_id)
def test_strings_and_none_are_refused_with_a_type_error(case):
    cls, name, _ = case
    # (alpha takes one string, 'auto': another string is a bad value, a ValueError)
    with pytest.raises(ValueError if name == "alpha" else TypeError, match=f"`{name}`"):
        make(cls, **{name: "3"})
    with pytest.raises(ValueError, match=f"`{name}`"):  # ArgumentTypeError is both
        make(cls, **{name: [3]})


@pytest.mark.parametrize(
    ("name", "value", "classes"),
    [
        ("maxiter", 0, (hg.CG, hg.Neumann, hg.NystromPCG, hg.FixedPoint)),
        ("maxiter", 2.5, (hg.CG, hg.Neumann, hg.NystromPCG, hg.FixedPoint)),
        ("tol", -1e-3, (hg.CG, hg.NystromPCG, hg.FixedPoint)),
        ("tol", float("nan"), (hg.CG, hg.Neumann, hg.NystromPCG, hg.FixedPoint)),
        ("atol", -1.0, (hg.CG, hg.NystromPCG, hg.FixedPoint)),
        ("rank", 0, (hg.Nystrom, hg.NystromPCG)),
        ("chunk_size", 0, (hg.Nystrom, hg.NystromPCG, hg.Exact)),
        ("sketch", "srht", (hg.Nystrom, hg.NystromPCG)),
        ("seed", -1, (hg.Nystrom, hg.NystromPCG, hg.Neumann)),
        ("seed", 1.5, (hg.Nystrom, hg.NystromPCG, hg.Neumann)),
        ("seed", "a", (hg.Nystrom, hg.NystromPCG, hg.Neumann)),
        ("generator", 0, (hg.Nystrom, hg.NystromPCG, hg.Neumann)),
    ],
)
def test_same_argument_same_message_in_every_solver(name, value, classes):
    messages = set()
    for cls in classes:
        with pytest.raises(ValueError, match=f"`{name}`") as err:
            make(cls, **{name: value})
        messages.add(str(err.value))
    assert len(messages) == 1, messages


def test_neumann_maxiter_is_the_positional_first_argument_and_iters_is_deprecated():
    assert hg.Neumann(7).maxiter == 7
    assert hg.Neumann(maxiter=7).maxiter == 7
    assert hg.Neumann().maxiter == 20
    with pytest.warns(DeprecationWarning, match="maxiter"):
        old = hg.Neumann(iters=7, alpha=0.5)
    assert old.maxiter == 7 and old.config() == hg.Neumann(7, 0.5).config()
    with pytest.warns(DeprecationWarning, match="maxiter"):
        assert old.iters == 7
    with pytest.raises(AttributeError):
        old.iters = 3  # read-only
    with pytest.raises(ValueError, match="maxiter"):
        hg.Neumann(5, iters=5)


def test_neumann_iters_alias_computes_the_same_series():
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=DT))
    b = torch.ones(3, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = hg.Neumann(iters=6, alpha=0.3).solve(hg.MatrixOperator(A), b)
    new = hg.Neumann(maxiter=6, alpha=0.3).solve(hg.MatrixOperator(A), b)
    assert torch.equal(old.value, new.value) and old.num_hvps == new.num_hvps == 6


def _spd(n=10):
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    A = (Q * torch.linspace(1.0, 5.0, n, dtype=DT)) @ Q.T
    return 0.5 * (A + A.T), torch.randn(n, generator=g, dtype=DT)


RANDOMIZED = {
    "Nystrom": lambda **kw: hg.Nystrom(rank=3, **kw),
    "NystromPCG": lambda **kw: hg.NystromPCG(rank=3, maxiter=2, **kw),
    "Neumann-auto": lambda **kw: hg.Neumann(3, "auto", power_iters=3, **kw),
}


def _solve(solver):
    A, b = _spd()
    return solver.solve(hg.MatrixOperator(A), b).value


@pytest.mark.parametrize("name", RANDOMIZED)
def test_unseeded_solvers_are_reproducible_under_torch_manual_seed(name):
    make = RANDOMIZED[name]
    torch.manual_seed(11)
    a = make()
    torch.manual_seed(11)
    b = make()
    assert torch.equal(_solve(a), _solve(b))
    torch.manual_seed(12)
    assert not torch.equal(_solve(make()), _solve(make(seed=None)))  # two draws differ
    assert a.seed is None and isinstance(a.generator, torch.Generator)


@pytest.mark.parametrize("name", RANDOMIZED)
def test_seed_and_generator_have_one_meaning(name):
    make = RANDOMIZED[name]
    assert torch.equal(_solve(make(seed=4)), _solve(make(seed=np.int64(4))))
    assert torch.equal(
        _solve(make(seed=4)), _solve(make(generator=torch.Generator().manual_seed(4)))
    )
    # torch's global generator, as the seed libraries draw: the same as seeding it
    torch.manual_seed(4)
    via_global = _solve(make(generator=torch.default_generator))
    assert torch.equal(via_global, _solve(make(seed=4)))
    with pytest.raises(ValueError, match="not both"):
        make(seed=1, generator=torch.Generator())
    # the solver owns its generator: solving does not touch torch's global stream
    torch.manual_seed(0)
    expected = torch.rand(3)
    solver = make(seed=1)
    torch.manual_seed(0)
    _solve(solver)
    assert torch.equal(torch.rand(3), expected)


def test_neumann_with_a_fixed_step_draws_nothing():
    state = torch.get_rng_state()
    solver = hg.Neumann(5, 0.1)
    assert torch.equal(torch.get_rng_state(), state)  # no draw from the global stream
    assert solver.generator is None and solver.state_dict() == {"generator": None}


ALL = {
    "Exact": hg.Exact(),
    "CG": hg.CG(),
    "Neumann": hg.Neumann(),
    "Neumann-auto": hg.Neumann(alpha="auto", seed=3),
    "Nystrom": hg.Nystrom(seed=3),
    "NystromPCG": hg.NystromPCG(seed=3),
    "Identity": hg.Identity(),
    "FixedPoint": hg.FixedPoint(),
}


@pytest.mark.parametrize("name", ALL)
def test_config_is_plain_data_and_rebuilds_the_solver(name):
    solver = ALL[name]
    config = solver.config()
    assert json.loads(json.dumps(config)) == config
    assert type(solver)(**config).config() == config
    assert (
        repr(solver)
        == f"{type(solver).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in config.items()) + ")"
    )
    if "seed" in config:
        assert config["seed"] in (None, 3) and "seed=" in repr(solver)


def test_cg_config_names_the_preconditioner():
    def jacobi(r):
        return r

    assert hg.CG(preconditioner=jacobi).config()["preconditioner"].endswith("jacobi")


@pytest.mark.parametrize("name", ALL)
def test_solution_status_is_a_status_enum_with_a_message(name):
    A, b = _spd()
    sol = ALL[name].solve(hg.MatrixOperator(A), b)
    assert isinstance(sol.status, Status) and isinstance(sol.status, str)
    assert sol.status == sol.status.value  # compares equal to the plain string
    assert sol.message == sol.status.message and sol.message


def test_solution_accepts_a_plain_string_status():
    sol = hg.Solution(torch.zeros(2), 0, 0.0, True, "converged")
    assert sol.status is Status.CONVERGED and sol.message == Status.CONVERGED.message
    with pytest.raises(ValueError):
        hg.Solution(torch.zeros(2), 0, 0.0, True, "done")
