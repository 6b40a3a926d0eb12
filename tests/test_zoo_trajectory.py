"""The model zoo through the trajectory methods (issue 10, item 6).

On every zoo model, with dropout on and off: ``hg.unrolled`` (``hvp="auto"`` and
``"first_order"``), ``hg.forward_mode`` and ``hg.drmad`` against central differences of the
same momentum-SGD loop in float64, along a random direction of the per-tensor weight decays.
The loop and the methods draw from the same seed, so dropout masks are those of the loop;
another seed gives another run, which the tolerance separates (the test can fail).
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

import hypergradient as hg
from zoo_models import DT, NAMES, directional_fd, loop_outer, make, one_thread  # noqa: F401

STEPS, LR, MOMENTUM, SEED = 3, 0.2, 0.9, 3
#: |method . u - central difference| in float64: measured 3e-11 at worst (first-order mode
#: on the text model) over the zoo; central differences with eps 1e-5 are good to ~1e-10.
ATOL = 1e-8

CASES = [
    pytest.param(name, d, id=f"{name}-{'dropout' if d else 'nodrop'}")
    for name in NAMES
    for d in (False, True)
]


@functools.cache
def reference(name: str, dropout: bool):
    """The zoo model, its start, the direction ``u`` and the central difference along it."""
    zoo = make(name, dropout)
    p0, h = zoo.params0(), zoo.hparams0()
    u = torch.randn(h["decay"].shape, generator=torch.Generator().manual_seed(5), dtype=DT)

    def run(phi):
        return loop_outer(zoo, p0, {"decay": phi}, STEPS, LR, MOMENTUM, SEED)

    fd = directional_fd(run, h["decay"], u)
    return zoo, p0, h, u, fd


def call(fn, *args, **kwargs):
    """``fn`` from the loop's seed; the transformer's fallback warning is expected."""
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        return fn(*args, **kwargs)


def optimizer():
    return hg.optim.sgd(lr=LR, momentum=MOMENTUM)


@pytest.mark.parametrize(("name", "dropout"), CASES)
def test_unrolled_matches_central_differences_in_both_product_modes(name, dropout):
    zoo, p0, h, u, fd = reference(name, dropout)
    auto, info = call(
        hg.unrolled, zoo.inner, zoo.outer, p0, h, STEPS, optimizer(), return_info=True
    )
    first, finfo = call(
        hg.unrolled,
        zoo.inner,
        zoo.outer,
        p0,
        h,
        STEPS,
        optimizer(),
        hvp="first_order",
        return_info=True,
    )
    # the fused CPU attention kernel (no double backward) runs without dropout only
    fused = name == "transformer" and not dropout
    assert info.stats["hvp"] == ("double_math" if fused else "double")
    assert finfo.stats["hvp"] == "first_order"
    assert abs(float(auto["decay"] @ u) - fd) < ATOL
    assert abs(float(first["decay"] @ u) - fd) < ATOL
    # another seed: other dropout masks, another hypergradient (with dropout only)
    if dropout:
        other = hg.unrolled(zoo.inner, zoo.outer, p0, h, STEPS, optimizer(), hvp="first_order")
        assert abs(float(other["decay"] @ u) - fd) > 1e3 * ATOL


FORWARD_CASES = CASES  # forward mode works on every model (transformer: math-kernel fallback)


@pytest.mark.parametrize(("name", "dropout"), FORWARD_CASES)
def test_forward_mode_matches_central_differences(name, dropout):
    zoo, p0, h, u, fd = reference(name, dropout)
    got = call(hg.forward_mode, zoo.inner, zoo.outer, p0, h, STEPS, optimizer())
    assert abs(float(got["decay"] @ u) - fd) < ATOL


@pytest.mark.parametrize(("name", "dropout"), CASES)
def test_drmad_with_every_state_is_unrolled_and_without_runs_finite(name, dropout):
    """With ``anchors = T - 1`` DrMAD stores every state: exactly the loop's hypergradient.
    The original DrMAD (no anchors) is an approximation: finite, with its path deviation."""
    zoo, p0, h, u, fd = reference(name, dropout)
    full = call(hg.drmad, zoo.inner, zoo.outer, p0, h, STEPS, optimizer(), anchors=STEPS - 1)
    assert abs(float(full["decay"] @ u) - fd) < ATOL
    plain, info = call(
        hg.drmad,
        zoo.inner,
        zoo.outer,
        p0,
        h,
        STEPS,
        optimizer(),
        hvp="first_order",
        return_info=True,
    )
    assert torch.isfinite(plain["decay"]).all()
    assert info.stats["anchors"] == 0 and info.stats["path_deviation"] >= 0.0
