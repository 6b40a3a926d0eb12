"""ModelView and TrajectoryWindow: hyper-steps never touch BatchNorm statistics (running
stats equal those of plain training), frozen parameters stay frozen, the window keeps
copies of the batches (an in-place refill cannot change the replay) and the
random-number state before every step (captured in ``hopt.train_loss``, at the end of
the previous step, or before a closure)."""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg
from hypergradient.hyperoptimizer.window import restore_rng
from test_hyperoptimizer_support import (
    DT,
    VAL,
    Recording,
    assert_same,
    batches,
    build,
    mlp,
    run,
    train_loss,
    val_loss,
)


@pytest.mark.parametrize(
    "method",
    [hg.T1T2(), hg.IFT(hg.CG(maxiter=5), damping=1.0), hg.Unrolled(), hg.ForwardMode()],
    ids=["t1t2", "ift", "unrolled", "forward"],
)
def test_batchnorm_statistics_are_those_of_plain_training(method):
    """With the outer learning rate at 0 the hyperparameters stay put, so the weights,
    running means and variances and num_batches_tracked must equal, bit for bit, those of
    the same training without a hyper-optimizer; the hyper-steps' forward passes (in
    train mode) must not have counted."""
    steps = batches(8)
    model, hopt = build(
        method,
        model=mlp(batchnorm=True),
        inner_steps=3,
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.0),
    )
    decay = hopt.hparams["decay"].clone()
    run(hopt, steps)
    assert hopt.hyper_steps == 2
    ref = mlp(batchnorm=True)
    opt = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.9)
    for batch in steps:
        opt.zero_grad()
        train_loss(ref, {"decay": decay}, batch).backward()
        opt.step()
    assert int(ref[1].num_batches_tracked) == 8
    assert_same(ref.state_dict(), model.state_dict())


def test_frozen_parameters_stay_frozen_and_the_module_keeps_its_parameters():
    model = mlp()
    params_before = [id(p) for p in model.parameters()]
    frozen = model[-1].weight.detach().clone()
    method = Recording(hg.T1T2())
    hopt = hg.HyperOptimizer(
        model,
        {"decay": hg.Positive(torch.full((4, 6), 1e-2, dtype=DT))},
        inner_optimizer=torch.optim.SGD(model[0].parameters(), lr=0.3),
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.1),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=VAL,
        method=method,
        inner_steps=2,
    )
    assert hopt.view.names == ["0.weight", "0.bias"] and hopt.view.frozen == ["3.weight", "3.bias"]
    run(hopt, batches(4))
    assert list(method.problems[-1].params) == ["0.weight", "0.bias"]
    assert torch.equal(model[-1].weight, frozen)
    assert [id(p) for p in model.parameters()] == params_before
    assert hopt.history[-1].hypergrad_norm > 0


def test_the_window_keeps_copies_of_batches_refilled_in_place():
    steps = batches(6)
    method = Recording(hg.Unrolled())
    model, hopt = build(method, inner_steps=3)
    x, y = torch.empty_like(steps[0][0]), torch.empty_like(steps[0][1])
    for batch in steps:  # one buffer, refilled in place at every step (a common pattern)
        x.copy_(batch[0])
        y.copy_(batch[1])
        hopt.zero_grad()
        hopt.train_loss((x, y)).backward()
        hopt.step((x, y))
    replayed = method.problems[-1].trajectory.batches
    for got, want in zip(replayed, steps[3:]):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert all(r.info.stats["replay_error"] < 1e-12 for r in hopt.history)


class ReplayDraws(hg.Method):
    """A trajectory method that replays, for each recorded step, the first random draw."""

    name = "replay-draws"
    needs_trajectory = True
    tunes_optimizer = True

    def __init__(self):
        self.draws = []

    def __call__(self, problem):
        for state in problem.trajectory.rng_states:
            with torch.random.fork_rng():
                restore_rng(state, torch.device("cpu"))
                self.draws.append(float(torch.rand(())))
        hyper = {k: torch.zeros_like(v) for k, v in problem.hparams.items()}
        return hyper, hg.Info(method=self.name, outer_loss=0.0)


@pytest.mark.parametrize("mode", ["train_loss", "own loss", "closure"])
def test_the_window_records_the_random_state_before_every_step(mode):
    loop_draws = []

    def noisy_loss(m, h, batch):  # draws like dropout does, first thing in the loss
        r = torch.rand(())
        loop_draws.append(float(r))
        return train_loss(m, h, batch) + 0.0 * r

    method = ReplayDraws()
    torch.manual_seed(11)  # without train_loss, the first step's state is the constructor's
    model, hopt = build(method, inner_steps=3, train_loss=noisy_loss)
    for batch in batches(6):
        if mode == "train_loss":
            torch.rand(5)  # other draws between the steps (augmentation, ...)
            hopt.zero_grad()
            hopt.train_loss(batch).backward()
            hopt.step(batch)
        elif mode == "own loss":
            hopt.zero_grad()
            noisy_loss(model, hopt.hparams, batch).backward()
            hopt.step(batch)
        else:

            def closure(batch=batch):
                hopt.zero_grad()
                loss = noisy_loss(model, hopt.hparams, batch)
                loss.backward()
                return loss

            hopt.step(batch, closure=closure)
    assert len(loop_draws) == 6 and len(set(loop_draws)) == 6
    assert method.draws == loop_draws
