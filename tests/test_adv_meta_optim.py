"""Adversarial review of ``hg.optim``: functional twins of torch optimizers, SGD-HD/Adam-HD.

Each test failed on the code before the review:

- ``from_torch(torch.optim.Adam(..., decoupled_weight_decay=True))`` returned a twin with an
  L2 (coupled) decay, so a trajectory method replayed another update rule than the one that
  ran (one step from ones with lr 0.1, decay 0.5: 0.90 instead of torch's 0.85). Refused now.
- A parameter without optimizer state (never had a gradient: an unused head) made
  ``from_torch`` restart every parameter's momentum/Adam moments in the replay.
- The SGD twin of ``momentum=0`` ignored a momentum supplied at replay (a momentum tuned
  from 0 got an exactly zero hypergradient).
- SGD-HD/Adam-HD: the skipped-lr warning pointed into torch; float16 dot products
  overflowed (the learning rate never adapted).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

DT = torch.float64


def one_step(opt: torch.optim.Optimizer, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    p.grad = g.clone()
    opt.step()
    return p.detach().clone()


@pytest.mark.parametrize("kind", ["adamw", "adam_decoupled"])
def test_adam_with_decoupled_decay_has_a_twin_that_steps_as_torch(kind):
    """AdamW (and Adam(decoupled_weight_decay=True)) was refused; its twin scales theta by
    1 - lr * wd before the step, as torch does (3 steps, 1e-15)."""
    p = torch.ones(3, dtype=DT, requires_grad=True)
    if kind == "adamw":
        opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.5)
    else:
        opt = torch.optim.Adam([p], lr=0.1, weight_decay=0.5, decoupled_weight_decay=True)
    twin, state, step = hg.optim.from_torch(opt, [p])
    assert twin.decoupled and state is None and step == 0
    q, state = [p.detach().clone()], twin.init([p])
    for t, g in enumerate(torch.tensor([[0.2, -0.1, 0.3], [0.5, 0.1, -0.2], [0.0, 0.3, 0.1]])):
        one_step(opt, p, g.to(DT))
        q, state = twin.update(q, [g.to(DT)], state, t)
        torch.testing.assert_close(q[0], p.detach(), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("wd", [0.0, 0.5])
def test_the_coupled_adam_twin_steps_as_torch(wd):
    g = torch.tensor([0.2, -0.1, 0.3], dtype=DT)
    p = torch.ones(3, dtype=DT, requires_grad=True)
    opt = torch.optim.Adam([p], lr=0.1, weight_decay=wd)
    twin, state, step = hg.optim.from_torch(opt, [p])
    assert state is None and step == 0
    (mine,), _ = twin.update([p.detach().clone()], [g], twin.init([p]), 0)
    assert float((mine - one_step(opt, p, g)).abs().max()) < 1e-15


# ----------------------------------------------------------------------------- partial state


class WithUnused(torch.nn.Module):
    """A linear model and, optionally, a head the loss never uses (as a pretrained
    model's pooler): the torch optimizer keeps no state for it."""

    def __init__(self, unused: bool):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 1).double()
        if unused:
            self.head2 = torch.nn.Linear(4, 1).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


GEN = torch.Generator().manual_seed(0)
X, Y = torch.randn(40, 4, generator=GEN, dtype=DT), torch.randn(40, 1, generator=GEN, dtype=DT)
XV, YV = torch.randn(30, 4, generator=GEN, dtype=DT), torch.randn(30, 1, generator=GEN, dtype=DT)


def unrolled_hypergradient(model: torch.nn.Module, make_inner) -> torch.Tensor:
    hopt = hg.HyperOptimizer(
        model,
        {"d": hg.Positive(torch.tensor(0.1, dtype=DT))},
        inner_optimizer=make_inner(model.parameters()),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.0),
        train_loss=lambda m, h, b: (
            ((m(b[0]) - b[1]) ** 2).mean() + h["d"] * m.lin.weight.square().sum()
        ),
        val_loss=lambda m, h, b: ((m(b[0]) - b[1]) ** 2).mean(),
        val_data=(XV, YV),
        method=hg.Unrolled(),
        inner_steps=3,
    )
    for _ in range(9):  # the third window starts with optimizer state
        hopt.zero_grad()
        hopt.train_loss((X, Y)).backward()
        hopt.step((X, Y))
    return hopt.history[-1].hypergrad["d"]


@pytest.mark.parametrize(
    "make_inner",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps: torch.optim.Adam(ps, lr=0.05),
    ],
    ids=["sgd-momentum", "adam"],
)
def test_an_unused_parameter_does_not_reset_the_replayed_state(make_inner):
    """The identity: an extra, unused parameter changes nothing. The twin restarted every
    parameter's state when one had none (measured: -0.108 instead of -0.196 with momentum,
    -0.0009 instead of -0.0031 with Adam)."""
    plain = unrolled_hypergradient(WithUnused(False), make_inner)
    extra = unrolled_hypergradient(WithUnused(True), make_inner)
    assert abs(float(plain)) > 1e-3
    assert float((extra - plain).abs()) <= 1e-14 * float(plain.abs())


def test_the_twin_takes_the_buffers_it_has_and_zeros_for_the_rest():
    a, b = (torch.ones(3, dtype=DT, requires_grad=True) for _ in range(2))
    opt = torch.optim.Adam([a, b], lr=0.1)
    for _ in range(2):
        a.grad = torch.tensor([0.2, -0.1, 0.3], dtype=DT)
        opt.step()
    twin, state, step = hg.optim.from_torch(opt, [a, b])
    assert step == 2 and state is not None
    assert torch.equal(state[0], opt.state[a]["exp_avg"]) and not state[1].any()
    assert torch.equal(state[2], opt.state[a]["exp_avg_sq"]) and not state[3].any()
    c = torch.ones(3, dtype=DT, requires_grad=True)
    opt2 = torch.optim.Adam([a, c], lr=0.1)
    c.grad = torch.ones(3, dtype=DT)
    opt2.step()
    for _ in range(2):
        a.grad = torch.ones(3, dtype=DT)
        c.grad = None
        opt2.step()
    # torch counts per parameter (c skipped twice): the twin keeps each count as an offset
    twin2, _, step2 = hg.optim.from_torch(opt2, [a, c])
    assert step2 == 3 and twin2.offsets == [0, -2] and twin.offsets == [0, -2]


# ----------------------------------------------------------------------------- HD warnings


@pytest.mark.parametrize("cls", [hg.optim.SGDHD, hg.optim.AdamHD])
def test_a_skipped_learning_rate_step_warns_at_the_callers_line(cls):
    """The warning pointed into torch/optim/optimizer.py (its step hooks), not at the
    ``opt.step()`` that a user's warning filters and logs should name."""
    p = torch.ones(2, dtype=DT, requires_grad=True)
    opt = cls([p], lr=0.1, hypergrad_lr=0.1)
    p.grad = torch.ones(2, dtype=DT)
    opt.step()
    p.grad = torch.full((2,), float("nan"), dtype=DT)
    with pytest.warns(hg.HypergradientWarning, match="not finite") as caught:
        opt.step()
    assert opt.param_groups[0]["lr"] == 0.1  # the first step had no previous direction
    assert [w.filename for w in caught] == [__file__]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_dot_products_do_not_overflow(dtype):
    """100k float16 entries with gradient 3: ``g . u = 9e5`` overflowed float16's 65504, so
    every learning-rate step was skipped (with a warning) and the lr never moved; bfloat16
    rounded it. Closed form: ``lr_t = lr_{t-1} + beta * 9e5`` from the second step."""
    p = torch.zeros(100_000, dtype=dtype, requires_grad=True)
    opt = hg.optim.SGDHD([p], lr=1e-3, hypergrad_lr=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)
        for _ in range(3):
            p.grad = torch.full_like(p, 3.0)
            opt.step()
    assert opt.param_groups[0]["lr"] == 1e-3 + 1e-9 * 9e5 + 1e-9 * 9e5


# ----------------------------------------------------------------------------- momentum from 0

A = torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.5]], dtype=DT)
B = torch.tensor([1.0, -2.0, 0.5], dtype=DT)


def quad_grad(p: torch.Tensor) -> torch.Tensor:
    return A @ p - B + 0.1 * torch.sin(p)


def torch_run(momentum: float, steps: int = 4) -> torch.Tensor:
    """``torch.optim.SGD`` itself, on the gradient field above, from ones."""
    p = torch.ones(3, dtype=DT, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.3, momentum=momentum)
    for _ in range(steps):
        p.grad = quad_grad(p.detach())
        opt.step()
    return p.detach()


def test_momentum_tuned_from_zero_keeps_its_buffers_and_hypergradient():
    """Tuning an SGD momentum that starts at 0 (a linked hyperparameter): the twin of
    ``SGD(momentum=0)`` kept no buffers and its ``update`` ignored the momentum it was
    given, so the hypergradient was exactly 0 (the driver reported 0.0 where momentum
    1e-12 gives -0.047). Now that raises, and ``tuned=("momentum",)`` keeps the buffers:
    d(objective)/d(momentum) at 0 equals finite differences of torch's own SGD."""
    p = torch.ones(3, dtype=DT, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.3, momentum=0.0)
    mom = torch.zeros((), dtype=DT, requires_grad=True)

    plain, _, _ = hg.optim.from_torch(opt, [p])
    with pytest.raises(ValueError, match="momentum=0, so it keeps no momentum buffers"):
        plain.update([p.detach()], [quad_grad(p.detach())], plain.init([p]), 1, {"momentum": mom})

    twin, state, step = hg.optim.from_torch(opt, [p], tuned=("momentum",))
    x, s = [p.detach()], twin.init([p]) if state is None else state
    for t in range(4):
        x, s = twin.update(x, [quad_grad(x[0])], s, step + t, {"momentum": mom})
    objective = lambda q: (q * q).sum()  # noqa: E731
    (grad,) = torch.autograd.grad(objective(x[0]), mom)
    assert float((x[0].detach() - torch_run(0.0)).abs().max()) < 1e-15
    h = 1e-5  # one-sided, second order (torch refuses a negative momentum)
    f0, f1, f2 = (objective(torch_run(k * h)) for k in (0, 1, 2))
    fd = (-3 * f0 + 4 * f1 - f2) / (2 * h)
    assert abs(float(grad) - float(fd)) <= 1e-8 * abs(float(fd))
    assert abs(float(fd)) > 1e-2
