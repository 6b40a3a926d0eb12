"""A trajectory method's ``hopt.step(batch)`` without ``backward()`` inside its window.

The torch optimizer skips every parameter without ``.grad``: the weights stay put, while
``Unrolled``/``ForwardMode``/``DrMAD`` replay the window's steps from ``train_loss``, this
one included. With weights of norm ~14 and lr 0.01, the replay ended 1.7e-2 (relative) from
the weights, under the 10% skip bound, and Unrolled applied -22.7 where the exact
hypergradient of the run trained (that step a no-op) is -17.6 (29% off, with only the
generic "replay ended away" warning). The same after ``zero_grad(set_to_none=False)``
(gradients all zeros), for the trajectory methods and T1T2's hyper-step. As T1T2's
hyper-step without gradients already was, such a step is now refused before anything
changes; a ``closure`` computes the gradients itself.
"""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg

GEN = torch.Generator().manual_seed(0)
X = torch.randn(60, 3, generator=GEN, dtype=torch.float64)
Y = torch.randn(60, 1, generator=GEN, dtype=torch.float64)
LR, D0 = 0.01, 0.05


def train_loss(m, h, b):
    return ((m(b[0]) - b[1]) ** 2).mean() + h["d"] * (m.weight**2).sum()


def val_loss(m, h, b):
    return ((m(b[0]) - b[1]) ** 2).mean()


def batch(i):
    return X[10 * i : 10 * i + 10], Y[10 * i : 10 * i + 10]


def make(method, bias=True):
    model = torch.nn.Linear(3, 1, bias=bias).double()
    with torch.no_grad():
        model.weight.fill_(8.0)
        if bias:
            model.bias.fill_(0.5)
    inner = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.5)
    hopt = hg.HyperOptimizer(
        model,
        {"d": torch.tensor(D0, dtype=torch.float64)},
        inner_optimizer=inner,
        outer_optimizer=lambda r: torch.optim.SGD(r, lr=1.0),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(X, Y),
        method=method,
        inner_steps=4,
    )
    return model, inner, hopt


METHODS = [hg.Unrolled, hg.ForwardMode, hg.DrMAD]


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_a_step_without_backward_in_a_window_is_refused_before_anything_changes(
    method, set_to_none
):
    model, inner, hopt = make(method())
    hopt.zero_grad()
    hopt.train_loss(batch(0)).backward()
    hopt.step(batch(0))
    hopt.zero_grad(set_to_none=set_to_none)  # ... and no backward
    weights = [p.detach().clone() for p in model.parameters()]
    state = [v["momentum_buffer"].clone() for v in inner.state.values()]
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"no gradient on any trained parameter.*closure="):
        hopt.step(batch(1))
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert all(torch.equal(a, v["momentum_buffer"]) for a, v in zip(state, inner.state.values()))
    assert torch.equal(rng, torch.get_rng_state())
    assert hopt.loop.count == 1 and hopt.hyper_steps == 0 and hopt.skipped == 0
    assert hopt.hparams["d"].item() == D0

    # the loop goes on: the window is the steps taken, and its hypergradient exact
    for i in (1, 2, 3):
        hopt.zero_grad()
        hopt.train_loss(batch(i)).backward()
        hopt.step(batch(i))
    assert hopt.hyper_steps == 1
    if method is not hg.DrMAD:  # DrMAD's straight-line path approximates
        ref = _exact_hypergradient(range(4))
        torch.testing.assert_close(D0 - hopt.hparams["d"].item(), ref, rtol=1e-9, atol=0)


def _exact_hypergradient(steps):
    d = torch.tensor(D0, dtype=torch.float64, requires_grad=True)
    w = torch.full((1, 3), 8.0, dtype=torch.float64, requires_grad=True)
    b = torch.full((1,), 0.5, dtype=torch.float64, requires_grad=True)
    bufs = None
    for i in steps:
        x, y = batch(i)
        loss = ((x @ w.T + b - y) ** 2).mean() + d * (w**2).sum()
        gw, gb = torch.autograd.grad(loss, (w, b), create_graph=True)
        bufs = (gw, gb) if bufs is None else (0.5 * bufs[0] + gw, 0.5 * bufs[1] + gb)
        w, b = w - LR * bufs[0], b - LR * bufs[1]
    return torch.autograd.grad(((X @ w.T + b - Y) ** 2).mean(), d)[0].item()


def test_a_closure_computes_the_gradients_itself():
    model, inner, hopt = make(hg.Unrolled())
    for i in range(4):

        def closure(i=i):
            hopt.zero_grad()
            loss = hopt.train_loss(batch(i))
            loss.backward()
            return loss

        hopt.zero_grad()
        hopt.step(batch(i), closure)
    assert hopt.hyper_steps == 1
    ref = _exact_hypergradient(range(4))
    torch.testing.assert_close(D0 - hopt.hparams["d"].item(), ref, rtol=1e-9, atol=0)


def test_implicit_methods_still_step_without_backward():
    model, inner, hopt = make(hg.IFT(hg.CG(maxiter=5)))
    for i in range(4):
        hopt.zero_grad()
        hopt.step(batch(i))  # IFT differentiates at the current weights
    assert hopt.hyper_steps == 1


def test_t1t2_hyper_step_after_zeroed_gradients_is_refused():
    model, inner, hopt = make(hg.T1T2())
    for i in range(3):
        hopt.zero_grad()
        hopt.train_loss(batch(i)).backward()
        hopt.step(batch(i))
    hopt.zero_grad(set_to_none=False)  # zeros, no backward: T1T2 would differentiate a step
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"None or zeros"):
        hopt.step(batch(3))
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert hopt.loop.count == 3 and hopt.hyper_steps == 0


@pytest.mark.parametrize("method", [*METHODS, hg.T1T2])
def test_gradients_zero_only_at_their_first_entries_are_gradients(method):
    """A step whose gradients are 0 at their first entries (an input feature that is 0 on
    the batch, its weight's gradient 0 with that weight 0; no bias) and nonzero elsewhere is
    a gradient step (``solvers.extremes.nonzero`` reads the first entry before scanning)."""
    model, inner, hopt = make(method(), bias=False)
    with torch.no_grad():
        model.weight[0, 0] = 0.0
    for i in range(4):
        x, y = batch(i)
        x = torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:]], 1)
        hopt.zero_grad()
        hopt.train_loss((x, y)).backward()
        assert model.weight.grad[0, 0] == 0 and model.weight.grad.abs().sum() > 0
        hopt.step((x, y))
    assert hopt.hyper_steps == 1


@pytest.mark.parametrize("shape", [(), (1,), (5,), (3, 4), (2, 3, 4), (0,), (3000,)])
@pytest.mark.parametrize("fill", ["zeros", "first", "last", "nan", "neg_zero", "random"])
def test_the_probe_answers_as_tensor_any(shape, fill):
    from hypergradient.solvers.extremes import nonzero

    g = torch.zeros(shape)
    flat = g.view(-1)
    if flat.numel():
        if fill == "first":
            flat[0] = 1e-30
        elif fill == "last":
            flat[-1] = -2.0
        elif fill == "nan":
            flat[-1] = float("nan")
        elif fill == "neg_zero":
            flat.fill_(-0.0)
        elif fill == "random":
            flat.copy_(torch.randn(flat.numel(), generator=torch.Generator().manual_seed(1)))
    assert nonzero(g) == bool(g.any())
    assert nonzero(g.t() if g.dim() == 2 else g) == bool(g.any())  # a strided view
