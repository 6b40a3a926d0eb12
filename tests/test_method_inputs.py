"""Bad input and non-finite values, over every method of the registry.

Bad input raises a ValueError (ArgumentTypeError for a wrong type) that names the argument
and the fix, before anything is computed; a non-finite value raises
NonFiniteHypergradientError naming the first quantity found non-finite, in the order the
computation produces them (the inner gradient before the outer one, x0 before the solve).
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import pytest
import torch

import hypergradient as hg
from registry import METHODS, linear_losses, ridge_losses, traj_losses

DT = torch.float64
ROWS = [pytest.param(row, id=row.id) for row in METHODS]


def _losses(row):
    if "drmad" in row.id:
        return linear_losses
    return traj_losses if row.trajectory else ridge_losses


def _poisoned(row, which: str):
    """The row's losses with a NaN in the training data (X) or the validation data (Xv)."""
    base = _losses(row)

    def make(X, y, Xv, yv):
        X, Xv = X.clone(), Xv.clone()
        (X if which == "train" else Xv)[3, 1] = float("nan")
        return base(X, y, Xv, yv)

    return make


def _first_hparam(problem):
    h = problem.hparams
    return (h, "hparams") if isinstance(h, torch.Tensor) else (next(iter(h.values())), None)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("row", ROWS)
def test_hparams_none_is_refused(row):
    problem = dataclasses.replace(row.case().problem(), hparams=None)
    with pytest.raises(ValueError, match="`hparams` is None"):
        row.make()(problem)


@pytest.mark.parametrize("row", ROWS)
def test_hparams_that_are_params_are_refused(row):
    problem = row.case().problem()
    p = problem.trajectory.params0 if row.trajectory else problem.params
    name = "params0" if row.trajectory else "params"
    for alias in (p, p[:2]):  # the tensor itself, or a view of it
        bad = dataclasses.replace(problem, hparams={"a": alias})
        with pytest.raises(ValueError, match=rf"\['a'\] of `hparams` is also a leaf of `{name}`"):
            row.make()(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("row", ROWS)
def test_non_finite_hyperparameters_are_refused_naming_the_leaf(row, value):
    case = row.case()
    h = case.hparams()
    leaf = h if isinstance(h, torch.Tensor) else h[next(iter(h))]
    leaf[1] = value
    path = "hparams" if isinstance(h, torch.Tensor) else f"hparams['{next(iter(h))}']"
    with pytest.raises(ValueError, match="^" + re.escape(path) + " contains NaN or Inf"):
        row.make()(case.problem(hparams=h))


@pytest.mark.parametrize("row", ROWS)
def test_params_and_hparams_on_different_devices_are_named(row):
    problem = row.case().problem()
    h = problem.hparams
    h = h.to("meta") if isinstance(h, torch.Tensor) else {k: v.to("meta") for k, v in h.items()}
    with pytest.raises(ValueError, match="`hparams` is on meta and `params0?` on cpu"):
        row.make()(dataclasses.replace(problem, hparams=h))


def test_x0_with_wrong_keys_names_them():
    w = {"a": torch.ones(2, dtype=DT), "b": torch.ones(3, dtype=DT)}
    lam = torch.ones((), dtype=DT)

    def f(p, h):
        return 0.5 * h * sum((v**2).sum() for v in p.values())

    def g(p, h):
        return sum(v.sum() for v in p.values())

    x0 = {"a": torch.zeros(2, dtype=DT), "c": torch.zeros(3, dtype=DT)}
    with pytest.raises(ValueError, match=r"missing x0\['b'\]; unexpected x0\['c'\]"):
        hg.implicit(f, g, w, lam, x0=x0)
    with pytest.raises(ValueError, match=r"x0\['b'\] has shape \(2,\) where params\['b'\] has"):
        hg.implicit(f, g, w, lam, x0={"a": torch.zeros(2), "b": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"missing x0\['b'\]"):
        hg.Implicit()(hg.Problem(f, g, w, lam), x0={"a": torch.zeros(2)})


@pytest.mark.parametrize("fn", [hg.unrolled, hg.forward_mode, hg.drmad])
def test_loss_arity_must_match_batches(fn):
    w0 = torch.zeros(3, dtype=DT)
    h = torch.ones(3, dtype=DT)
    opt = hg.optim.sgd(lr=0.1)

    def two(w, hh):
        return ((w - hh) ** 2).sum()

    def three(w, hh, batch):
        return ((w - hh * batch) ** 2).sum()

    with pytest.raises(TypeError, match=r"must take \(params, hparams, batch\)"):
        fn(two, two, w0, h, 2, opt, batches=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"must take \(params, hparams\).*batches="):
        fn(three, two, w0, h, 2, opt)


def test_zero_size_hyperparameters_give_empty_results_in_every_functional_form():
    w = torch.ones(3, dtype=DT)
    empty = torch.zeros(0, dtype=DT)

    def f(p, h):
        return 0.5 * ((p - 1.0) ** 2).sum() + h.sum()

    def g(p, h):
        return p.sum()

    opt = hg.optim.sgd(lr=0.1)
    outs = [
        hg.implicit(f, g, w, empty),
        hg.unrolled(f, g, w, empty, 3, opt),
        hg.forward_mode(f, g, w, empty, 3, opt),
        hg.drmad(f, g, w, empty, 3, opt),
        hg.T1T2()(hg.Problem(f, g, w, empty, lr=0.1))[0],
        hg.HOAG()(hg.Problem(f, g, w, empty))[0],
    ]
    assert all(o.shape == (0,) and o.dtype == DT for o in outs)


def test_constructors_validate_through_the_vocabulary():
    for make, match in (
        (lambda: hg.HOAG(maxiter=0), "maxiter"),
        (lambda: hg.HOAG(maxiter=True), "maxiter"),
        (lambda: hg.HOAG(tol=float("nan")), "tol"),
        (lambda: hg.HOAG(decay=1.5), "decay"),
        (lambda: hg.HOAG(min_tol=-1.0), "min_tol"),
        (lambda: hg.HOAG(damping=-1.0), "damping"),
        (lambda: hg.Implicit("cg"), "solver"),
        (lambda: hg.Implicit(damping="0.1"), "damping"),
        (lambda: hg.Implicit(batched="yes"), "batched"),
        (lambda: hg.IFT(alpha=0.0), "alpha"),
        (lambda: hg.Unrolled(truncate=0), "truncate"),
        (lambda: hg.Unrolled(checkpoint_every=1.5), "checkpoint_every"),
        (lambda: hg.ForwardMode(chunk_size=-2), "chunk_size"),
    ):
        with pytest.raises(ValueError, match=match):
            make()
    import numpy as np

    assert hg.HOAG(maxiter=np.int64(5), tol=np.float32(0.5)).maxiter == 5  # numpy scalars


def test_t1t2_and_default_ift_need_the_learning_rate():
    case_problem = dataclasses.replace(__import__("registry").ridge_case("t1t2").problem(), lr=None)
    for method in (hg.T1T2(), hg.IFT()):
        with pytest.raises(ValueError, match=r"Problem\(lr=\.\.\.\)"):
            method(case_problem)


def test_hparams_by_reference_is_public_and_exact():
    """A loss that reads its hyperparameter tensors by reference (a criterion module)."""
    from registry import ridge_case

    case = ridge_case()
    X, y, Xv, yv = case.data
    h = case.hparams().requires_grad_(True)
    inner, outer = ridge_losses(X, y, Xv, yv)
    problem = case.problem()

    def by_ref(w, _):  # ignores its argument, reads `h`
        return inner(w, h)

    out = hg.implicit(by_ref, outer, problem.params, h, hg.Exact(), hparams_by_reference=True)
    assert float((out - case.reference).norm() / case.reference.norm()) < 1e-11
    assert h.grad is None
    with pytest.raises(ValueError, match="hparams_by_reference is for the implicit"):
        hg.ForwardMode()(
            dataclasses.replace(
                __import__("registry").trajectory_case().problem(), hparams_by_reference=True
            )
        )


# ----------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("row", ROWS)
def test_nan_training_batch_is_blamed_on_the_inner_loss(row):
    problem = row.case().problem(make_inner=_poisoned(row, "train"))
    with pytest.raises(hg.NonFiniteHypergradientError) as err:
        row.make()(problem)
    quantity = err.value.quantity
    if row.trajectory:
        assert quantity == "inner_loss at step 0"
    else:
        assert quantity.startswith("the gradient of inner_loss with respect to params")
    assert "outer_loss" not in str(err.value)


@pytest.mark.parametrize("row", ROWS)
def test_nan_validation_loss_is_blamed_on_the_outer_loss(row):
    problem = row.case().problem(make_inner=_poisoned(row, "val"))
    with pytest.raises(hg.NonFiniteHypergradientError) as err:
        row.make()(problem)
    assert err.value.quantity.startswith("the gradient of outer_loss with respect to params")
    assert "diverged" not in str(err.value) and "lower the learning rate" not in str(err.value)


def test_nan_x0_is_named_not_blamed_on_the_hessian():
    from registry import ridge_case

    problem = ridge_case().problem()
    x0 = torch.full((6,), float("nan"), dtype=DT)
    for method in (hg.Implicit(hg.CG()), hg.Implicit(hg.Exact()), hg.HOAG()):
        with pytest.raises(hg.NonFiniteHypergradientError) as err:
            method(problem, x0=x0)
        assert err.value.quantity == "the warm start x0"
        assert "positive definite" not in str(err.value)


def test_nan_params_are_named():
    from registry import ridge_case

    problem = ridge_case().problem()
    w = problem.params.clone()
    w[2] = float("nan")
    with pytest.raises(
        hg.NonFiniteHypergradientError, match=r"^The parameter params is not finite"
    ):
        hg.Implicit()(dataclasses.replace(problem, params=w))


def test_a_diverging_solver_is_named():
    from registry import ridge_case

    problem = dataclasses.replace(ridge_case("neumann").problem(), lr=50.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(hg.NonFiniteHypergradientError, match="diverged") as err:
            hg.IFT(maxiter=40, alpha=50.0)(problem)  # a fixed step far above 2 / lambda_max
    assert err.value.quantity == "the solution of H x = grad_theta g"


def test_deprecated_names_warn_and_point_to_the_new_ones():
    with pytest.warns(DeprecationWarning, match=r"hg\.Problem"):
        assert hg.HyperContext is hg.Problem
    with pytest.warns(DeprecationWarning, match=r"hg\.Method"):
        assert hg.HyperMethod is hg.Method
    with pytest.warns(DeprecationWarning, match=r"hg\.Method"):
        assert hg.methods.HyperMethod is hg.Method
    assert hg.HypergradInfo is hg.ImplicitInfo
    with pytest.raises(AttributeError):
        hg.NoSuchName  # noqa: B018
