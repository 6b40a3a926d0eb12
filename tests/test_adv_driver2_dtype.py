"""``model.double()`` (or ``.to(device)``) after the hyper-optimizer was built, inside a
trajectory window: the window's start copies keep the old dtype, and the replay used to
fail deep in torch (``mat1 and mat2 must have the same dtype``), rolling back the user's
step and raising at every later hyper-step. Now that window's hyper-step is skipped with
a warning naming the move; the next window, recorded at the new dtype, gives the exact
hypergradient (central finite differences of the plain torch loop over its steps)."""

from __future__ import annotations

import copy

import pytest
import torch

import hypergradient as hg

torch.manual_seed(0)
X, Y = torch.randn(40, 5), torch.randn(40)
XV, YV = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, dtype=torch.float64)


def train_loss(m, h, b):
    w = m.weight.reshape(-1)
    return ((m(b[0]).reshape(-1) - b[1]) ** 2).mean() + (h["decay"].to(w.dtype) * w**2).sum()


def val_loss(m, h, b):
    return ((m(b[0]).reshape(-1) - b[1]) ** 2).mean()


def _batch(i):
    return X[i * 8 : (i + 1) * 8].double(), Y[i * 8 : (i + 1) * 8].double()


def _plain(model, opt_state, decay, steps):
    """The user's loop without the hyper-optimizer, from a copy of the window's start."""
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    opt.load_state_dict(copy.deepcopy(opt_state))
    for i in steps:
        opt.zero_grad()
        train_loss(m, {"decay": decay}, _batch(i)).backward()
        opt.step()
    with torch.no_grad():
        return val_loss(m, None, (XV, YV))


@pytest.mark.parametrize("method", [hg.Unrolled(), hg.ForwardMode()], ids=["Unrolled", "Fwd"])
def test_model_moved_to_float64_inside_a_window(method):
    torch.manual_seed(1)
    model = torch.nn.Linear(5, 1)
    decay = torch.full((5,), 0.05, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    hopt = hg.HyperOptimizer(
        model,
        {"decay": decay},
        inner_optimizer=opt,
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.0),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(XV, YV),
        method=method,
        inner_steps=2,
    )
    x, y = _batch(0)
    hopt.zero_grad()
    hopt.train_loss((x.float(), y.float())).backward()
    hopt.step((x.float(), y.float()))
    model.double()  # mid-window
    with pytest.warns(hg.HypergradientWarning, match=r"float32 on cpu to torch.float64"):
        for i in (1,):
            hopt.zero_grad()
            hopt.train_loss(_batch(i)).backward()
            hopt.step(_batch(i))
    assert (hopt.hyper_steps, hopt.skipped) == (0, 1)
    start, opt_state = copy.deepcopy(model), copy.deepcopy(opt.state_dict())
    for i in (2, 3):
        hopt.zero_grad()
        hopt.train_loss(_batch(i)).backward()
        hopt.step(_batch(i))
    assert (hopt.hyper_steps, hopt.skipped) == (1, 1)
    got = hopt.history[-1].hypergrad["decay"]
    eps, ref = 1e-6, torch.zeros(5, dtype=torch.float64)
    for j in range(5):
        e = torch.zeros(5, dtype=torch.float64)
        e[j] = eps
        hi = _plain(start, opt_state, decay + e, (2, 3))
        lo = _plain(start, opt_state, decay - e, (2, 3))
        ref[j] = (hi - lo) / (2 * eps)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-10)
