"""A hyperparameter whose hypergradient is zero under ``HyperOptimizer``: the warning advises
in the hyper-optimizer's terms.

A model buffer passed as a hyperparameter (``hparams={"temp": model.temp}``) but read by
``forward()`` rather than through the losses' ``hparams`` argument gets a zero hypergradient:
the hyper-step differentiates what ``train_loss``/``val_loss`` read through ``h``. The
warning fired, but advised "Check that inner_loss, outer_loss or the optimizer's settings
use it ... (a tensor read by reference needs hparams_by_reference=True)" (Unrolled,
DrMAD, ForwardMode) or "Check that inner_loss or outer_loss uses it" (IFT, T1T2, HOAG):
names of the functional API, and an option ``HyperOptimizer`` does not have. It now names
the buffer and says what to do (read ``h['temp']`` in the losses and pass it to the model),
which the last test shows gives the hypergradient.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

DT = torch.float64
BCE = torch.nn.functional.binary_cross_entropy_with_logits
GEN = torch.Generator().manual_seed(0)
X = torch.randn(48, 5, generator=GEN, dtype=DT)
Y = (X[:, 0] + 0.3 * torch.randn(48, generator=GEN, dtype=DT) > 0).to(DT)
METHODS = {
    "IFT": lambda: hg.IFT(hg.CG(maxiter=20), damping=0.1),
    "T1T2": hg.T1T2,
    "HOAG": hg.HOAG,
    "Unrolled": hg.Unrolled,
    "ForwardMode": hg.ForwardMode,
    "DrMAD": hg.DrMAD,
}
TRAJECTORY = {"Unrolled", "ForwardMode", "DrMAD"}


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 1).double()
        self.register_buffer("temp", torch.tensor(2.0, dtype=DT))

    def forward(self, x, temp=None):
        return self.lin(x).reshape(-1) / (self.temp if temp is None else temp)


def in_forward(m, h, b):  # the buffer, read by forward(): h["temp"] is not read
    return BCE(m(b[0]), b[1])


def through_h(m, h, b):  # the advice followed
    return BCE(m(b[0], temp=h["temp"]), b[1])


def run(method, loss, hparams=None):
    torch.manual_seed(1)
    model = Net()
    hopt = hg.HyperOptimizer(
        model,
        hparams or {"temp": model.temp},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=lambda r: torch.optim.SGD(r, lr=0.1),
        train_loss=loss,
        val_loss=loss,
        val_data=(X, Y),
        val_batch_size=16,
        method=METHODS[method](),
        inner_steps=2,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(2):
            batch = (X[8 * i : 8 * i + 8], Y[8 * i : 8 * i + 8])
            hopt.zero_grad()
            hopt.train_loss(batch).backward()
            hopt.step(batch)
    zero = [str(w.message) for w in caught if "hypergradient is zero" in str(w.message)]
    return hopt, zero


@pytest.mark.parametrize("method", list(METHODS))
def test_a_buffer_read_in_forward_is_named_with_what_to_do(method):
    hopt, zero = run(method, in_forward)
    assert float(hopt.history[-1].hypergrad["temp"].abs()) == 0.0  # the warning is right
    assert len(zero) == 1, zero
    assert "hparams['temp']" in zero[0] and "model's buffer 'temp'" in zero[0]
    assert "read h['temp'] in the losses and pass it to the model" in zero[0]
    assert "hparams_by_reference" not in zero[0] and "inner_loss" not in zero[0]


@pytest.mark.parametrize("method", ["IFT", "T1T2", "Unrolled"])
def test_a_hyperparameter_nothing_reads_gets_the_hyper_optimizer_s_names(method):
    """Not a buffer: the losses' names, ``h[...]``, and (trajectory methods, which
    differentiate the optimizer's settings) ``optimizer_hparams``."""
    hparams = {"temp": torch.tensor(2.0, dtype=DT), "idle": torch.tensor(0.5, dtype=DT)}
    _, zero = run(method, through_h, hparams)
    assert len(zero) == 1 and "hparams['idle']" in zero[0], zero
    assert (
        "Check that train_loss or val_loss reads it through their `hparams` argument" in (zero[0])
    )
    assert "(h['idle'])" in zero[0] and "buffer 'temp'" not in zero[0]
    assert ("optimizer_hparams" in zero[0]) == (method in TRAJECTORY)
    assert "hparams_by_reference" not in zero[0] and "inner_loss" not in zero[0]


def test_the_functional_api_keeps_its_advice_after_a_hyper_optimizer():
    run("Unrolled", in_forward)
    w = torch.zeros(5, dtype=DT)
    h = {"temp": torch.tensor(2.0, dtype=DT), "idle": torch.tensor(1.0, dtype=DT)}

    def inner(p, hp):
        return BCE(X @ p / hp["temp"], Y)

    with pytest.warns(hg.HypergradientWarning, match="hparams_by_reference=True"):
        hg.unrolled(inner, lambda p, hp: BCE(X @ p, Y), w, h, 2, hg.optim.sgd(0.1))


@pytest.mark.parametrize("method", list(METHODS))
def test_the_advice_followed_gives_the_hypergradient(method):
    hopt, zero = run(method, through_h)
    assert not zero
    assert float(hopt.history[-1].hypergrad["temp"].abs()) > 1e-6
