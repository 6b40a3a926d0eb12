"""Trajectory methods on a module with BatchNorm whose buffers the losses update in place.

The client code users write: ``functional_call(net, params, x)`` with ``net`` in train
mode for the inner loss (BatchNorm updates ``net``'s running statistics at each call) and
in eval mode for the outer loss (which reads them). The BatchNorm layer sits on the
inputs, so its running statistics depend on the batches only, never on the
hyperparameters: central differences of a plain training loop (buffers reset before each
run) are then the exact hypergradient, and the outer loss after ``T`` steps is that of a
model whose statistics saw exactly the ``T`` training batches.

Bug (found by the adversarial review): ``Run`` evaluated the inner loss once more before
the first step (a validation call), so the running statistics saw batch 0 twice and the
outer loss, its value and the hypergradient were those of another model than the one
training produces (relative error ~1e-3 on this network).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hypergradient as hg

DT = torch.float64
T = 4


def _setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    g = torch.Generator().manual_seed(1)
    # batches with very different statistics, so that an extra update shows
    batches = [
        (
            torch.randn(8, 3, generator=g, dtype=DT) * (1 + i) + i,
            torch.randn(8, 1, generator=g, dtype=DT),
        )
        for i in range(T)
    ]
    Xv = torch.randn(8, 3, generator=g, dtype=DT) + 1.0
    yv = torch.randn(8, 1, generator=g, dtype=DT)
    p0 = {k: v.detach().clone() for k, v in net.named_parameters()}
    buffers = {k: v.clone() for k, v in net.named_buffers()}

    def reset():
        with torch.no_grad():
            for k, v in net.named_buffers():
                v.copy_(buffers[k])

    def inner(p, h, batch):
        net.train()
        x, y = batch
        decay = h["decay"].exp() * sum((v**2).sum() for v in p.values())
        return ((functional_call(net, p, (x,)) - y) ** 2).mean() + decay

    def outer(p, h):
        net.eval()
        return ((functional_call(net, p, (Xv,)) - yv) ** 2).mean()

    def plain(decay, lr):
        """Plain training (momentum SGD) from the initial buffers, then the outer loss."""
        reset()
        p, buf = dict(p0), None
        for t in range(T):
            leaves = {k: v.detach().requires_grad_(True) for k, v in p.items()}
            grads = torch.autograd.grad(
                inner(leaves, {"decay": decay}, batches[t]), list(leaves.values())
            )
            buf = list(grads) if buf is None else [0.5 * b + gi for b, gi in zip(buf, grads)]
            p = {k: v.detach() - lr * b for (k, v), b in zip(leaves.items(), buf)}
        with torch.no_grad():
            return outer(p, {"decay": decay})

    return net, batches, p0, inner, outer, plain, reset


@pytest.mark.parametrize("method", ["unrolled", "forward_mode"])
def test_running_statistics_see_each_training_batch_once(method):
    net, batches, p0, inner, outer, plain, reset = _setup()
    decay, lr = torch.tensor(-2.0, dtype=DT), torch.tensor(0.2, dtype=DT)
    h = {"decay": decay, "lr": lr}
    eps = 1e-6
    fd_decay = (plain(decay + eps, lr) - plain(decay - eps, lr)) / (2 * eps)
    fd_lr = (plain(decay, lr + eps) - plain(decay, lr - eps)) / (2 * eps)
    value = float(plain(decay, lr))
    reset()
    fn = getattr(hg, method)
    out, info = fn(
        inner, outer, p0, h, T, hg.optim.sgd(lr, momentum=0.5), batches=batches, return_info=True
    )
    assert info.outer_loss == pytest.approx(value, rel=1e-12)
    assert float(out["decay"]) == pytest.approx(float(fd_decay), rel=1e-6)
    assert float(out["lr"]) == pytest.approx(float(fd_lr), rel=1e-6)
    if method == "forward_mode":  # no reverse pass: the buffers are exactly training's
        assert int(net[0].num_batches_tracked) == T


def test_drmad_outer_loss_is_that_of_the_trained_model():
    net, batches, p0, inner, outer, plain, reset = _setup()
    decay, lr = torch.tensor(-2.0, dtype=DT), torch.tensor(0.2, dtype=DT)
    value = float(plain(decay, lr))
    reset()
    _, info = hg.drmad(
        inner, outer, p0, {"decay": decay, "lr": lr}, T, hg.optim.sgd(lr, momentum=0.5),
        batches=batches, return_info=True,
    )  # fmt: skip
    assert info.outer_loss == pytest.approx(value, rel=1e-12)


def test_a_bad_inner_loss_is_still_named_before_any_step():
    _, batches, p0, inner, outer, _, _ = _setup()
    h = {"decay": torch.tensor(-2.0, dtype=DT)}
    opt = hg.optim.sgd(0.1)
    for method in (hg.unrolled, hg.forward_mode, hg.drmad):
        with pytest.raises(ValueError, match="inner_loss.*scalar"):
            method(lambda p, hh, b: p["1.weight"], outer, p0, h, T, opt, batches=batches)
        with pytest.raises(TypeError, match="inner_loss.*scalar"):
            method(lambda p, hh, b: 1.0, outer, p0, h, T, opt, batches=batches)
