"""HyperOptimizer data given as a one-pass generator: the error says so, and changes nothing.

``val_data`` may be "an iterable of batches (cycled)"; a generator cannot be cycled, and once
spent the hyper-step raised "`val_data` yields no batches." after it had yielded them. The
message now names the cause and the fix. The failed step is undone (model, hyperparameters).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import hypergradient as hg


def _setup(val_data):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    X = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randn(8, 1, dtype=torch.float64)

    def train_loss(m, hp, b):
        return ((m(b[0]) - b[1]) ** 2).mean() + hp["decay"].sum() * (m.weight**2).sum()

    def val_loss(m, hp, b):
        return ((m(b[0]) - b[1]) ** 2).mean()

    hopt = hg.HyperOptimizer(
        model,
        {"decay": hg.Positive(torch.tensor(0.1, dtype=torch.float64))},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=val_data(X, y),
        method=hg.T1T2(),
        inner_steps=1,
    )
    return hopt, model, (X, y)


def _step(hopt, batch):
    hopt.zero_grad()
    hopt.train_loss(batch).backward()
    hopt.step(batch)


def test_a_spent_generator_is_named_and_the_step_changes_nothing():
    hopt, model, batch = _setup(lambda X, y: ((X, y) for _ in range(2)))
    _step(hopt, batch)
    _step(hopt, batch)
    weights = [p.detach().clone() for p in model.parameters()]
    raw = [r.detach().clone() for r in hopt.raw_hparams()]
    with pytest.raises(ValueError, match=r"`val_data` is an iterator .* ran out after 2 batches"):
        _step(hopt, batch)
    assert hopt.hyper_steps == 2
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(raw, hopt.raw_hparams()))


@pytest.mark.parametrize(
    "data",
    [
        lambda X, y: [(X, y), (X, y)],  # re-iterable: cycled
        lambda X, y: itertools.cycle([(X, y)]),  # an endless iterator
    ],
)
def test_re_iterable_and_endless_data_keep_going(data):
    hopt, _, batch = _setup(data)
    for _ in range(4):
        _step(hopt, batch)
    assert hopt.hyper_steps == 4


def test_an_empty_iterable_still_says_it_yields_nothing():
    hopt, _, batch = _setup(lambda X, y: [])
    with pytest.raises(ValueError, match="`val_data` yields no batches"):
        _step(hopt, batch)
