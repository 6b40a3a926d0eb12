"""Public spectrum and sketch helpers refuse what they cannot answer, before any product.

``hg.estimate_lambda_max``, ``hg.solvers.lanczos_extremes``, ``hg.nystrom_sketch``,
``NystromApproximation.solve`` and ``hg.solvers.damped_solve`` are public: a wrong argument
is named (it used to surface as an AttributeError or a torch TypeError from deep inside), and
a non-symmetric operator, which every solver that uses them refuses, is refused by them too
instead of returning numbers that mean nothing (Lanczos on ``[[1, 2], [0, 1]]``, whose
eigenvalues are 1 and 1, reported ``lambda_max = 2.39``).
"""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg
from hypergradient.solvers import damped_solve, lanczos_extremes

DT = torch.float64
DIAG = torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=DT)


def _op() -> hg.MatrixOperator:
    return hg.MatrixOperator(torch.diag(DIAG))


def _nonsymmetric() -> hg.MatrixOperator:
    return hg.MatrixOperator(torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=DT), symmetric=False)


SPECTRAL = {
    "estimate_lambda_max": lambda op, **kw: hg.estimate_lambda_max(op, 5, **kw),
    "lanczos_extremes": lambda op, **kw: lanczos_extremes(op, 5, **kw),
    "nystrom_sketch": lambda op, **kw: hg.nystrom_sketch(op, 2, **kw),
}


@pytest.mark.parametrize("name", SPECTRAL)
def test_a_tensor_instead_of_an_operator_is_named(name):
    with pytest.raises(TypeError, match=rf"{name}: `op` must be a LinearOperator.*MatrixOperator"):
        SPECTRAL[name](torch.diag(DIAG))


@pytest.mark.parametrize("name", SPECTRAL)
@pytest.mark.parametrize("generator", [3, "seed"])
def test_a_seed_instead_of_a_generator_is_named_and_no_product_is_spent(name, generator):
    op = _op()
    with pytest.raises(TypeError, match=r"`generator` must be a torch.Generator.*manual_seed"):
        SPECTRAL[name](op, generator=generator)
    assert op.num_matvecs == 0


@pytest.mark.parametrize("name", ["lanczos_extremes", "nystrom_sketch"])
def test_a_non_symmetric_operator_is_refused_before_any_product(name):
    op = _nonsymmetric()
    with pytest.raises(ValueError, match=rf"{name} needs a symmetric operator"):
        SPECTRAL[name](op)
    assert op.num_matvecs == 0


def test_the_symmetric_answers_are_unchanged_and_exact():
    g = torch.Generator().manual_seed(0)
    est = lanczos_extremes(_op(), 10, g)  # 4 distinct eigenvalues: exact after 4 steps
    assert est.lambda_max == pytest.approx(10.0, rel=1e-12)
    assert est.lambda_min == pytest.approx(1.0, rel=1e-12)
    assert est.num_hvps == 4
    approx = hg.nystrom_sketch(_op(), 4, generator=g)  # full rank: A itself
    b = torch.ones(4, dtype=DT)
    x = approx.solve(b, 0.5)
    assert torch.allclose(x, b / (DIAG + 0.5), rtol=1e-12, atol=0)


def test_power_start_must_be_a_bool():
    with pytest.raises(TypeError, match="`power_start` must be True or False"):
        lanczos_extremes(_op(), 5, power_start="yes")


@pytest.mark.parametrize("rho", [0.0, -1.0, float("nan"), float("inf")])
def test_nystrom_approximation_solve_needs_a_positive_finite_shift(rho):
    """``rho = 0`` on a rank-deficient sketch returned inf/NaN, ``rho = -1`` a 4.5e15 entry."""
    approx = hg.nystrom_sketch(_op(), 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="`rho` must be a"):
        approx.solve(torch.ones(4, dtype=DT), rho)


@pytest.mark.parametrize("damping", ["0.1", None, True])
def test_damped_solve_refuses_a_damping_that_is_not_a_number(damping):
    op = _op()
    with pytest.raises(TypeError, match="`damping` must be .*AutoDamping"):
        damped_solve(hg.CG(), op, torch.ones(4, dtype=DT), None, damping)
    assert op.num_matvecs == 0


def test_damped_solve_names_a_solver_class_passed_for_an_instance():
    with pytest.raises(TypeError, match=r"`solver` must be a hypergradient solver such as hg\.CG"):
        damped_solve(hg.CG, _op(), torch.ones(4, dtype=DT), None, 0.0)  # type: ignore[arg-type]


def test_damped_solve_with_a_number_solves_the_shifted_system_exactly():
    sol, _, stats = damped_solve(hg.Exact(), _op(), torch.ones(4, dtype=DT), None, 0.5)
    assert stats["damping"] == 0.5
    assert torch.allclose(sol.value, 1.0 / (DIAG + 0.5), rtol=1e-13, atol=0)


SOLVERS = {
    "CG": hg.CG,
    "Exact": hg.Exact,
    "Identity": hg.Identity,
    "FixedPoint": hg.FixedPoint,
    "Neumann": lambda: hg.Neumann(5),
    "NystromPCG": lambda: hg.NystromPCG(rank=2, seed=0),
    "RecycledCG": hg.RecycledCG,
}


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("which", ["b", "x0"])
def test_a_vector_on_another_device_is_named_before_any_product(name, which):
    """Was "Tensor.item() cannot be called on meta tensors" (a CUDA b with a CPU operator:
    torch's device error from inside a product)."""
    op, b = _op(), torch.ones(4, dtype=DT)
    args = {"b": b, "x0": None}
    args[which] = torch.ones(4, dtype=DT, device="meta")
    solver = SOLVERS[name]()
    with pytest.raises(ValueError, match=rf"`{which}` is on meta but the operator on cpu"):
        solver.solve(op, args["b"], args["x0"])
    assert op.num_matvecs == 0


def test_an_operator_naming_no_device_index_accepts_the_indexed_device():
    from hypergradient.solvers.base import _same_device

    assert _same_device(torch.device("cuda", 0), "cuda")
    assert _same_device(torch.device("cpu"), torch.device("cpu"))
    assert not _same_device(torch.device("cuda", 1), torch.device("cuda", 0))
    assert not _same_device(torch.device("meta"), "cpu")
