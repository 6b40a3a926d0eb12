"""A hyperparameter held as a buffer of the model (``register_buffer``, saved with its
``state_dict``) and passed as ``hparams={"decay": model.decay}``.

The numbers were right (bit-identical to a separate tensor), but T1T2 and the trajectory
methods warned "The training forward passes update the buffer(s) 'decay' ... the
hypergradient is approximate": the outer optimizer moved it, at a hyper-step, so every step
of a window saw one value. The warning now leaves such buffers out (and still names a
buffer the forward passes update).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

GEN = torch.Generator().manual_seed(0)
X = torch.randn(40, 3, generator=GEN, dtype=torch.float64)
Y = torch.randn(40, 1, generator=GEN, dtype=torch.float64)


class Net(torch.nn.Module):
    def __init__(self, counter=False):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.register_buffer("decay", torch.tensor(0.05))
        self.counter = counter
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        if self.counter and self.training:
            self.calls += 1
        return self.lin(x)


def train_loss(m, h, b):
    return ((m(b[0]) - b[1]) ** 2).mean() + h["d"] * (m.lin.weight**2).sum()


def val_loss(m, h, b):
    return ((m(b[0]) - b[1]) ** 2).mean()


def run(method, alias, counter=False):
    torch.manual_seed(1)
    model = Net(counter).double()
    hopt = hg.HyperOptimizer(
        model,
        {"d": model.decay if alias else model.decay.clone()},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=lambda r: torch.optim.SGD(r, lr=1.0),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(X, Y),
        method=method,
        inner_steps=2,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(6):
            b = (X[6 * i : 6 * i + 6], Y[6 * i : 6 * i + 6])
            hopt.zero_grad()
            hopt.train_loss(b).backward()
            hopt.step(b)
    messages = [str(w.message) for w in caught if "update the buffer" in str(w.message)]
    return model, hopt, messages


@pytest.mark.parametrize("method", [hg.T1T2, hg.Unrolled])
def test_a_hyperparameter_held_in_a_buffer_is_not_reported_as_a_training_update(method):
    model, hopt, messages = run(method(), alias=True)
    ref_model, ref, _ = run(method(), alias=False)
    assert messages == []
    assert hopt.hyper_steps == ref.hyper_steps == 3
    assert torch.equal(hopt.hparams["d"], ref.hparams["d"]) and hopt.hparams["d"] != 0.05
    assert torch.equal(model.decay, hopt.hparams["d"])  # the buffer is the hyperparameter
    assert torch.equal(model.lin.weight, ref_model.lin.weight)


def test_a_buffer_the_forward_passes_update_is_still_named():
    _, _, messages = run(hg.T1T2(), alias=True, counter=True)
    assert len(messages) == 1 and "'calls'" in messages[0] and "'decay'" not in messages[0]
