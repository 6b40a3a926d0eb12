"""Weight-normalized layers: torch's double backward of ``torch._weight_norm`` (behind
``nn.utils.parametrizations.weight_norm`` and the legacy ``nn.utils.weight_norm``, ``dim`` the
first or last axis) treats the norm as a constant, so every second-order product through
such a layer is wrong while the gradients are right. ``HyperOptimizer`` said nothing and
applied hypergradients 2e-5 (Unrolled) to 1.6e-4 (Implicit + Exact) off on a small net; it
now warns at construction, naming ``hvp="first_order"``, which is right (checked here
against central differences of the real training run).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import hypergradient as hg
from hypergradient.hyperoptimizer.weight_norm import fused_double_backward_is_wrong

DT = torch.float64
GEN = torch.Generator().manual_seed(3)


def sample(n):
    return torch.randn(n, 4, generator=GEN, dtype=DT), torch.randint(0, 3, (n,), generator=GEN)


BATCHES, VAL = [sample(8) for _ in range(3)], sample(10)
ce = nn.functional.cross_entropy


def make(norm=parametrizations.weight_norm, dim=0):
    torch.manual_seed(1)
    return nn.Sequential(norm(nn.Linear(4, 5), dim=dim), nn.Tanh(), nn.Linear(5, 3)).double()


def train_loss(m, h, b):
    return ce(m(b[0]), b[1]) + 0.5 * h["decay"] * sum((p**2).sum() for p in m.parameters())


def val_loss(m, h, b):
    return ce(m(b[0]), b[1])


def hyperoptimizer(model, method, decay=0.05):
    return hg.HyperOptimizer(
        model,
        {"decay": torch.tensor(decay, dtype=DT)},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.0),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=VAL,
        method=method,
        inner_steps=len(BATCHES),
    )


def warned(model, method) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hyperoptimizer(model, method)
    return any("weight norm" in str(w.message) for w in caught)


pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # legacy weight_norm


@pytest.mark.skipif(not fused_double_backward_is_wrong(), reason="this torch is fixed")
@pytest.mark.parametrize("norm", [parametrizations.weight_norm, nn.utils.weight_norm])
@pytest.mark.parametrize(
    "method",
    [
        lambda: hg.IFT(),
        lambda: hg.HOAG(),
        lambda: hg.Implicit(hg.CG()),
        lambda: hg.Unrolled(),
        lambda: hg.ForwardMode(),
        lambda: hg.DrMAD(),
    ],
    ids=["ift", "hoag", "implicit", "unrolled", "forward", "drmad"],
)
def test_methods_with_second_order_products_warn(norm, method):
    for dim in (0, 1):  # the first and the last axis of the 5x4 weight: the fused kernel
        assert warned(make(norm, dim), method())


@pytest.mark.parametrize(
    "method",
    [lambda: hg.T1T2(), lambda: hg.Unrolled(hvp="first_order"), lambda: hg.IFT(hvp="first_order")],
    ids=["t1t2", "unrolled-first-order", "ift-first-order"],
)
def test_no_warning_where_the_products_are_right(method):
    assert not warned(make(), method())
    assert not warned(make(dim=None), hg.Unrolled())  # the whole-tensor norm: composite


def test_the_product_mode_named_in_the_warning_gives_the_run_s_hypergradient():
    def run(method):
        model = make()
        hopt = hyperoptimizer(model, method)
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hg.HypergradientWarning)
            for b in BATCHES:
                hopt.zero_grad()
                hopt.train_loss(b).backward()
                hopt.step(b)
        return float(hopt.history[-1].hypergrad["decay"])

    def plain(decay):
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        h = {"decay": torch.tensor(decay, dtype=DT)}
        for b in BATCHES:
            opt.zero_grad()
            train_loss(model, h, b).backward()
            opt.step()
        return float(val_loss(model, h, VAL).detach())

    eps = 1e-5
    fd = (plain(0.05 + eps) - plain(0.05 - eps)) / (2 * eps)
    assert abs(run(hg.Unrolled(hvp="first_order")) - fd) < 1e-8 * max(1.0, abs(fd))
    assert abs(run(hg.ForwardMode(hvp="first_order")) - fd) < 1e-8 * max(1.0, abs(fd))
