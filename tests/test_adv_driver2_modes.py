"""A hyper-step leaves the model's train/eval flags as they were.

``val_loss`` is validation code to PyTorch users, who start it with ``model.eval()``. The
hyper-optimizer calls it on the user's module (reparametrized), so that flag used to stick:
the training loop carried on in eval mode after the first hyper-step (BatchNorm's running
statistics frozen, dropout off), and inside the hyper-step Unrolled's recomputed steps ran
the BatchNorm network in eval mode (a hypergradient 2e-6 off on this tiny problem). Now
every functional call puts the flags back.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.func import functional_call

import hypergradient as hg
from test_hyperoptimizer_support import (
    BCE,
    DT,
    VAL,
    assert_same,
    batches,
    everything,
    mlp,
    train_loss,
)

LR = 0.1


def val_eval(m, h, b):
    m.eval()  # validation code: never switched back
    return BCE(m(b[0]).reshape(-1), b[1])


def val_eval_restored(m, h, b):
    was = m.training
    m.eval()
    out = BCE(m(b[0]).reshape(-1), b[1])
    m.train(was)
    return out


def _run(val_loss, method, steps=3, holdout=False):
    model = mlp(batchnorm=True)
    decay = hg.Positive(torch.full((4, 6), 1e-2, dtype=DT))
    hopt = hg.HyperOptimizer(
        model,
        {"decay": decay},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.1),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=VAL,
        method=method,
        inner_steps=3,
        holdout_data=VAL if holdout else None,
    )
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        for b in batches(steps):
            hopt.zero_grad()
            hopt.train_loss(b).backward()
            hopt.step(b)
    return model, hopt, start, decay


def _copies(buffers):
    return {k: v.clone() for k, v in buffers.items()}  # train-mode BatchNorm updates them


def _unrolled_reference(model, start, decay):
    """Autograd through the three SGD steps (BatchNorm in train mode: batch statistics),
    then the validation loss in eval mode with the running statistics the hyper-step saw."""
    raw = decay.raw.detach().clone().requires_grad_(True)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    h = {"decay": decay.transform(raw)}
    params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    probe = mlp(batchnorm=True)
    for b in batches(3):
        probe.train()
        loss = functional_call(probe, {**params, **_copies(buffers)}, (b[0],))
        w = params["0.weight"]
        loss = BCE(loss.reshape(-1), b[1]) + 0.5 * (h["decay"] * w**2).sum()
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params = {k: p - LR * g for (k, p), g in zip(params.items(), grads)}
    probe.eval()
    out = functional_call(probe, {**params, **_copies(buffers)}, (VAL[0],))
    return torch.autograd.grad(BCE(out.reshape(-1), VAL[1]), raw)[0]


@pytest.mark.parametrize(
    "method",
    [hg.Unrolled(), hg.IFT(hg.CG(maxiter=20), damping=0.5), hg.T1T2(), hg.DrMAD()],
    ids=["Unrolled", "IFT", "T1T2", "DrMAD"],
)
def test_eval_in_val_loss_does_not_leak(method):
    model, hopt, _, _ = _run(val_eval, method, holdout=True)
    assert hopt.hyper_steps == 1
    assert all(m.training for m in model.modules())  # as the loop left them
    _, ref_hopt, _, _ = _run(val_eval_restored, method, holdout=True)
    got, ref = hopt.history[-1].hypergrad["decay"], ref_hopt.history[-1].hypergrad["decay"]
    assert torch.equal(got, ref)


def test_unrolled_with_batchnorm_matches_autograd_through_the_steps():
    model, hopt, start, decay = _run(val_eval, hg.Unrolled())
    # the hyper-step moved decay; the reference is taken at the values it differentiated
    got = hopt.history[-1].hypergrad["decay"]
    with torch.no_grad():
        decay.raw.add_(hopt.outer_optimizer.param_groups[0]["lr"] * got)  # undo SGD's step
    ref = _unrolled_reference(model, start, decay)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


def test_eval_mode_of_the_loop_is_kept_too():
    """A loop that trains in eval mode (a frozen-BatchNorm fine-tune) stays in eval mode
    even if train_loss switches to train mode inside a replay."""

    def train_switching(m, h, b):
        m.train()
        return train_loss(m, h, b)

    model = mlp(batchnorm=True)
    model.eval()
    hopt = hg.HyperOptimizer(
        model,
        {"decay": hg.Positive(torch.full((4, 6), 1e-2, dtype=DT))},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.1),
        train_loss=train_switching,
        val_loss=val_eval_restored,
        val_data=VAL,
        method=hg.Unrolled(),
        inner_steps=2,
    )
    with pytest.warns(hg.HypergradientWarning, match="differentiable replay"):  # train mode
        for b in batches(2):
            hopt.zero_grad()
            train_loss(model, hopt.hparams, b).backward()  # the loop's own loss, in eval mode
            hopt.step(b)
    assert hopt.hyper_steps == 1
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("method", [hg.Unrolled(), hg.IFT(hg.CG(maxiter=5), damping=1.0)])
def test_a_hyper_step_that_raises_after_eval_is_undone_with_the_modes(method):
    def val_raises(m, h, b):
        m.eval()
        raise RuntimeError("validation failed")

    model, hopt, _, _ = _run(val_eval_restored, method, steps=2)
    hopt.val_loss_fn = val_raises
    b = batches(3)[2]
    hopt.zero_grad()
    hopt.train_loss(b).backward()
    before = everything(model, hopt)
    with pytest.raises(RuntimeError, match="validation failed"):
        hopt.step(b)
    assert all(m.training for m in model.modules())
    assert_same(before, everything(model, hopt))
