"""A checkpoint records which inner-optimizer settings its hyperparameters drive
(``optimizer_hparams``): resuming with other links would tune a value the optimizer no
longer reads (or start driving a setting the run never tuned), so it is refused before
anything changes; the same links load, and checkpoints from before the entry still load."""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg

D = torch.float64
g = torch.Generator().manual_seed(0)
X, Xv = torch.randn(32, 4, generator=g, dtype=D), torch.randn(16, 4, generator=g, dtype=D)
y, yv = X @ torch.ones(4, dtype=D), Xv @ torch.ones(4, dtype=D)


def mse(m, h, b):
    return ((m(b[0]).squeeze(1) - b[1]) ** 2).mean()


def build(links):
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 1).double()
    hopt = hg.HyperOptimizer(
        m,
        {"lr": hg.Positive(torch.tensor(0.05, dtype=D))},
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.05),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.1),
        train_loss=mse,
        val_loss=mse,
        val_data=(Xv, yv),
        method=hg.Unrolled(),
        inner_steps=3,
        optimizer_hparams=links,
    )
    return m, hopt


def train(m, hopt, steps):
    for _ in range(steps):
        hopt.zero_grad()
        hopt.train_loss((X, y)).backward()
        hopt.step((X, y))


def test_other_links_are_refused_before_anything_changes():
    m, hopt = build({"lr": "lr"})
    train(m, hopt, 6)
    state = hopt.state_dict()
    assert state["hparams"]["links"] == {"lr": "lr"}
    m2, other = build(None)
    before = other.state_dict()
    with pytest.raises(ValueError, match="links optimizer settings"):
        other.load_state_dict(state)
    after = other.state_dict()
    assert torch.equal(after["hparams"]["raw"]["lr"], before["hparams"]["raw"]["lr"])
    assert other.hyper_steps == 0 and len(other.history) == 0


def test_the_same_links_load_and_resume_the_run():
    m, hopt = build({"lr": "lr"})
    train(m, hopt, 6)
    state = hopt.state_dict()
    m2, same = build({"lr": "lr"})
    m2.load_state_dict(m.state_dict())
    same.inner_optimizer.load_state_dict(hopt.inner_optimizer.state_dict())
    same.load_state_dict(state)
    train(m, hopt, 3)
    train(m2, same, 3)
    assert torch.equal(same.hparams["lr"], hopt.hparams["lr"])
    assert same.inner_optimizer.param_groups[0]["lr"] == float(hopt.hparams["lr"])
    assert hopt.hparams["lr"].item() != 0.05  # the hyper-steps moved it


def test_a_checkpoint_without_the_entry_still_loads():
    m, hopt = build({"lr": "lr"})
    train(m, hopt, 3)
    state = hopt.state_dict()
    del state["hparams"]["links"]
    _, again = build({"lr": "lr"})
    again.load_state_dict(state)
    assert torch.equal(again.hparams["lr"], hopt.hparams["lr"])
