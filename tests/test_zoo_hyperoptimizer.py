"""The model zoo in ``HyperOptimizer`` with every method (issue 10, items 4 and 6).

Each zoo module (dropout on and off) trains for four momentum-SGD steps with one
hyper-step after the third, its outer learning rate 0 so the hyperparameters stay put. The
run must then be plain training: the same weights, BatchNorm running statistics and
``num_batches_tracked`` bit for bit, and torch's random-number state where plain training
leaves it (a hyper-step that draws dropout masks from the global stream changes every
later mask). Trajectory methods must replay the real trajectory, dropout masks included
(``replay_error`` at rounding level), and every hypergradient must be finite.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

import hypergradient as hg
from zoo_models import DT, NAMES, make, one_thread  # noqa: F401

STEPS, INNER_STEPS, SEED = 4, 3, 9

METHODS = {
    "ift": lambda: hg.IFT(),
    "hoag": lambda: hg.HOAG(maxiter=10),
    "t1t2": lambda: hg.T1T2(),
    "unrolled": lambda: hg.Unrolled(),
    "drmad": lambda: hg.DrMAD(),
    "forward": lambda: hg.ForwardMode(),
}
TRAJECTORY = {"unrolled", "drmad", "forward"}


def case(name, dropout, method):
    tag = "dropout" if dropout else "nodrop"
    return pytest.param(name, dropout, method, id=f"{name}-{tag}-{method}")


CASES = [case(n, d, m) for n in NAMES for d in (False, True) for m in METHODS]


def decays(module):
    return torch.full((len(list(module.parameters())),), 1e-2, dtype=DT)


@functools.cache
def plain(name: str, dropout: bool):
    """Plain training (no hyper-optimizer): the state dict and torch's RNG state after."""
    zoo = make(name, dropout)
    opt = torch.optim.SGD(zoo.module.parameters(), lr=0.1, momentum=0.9)
    zoo.module.train()
    h = {"decay": hg.Positive(decays(zoo.module)).value}  # exp(log(1e-2)), as in training
    torch.manual_seed(SEED)
    for batch in zoo.batches(STEPS):
        opt.zero_grad()
        zoo.train_loss(zoo.module, h, batch).backward()
        opt.step()
    return {k: v.clone() for k, v in zoo.module.state_dict().items()}, torch.get_rng_state()


@pytest.mark.parametrize(("name", "dropout", "method"), CASES)
def test_a_hyper_step_leaves_training_as_plain_training(name, dropout, method):
    zoo = make(name, dropout)
    hopt = hg.HyperOptimizer(
        zoo.module,
        {"decay": hg.Positive(decays(zoo.module))},
        inner_optimizer=torch.optim.SGD(zoo.module.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.0),
        train_loss=zoo.train_loss,
        val_loss=zoo.val_loss,
        val_data=(zoo.Xv, zoo.yv),
        method=METHODS[method](),
        inner_steps=INNER_STEPS,
    )
    zoo.module.train()
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)  # far from stationary
        for batch in zoo.batches(STEPS):
            hopt.zero_grad()
            hopt.train_loss(batch).backward()
            hopt.step(batch)
    assert hopt.hyper_steps == 1
    record = hopt.history[-1]
    assert all(torch.isfinite(g).all() for g in record.hypergrad.values())
    if method in TRAJECTORY:
        assert record.diagnostics["replay_error"] < 1e-12
    state, rng = plain(name, dropout)
    assert torch.equal(torch.get_rng_state(), rng), "the hyper-step moved torch's RNG"
    mine = zoo.module.state_dict()
    assert list(mine) == list(state)
    for key, value in state.items():  # weights, running stats, num_batches_tracked
        assert torch.equal(mine[key], value), key


@pytest.mark.parametrize("method", ["drmad"])
def test_an_outer_loss_with_dropout_leaves_the_training_stream_alone(method):
    """The outer loss evaluated in train mode (dropout on) inside a trajectory method's
    hyper-step: the training after it must draw the masks plain training draws."""
    zoo = make("mlp", True)
    hopt = hg.HyperOptimizer(
        zoo.module,
        {"decay": hg.Positive(decays(zoo.module))},
        inner_optimizer=torch.optim.SGD(zoo.module.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.0),
        train_loss=zoo.train_loss,
        val_loss=lambda m, h, batch: zoo.train_loss(m, h, batch),  # train mode: dropout
        val_data=(zoo.Xv, zoo.yv),
        method=METHODS[method](),
        inner_steps=INNER_STEPS,
    )
    zoo.module.train()
    torch.manual_seed(SEED)
    for batch in zoo.batches(STEPS):
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        hopt.step(batch)
    assert hopt.history[-1].diagnostics["replay_error"] < 1e-12  # the replay is exact
    state, rng = plain("mlp", True)
    assert torch.equal(torch.get_rng_state(), rng), "the hyper-step moved torch's RNG"


def hypergradients(name: str, method: hg.Method) -> list[torch.Tensor]:
    zoo = make(name, True)
    hopt = hg.HyperOptimizer(
        zoo.module,
        {"decay": hg.Positive(decays(zoo.module))},
        inner_optimizer=torch.optim.SGD(zoo.module.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.05),
        train_loss=zoo.train_loss,
        val_loss=zoo.val_loss,
        val_data=(zoo.Xv, zoo.yv),
        method=method,
        inner_steps=2,
    )
    zoo.module.train()
    torch.manual_seed(SEED)
    for batch in zoo.batches(STEPS):
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        hopt.step(batch)
    assert [r.diagnostics["hvp"] for r in hopt.history] == [method.hvp] * 2
    return [r.hypergrad["decay"] for r in hopt.history]


@pytest.mark.parametrize("name", NAMES)
def test_first_order_hyper_steps_equal_double_backward_ones_with_dropout(name):
    """Two hyper-steps (the second after an applied one) with dropout: the first-order
    product mode gives the double-backward hypergradients to 1e-6 (float64)."""
    mode = "double_math" if name == "transformer" else "double"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        double = hypergradients(name, hg.Unrolled(hvp=mode))
        first = hypergradients(name, hg.Unrolled(hvp="first_order"))
    for a, b in zip(first, double):
        assert float((a - b).norm() / b.norm()) < 1e-6
    assert float((double[1] - double[0]).norm()) > 1e-3 * float(double[0].norm())
