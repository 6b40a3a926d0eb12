"""Forward mode's product modes (``hvp=``): batched double backward against reverse mode and
finite differences, first-order tangents, chunking, and the fallback of ``"auto"`` on
kernels without double backward (fused attention, ``@once_differentiable`` functions)."""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg
from test_trajectory_modes import (
    _Cube,
    central_differences,
    cube_problem,
    loop,
    mlp_problem,
    rel,
    transformer_problem,
)

DT = torch.float64


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_forward_mode_equals_reverse_mode_and_finite_differences(optimizer):
    inner, outer, params0, h = mlp_problem()
    opt = (
        hg.optim.sgd(lr=h["lr"], momentum=0.9)
        if optimizer == "momentum"
        else hg.optim.adam(lr=0.05, betas=(0.9, 0.99))
    )
    fwd, info = hg.forward_mode(inner, outer, params0, h, 8, opt, return_info=True)
    rev = hg.unrolled(inner, outer, params0, h, 8, opt, hvp="double")
    assert info.stats["hvp"] == "double" and info.stats["hvp_fallback"] is None
    assert rel(fwd, rev) < 1e-10
    fd = central_differences(
        lambda hh: loop(inner, outer, params0, hh, 8, _opt(optimizer, hh), 0), h
    )
    keys = [k for k in h if optimizer == "momentum" or k != "lr"]
    assert rel({k: fwd[k] for k in keys}, {k: fd[k] for k in keys}) < 1e-6
    assert float(fwd["decay"].abs().min()) > 0  # every entry moves: a test that can fail


def _opt(name, h):
    if name == "momentum":
        return hg.optim.sgd(lr=h["lr"], momentum=0.9)
    return hg.optim.adam(lr=0.05, betas=(0.9, 0.99))


def test_first_order_tangents_and_chunks_agree_with_double_backward():
    inner, outer, params0, h = mlp_problem()
    opt = hg.optim.sgd(lr=h["lr"], momentum=0.9)
    double = hg.forward_mode(inner, outer, params0, h, 8, opt, hvp="double")
    first, info = hg.forward_mode(
        inner, outer, params0, h, 8, opt, hvp="first_order", return_info=True
    )
    chunked = hg.forward_mode(inner, outer, params0, h, 8, opt, chunk_size=1)
    assert info.stats["hvp"] == "first_order"
    assert rel(first, double) < 1e-6
    assert rel(chunked, double) < 1e-12


def test_forward_mode_with_dropout_uses_each_steps_masks():
    inner, outer, params0, h = mlp_problem(dropout=0.3)
    opt = hg.optim.sgd(lr=h["lr"], momentum=0.5)
    torch.manual_seed(3)
    rev = hg.unrolled(inner, outer, params0, h, 6, opt, hvp="double")
    torch.manual_seed(3)
    fwd = hg.forward_mode(inner, outer, params0, h, 6, opt)
    torch.manual_seed(3)
    first = hg.forward_mode(inner, outer, params0, h, 6, opt, hvp="first_order")
    assert rel(fwd, rev) < 1e-10
    assert rel(first, rev) < 1e-6


def test_transformer_forward_mode_falls_back_and_agrees_with_first_order():
    inner, outer, params0, h = transformer_problem()
    opt = hg.optim.sgd(lr=0.1, momentum=0.9)
    with pytest.raises(RuntimeError, match="derivative for .* is not implemented"):
        hg.forward_mode(inner, outer, params0, h, 3, opt, hvp="double")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        auto, info = hg.forward_mode(inner, outer, params0, h, 3, opt, return_info=True)
    assert info.stats["hvp"] == "double_math"
    assert "not implemented" in info.stats["hvp_fallback"]
    first = hg.forward_mode(inner, outer, params0, h, 3, opt, hvp="first_order")
    rev = hg.unrolled(inner, outer, params0, h, 3, opt, hvp="double_math")
    assert rel(auto, rev) < 1e-10
    assert rel(first, rev) < 1e-6


def test_once_differentiable_functions_fall_back_to_first_order_in_forward_mode():
    make, outer, w0, h = cube_problem()
    opt = hg.optim.sgd(lr=0.1)
    exact = hg.forward_mode(make(lambda w: w**3), outer, w0, h, 6, opt, hvp="double")
    with pytest.raises(RuntimeError, match="once_differentiable"):
        hg.forward_mode(make(_Cube.apply), outer, w0, h, 6, opt, hvp="double")
    with pytest.warns(hg.HypergradientWarning, match="first_order"):
        got, info = hg.forward_mode(make(_Cube.apply), outer, w0, h, 6, opt, return_info=True)
    assert info.stats["hvp"] == "first_order"
    assert float((got - exact).norm() / exact.norm()) < 1e-7


def test_bad_hvp_is_refused_by_forward_mode():
    with pytest.raises(ValueError, match="`hvp` must be one of 'auto', 'double'"):
        hg.ForwardMode(hvp="jvp")


def test_one_inner_evaluation_per_step_after_the_first_and_dropout_masks_shared():
    # The gradient is read off the tangents' double-backward graph (one evaluation of
    # inner_loss per step, not two); under dropout the step's one evaluation
    # draws the masks the reverse mode's steps draw from the same seed.
    for dropout in (0.0, 0.3):
        inner, outer, params0, h = mlp_problem(dropout=dropout)
        calls = []

        def counted(p, hh, inner=inner, calls=calls):
            calls.append(1)
            return inner(p, hh)

        opt = hg.optim.sgd(lr=h["lr"], momentum=0.9)
        torch.manual_seed(5)
        fwd = hg.forward_mode(counted, outer, params0, h, 8, opt, hvp="double")
        # one per step (no set-up evaluation: it made BatchNorm's running statistics see
        # batch 0 twice; tests/test_adv_func_buffers.py)
        assert len(calls) == 8
        torch.manual_seed(5)
        rev = hg.unrolled(inner, outer, params0, h, 8, opt, hvp="double")
        assert rel(fwd, rev) < 1e-10


def test_many_hyperparameters_take_the_vmapped_update_and_agree():
    # 6 x 10 + 1 = 61 hyperparameters: above DUAL_MAX the update's tangents are vmapped.
    inner0, outer, params0, _ = mlp_problem()
    h = {"decay": torch.full((6, 10), 1e-2, dtype=DT), "lr": torch.tensor(0.3, dtype=DT)}

    def inner(p, hh):
        return (
            inner0(p, {"decay": torch.zeros(3, dtype=DT), "lr": hh["lr"]})
            + 0.5 * (hh["decay"] * p["W1"] ** 2).sum()
        )

    opt = hg.optim.sgd(lr=h["lr"], momentum=0.5)
    fwd = hg.forward_mode(inner, outer, params0, h, 6, opt)
    rev = hg.unrolled(inner, outer, params0, h, 6, opt)
    assert rel(fwd, rev) < 1e-10
    assert float(fwd["decay"].abs().min()) > 0
