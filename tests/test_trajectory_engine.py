"""The trajectory engine itself: hyperparameters held by reference, checkpointed and
truncated reverse mode. (The speed/memory benchmark's smoke run, with the bound on
``hg.unrolled``'s peak memory at T = 100 measured in a subprocess and its cold start, is
``tests/test_benchmarks.py``'s ``check_unrolled_speed``.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import hypergradient as hg

DT = torch.float64
GEN = torch.Generator().manual_seed(4)
X, Y = torch.randn(30, 4, generator=GEN, dtype=DT), torch.randn(30, generator=GEN, dtype=DT)
XV, YV = torch.randn(20, 4, generator=GEN, dtype=DT), torch.randn(20, generator=GEN, dtype=DT)
W0 = 0.1 * torch.randn(4, generator=GEN, dtype=DT)


def losses(decay=None):
    """Inner/outer losses reading ``decay`` by reference (None: through ``hparams``)."""

    def inner(w, h):
        d = h["decay"] if decay is None else decay
        r = X @ w - Y
        return 0.5 * (r**2).mean() + 0.1 * torch.log(torch.cosh(r)).mean() + 0.5 * (d * w**2).sum()

    def outer(w, h):
        d = h["decay"] if decay is None else decay
        return 0.5 * ((XV @ w - YV) ** 2).mean() + 1e-2 * (d**2).sum()

    return inner, outer


@pytest.mark.parametrize("method", [hg.Unrolled(), hg.Unrolled(truncate=4), hg.DrMAD(anchors=2)])
def test_hparams_by_reference_equal_the_hparams_argument(method):
    """Losses that read the caller's own tensors (HippoTrainer's criteria): the engine
    differentiates with respect to those tensors (their ``.grad`` untouched), equal to
    passing them through ``hparams``; the learning rate is a leaf in both."""
    decay = torch.linspace(0.05, 0.2, 4, dtype=DT).requires_grad_(True)
    lr = torch.tensor(0.2, dtype=DT, requires_grad=True)
    opt = hg.optim.sgd(lr=lr, momentum=0.5)
    inner, outer = losses()
    traj = hg.methods.Trajectory(lambda w, h, b: inner(w, h), W0, opt, [None] * 8)
    problem = hg.Problem(inner, outer, W0, {"decay": decay, "lr": lr}, trajectory=traj)
    ref, _ = method(problem)
    inner_r, outer_r = losses(decay)
    traj_r = dataclasses.replace(traj, step_loss=lambda w, h, b: inner_r(w, h))
    by_ref = dataclasses.replace(
        problem,
        inner_loss=inner_r,
        outer_loss=outer_r,
        trajectory=traj_r,
        hparams_by_reference=True,
    )
    got, _ = method(by_ref)
    for k in ("decay", "lr"):
        assert torch.allclose(got[k], ref[k], rtol=1e-12, atol=1e-15), k
    assert float(got["decay"].abs().min()) > 0 and float(got["lr"].abs()) > 0
    assert decay.grad is None and lr.grad is None
    assert by_ref.hparams["decay"] is decay  # nothing was replaced or copied into the caller's


def test_hparams_by_reference_must_require_grad():
    inner, outer = losses()
    decay = torch.full((4,), 0.1, dtype=DT)  # no requires_grad
    traj = hg.methods.Trajectory(lambda w, h, b: inner(w, h), W0, hg.optim.sgd(lr=0.1), [None] * 3)
    problem = hg.Problem(
        inner, outer, W0, {"decay": decay}, trajectory=traj, hparams_by_reference=True
    )
    with pytest.raises(
        ValueError, match=r"hparams\['decay'\] does not require grad.*requires_grad_"
    ):
        hg.Unrolled()(problem)
    with pytest.raises(ValueError, match="hparams_by_reference is for the implicit methods"):
        hg.ForwardMode()(problem)


def test_truncated_checkpointed_and_adam_still_match_plain_reverse_mode():
    """Checkpointing recomputes the same states (same draws) as storing them all."""
    inner, outer = losses()
    h = {"decay": torch.full((4,), 0.1, dtype=DT), "lr": torch.tensor(0.05, dtype=DT)}
    opt = hg.optim.adam(lr=h["lr"], betas=(0.8, 0.95))
    full, info = hg.unrolled(inner, outer, W0, h, 15, opt, return_info=True)
    ckpt, cinfo = hg.unrolled(inner, outer, W0, h, 15, opt, checkpoint_every=4, return_info=True)
    assert all(torch.equal(full[k], ckpt[k]) for k in h)
    assert cinfo.recomputed_steps == 15 - 4 and cinfo.stored_states < info.stored_states
    assert info.num_hvps == 15 and info.stats["hvp"] == "double"
