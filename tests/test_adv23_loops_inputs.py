"""Two findings of round 23's loop testing.

- ``val_data=()`` or ``[]`` was accepted at construction and refused at the first
  hyper-step ("yields no batches"), ``inner_steps`` training steps later; now refused at
  once, naming the argument (``holdout_data`` too).
- A trajectory method whose hypergradient was infinite because a derivative of the loss is
  (``sqrt`` of a hyperparameter at 0) said "The reverse pass overflowed: lower the learning
  rate or the number of steps": forward mode has no reverse pass, and the advice does not
  fix it. The message now names both causes.
"""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg

DT = torch.float64
G = torch.Generator().manual_seed(0)
X, Y = torch.randn(40, 4, generator=G, dtype=DT), torch.randn(40, generator=G, dtype=DT)


def build(**kw):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).to(DT)
    hp = kw.pop("hparams", {"decay": hg.Positive(torch.full((4,), 0.1, dtype=DT))})
    args = dict(
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=lambda r: torch.optim.SGD(r, lr=0.1),
        train_loss=lambda m, h, b: (
            ((m(b[0]).squeeze(1) - b[1]) ** 2).mean() + 0.5 * (h["decay"] * m.weight[0] ** 2).sum()
        ),
        val_loss=lambda m, h, b: ((m(b[0]).squeeze(1) - b[1]) ** 2).mean(),
        val_data=(X[20:], Y[20:]),
        inner_steps=2,
    )
    return model, hg.HyperOptimizer(model, hp, **{**args, **kw})


@pytest.mark.parametrize("empty", [(), []], ids=["tuple", "list"])
@pytest.mark.parametrize("name", ["val_data", "holdout_data"])
def test_empty_data_is_refused_at_construction(name, empty):
    with pytest.raises(ValueError, match=rf"`{name}` is an empty"):
        build(**{name: empty})


@pytest.mark.parametrize("method", [hg.Unrolled, hg.ForwardMode, hg.DrMAD])
def test_an_infinite_derivative_names_its_cause(method):
    """d/ds sqrt(s) at s = 0 is infinite: the message says so, and the step is undone."""
    hp = {"s": torch.tensor([0.0, 1.0], dtype=DT)}

    def train(m, h, b):
        fit = ((m(b[0]).squeeze(1) - b[1]) ** 2).mean()
        return fit * (1 + h["s"].sqrt().sum())

    model, hopt = build(hparams=hp, train_loss=train, method=method())
    batch = (X[:20], Y[:20])
    hopt.zero_grad()
    hopt.train_loss(batch).backward()
    hopt.step(batch)
    hopt.zero_grad()
    hopt.train_loss(batch).backward()
    with pytest.raises(hg.NonFiniteHypergradientError, match="infinite or undefined") as err:
        hopt.step(batch)
    assert "hg.Positive" in str(err.value) and "reverse pass overflowed" not in str(err.value)
    assert torch.equal(hp["s"], torch.tensor([0.0, 1.0], dtype=DT)) and hopt.hyper_steps == 0


OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "Adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=0.01),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=0.01),
    "NAdam": lambda p: torch.optim.NAdam(p, lr=0.01),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.01),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("method", [hg.T1T2, hg.IFT])
def test_t1t2_over_an_optimizer_it_does_not_differentiate_warns_once(name, method):
    """T1T2 takes RMSprop's (NAdam's, ...) step as SGD's with the learning rate: its
    hypergradient can have the wrong sign; it said nothing. SGD, Adam and AdamW are exact,
    and IFT does not differentiate the step: no warning for them."""
    import warnings

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).to(DT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hg.HyperOptimizer(
            model, {"decay": torch.full((4,), 0.1, dtype=DT)},
            inner_optimizer=OPTIMIZERS[name](model.parameters()),
            outer_optimizer=lambda r: torch.optim.SGD(r, lr=0.1),
            train_loss=lambda m, h, b: m(b[0]).sum(), val_loss=lambda m, h, b: m(b[0]).sum(),
            val_data=(X,), method=method(),
        )  # fmt: skip
    ours = [w for w in caught if issubclass(w.category, hg.HypergradientWarning)]
    inexact = method is hg.T1T2 and name not in ("SGD", "Adam", "AdamW")
    assert len(ours) == int(inexact), [str(w.message) for w in ours]
    if inexact:
        assert f"takes a {name} step" in str(ours[0].message) and ours[0].filename == __file__
