"""A prebuilt ``HyperParameters`` whose optimizer-setting links contradict the other
arguments: refused at construction, before the inner optimizer's settings are written.

Before the fix, ``optimizer_hparams`` was ignored silently when ``hparams`` was a
``HyperParameters``, and an implicit method (which cannot tune an optimizer setting) was
accepted with its links: the learning rate was overwritten by a hyperparameter whose
hypergradient is always zero.
"""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg
from hypergradient.hyperoptimizer import HyperParameters


def make(method, **kw):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    hp = HyperParameters(
        {"lr": hg.Positive(0.3)},
        device=torch.device("cpu"),
        inner_optimizer=inner,
        links={"lr": "lr"},
    )

    def build():
        return hg.HyperOptimizer(
            model,
            hp,
            inner_optimizer=inner,
            outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            train_loss=lambda m, h, b: (m(b) ** 2).mean(),
            val_loss=lambda m, h, b: (m(b) ** 2).mean(),
            val_data=torch.randn(8, 3),
            method=method,
            **kw,
        )

    return inner, build


@pytest.mark.parametrize(
    "method, kw, match",
    [
        (hg.IFT(), {}, "IFT differentiates at the current parameters"),
        (hg.T1T2(), {}, "T1T2 differentiates at the current parameters"),
        (hg.Unrolled(), {"optimizer_hparams": {"momentum": "lr"}}, "differs from the links"),
    ],
    ids=["ift", "t1t2", "other-links"],
)
def test_contradicting_links_are_refused_before_any_setting_is_written(method, kw, match):
    inner, build = make(method, **kw)
    with pytest.raises(ValueError, match=match):
        build()
    assert inner.param_groups[0]["lr"] == 0.1 and inner.param_groups[0]["momentum"] == 0.5


def test_the_same_links_or_none_are_accepted_and_written():
    for kw in ({}, {"optimizer_hparams": {"lr": "lr"}}):
        inner, build = make(hg.Unrolled(), **kw)
        build()
        assert inner.param_groups[0]["lr"] == float(torch.tensor(0.3).log().exp())


F32_MAX = torch.finfo(torch.float32).max


@pytest.mark.parametrize(
    "make, what",
    [
        (lambda: hg.Positive(torch.tensor([1.0, F32_MAX])), "reached inf"),
        (lambda: hg.Interval(0.5, 0.0, 1e308), "is not finite"),
        (lambda: hg.Interval(torch.tensor([0.0]), -1e38, 3e38), "is not finite"),
    ],
    ids=["positive-float32-max", "interval-tiny-ratio", "interval-overflowing-width"],
)
def test_a_constraint_refuses_a_value_its_dtype_cannot_hold(make, what):
    """Before: built with raw = inf or -inf and value inf or NaN; the error came later, from
    the HyperOptimizer, as 'Initially, ... start inside its domain' (it was inside)."""
    with pytest.raises(ValueError, match=f"cannot hold .* in torch.float32: .*{what}"):
        make()


def test_the_same_values_in_float64_are_held_exactly():
    big = torch.tensor([1.0, F32_MAX], dtype=torch.float64)
    assert torch.allclose(hg.Positive(big).value, big, rtol=1e-13, atol=0)
    c = hg.Interval(torch.tensor([0.0, 1e30], dtype=torch.float64), -1e38, 3e38)
    assert torch.allclose(c.value, torch.tensor([0.0, 1e30], dtype=torch.float64), atol=1e23)


DT = torch.float64
_g = torch.Generator().manual_seed(0)
XT, YT = torch.randn(40, 4, generator=_g, dtype=DT), torch.randn(40, generator=_g, dtype=DT)
XV, YV = torch.randn(30, 4, generator=_g, dtype=DT), torch.randn(30, generator=_g, dtype=DT)


def _ridge(method):
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 1).double()

    def tl(m, h, b):
        penalty = 0.5 * (h["d"] * m.weight.reshape(-1) ** 2).sum()
        return 0.5 * ((m(b[0]).reshape(-1) - b[1]) ** 2).mean() + penalty

    def vl(m, h, b):
        return 0.5 * ((m(b[0]).reshape(-1) - b[1]) ** 2).mean()

    hopt = hg.HyperOptimizer(
        m,
        {"d": hg.Positive(torch.full((4,), 0.1, dtype=DT))},
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.1),
        train_loss=tl,
        val_loss=vl,
        val_data=(XV, YV),
        method=method,
        inner_steps=3,
    )
    return m, hopt


@pytest.mark.parametrize("method", [hg.IFT, hg.Unrolled], ids=["ift", "unrolled"])
def test_a_hyper_step_under_inference_mode_is_refused_before_anything_changes(method):
    """Before: autograd saw inference tensors, every hypergradient was exactly zero, and
    the zero was applied (Adam's momentum still moved the hyperparameters)."""
    m, hopt = _ridge(method())
    for _ in range(2):
        hopt.zero_grad()
        hopt.train_loss((XT, YT)).backward()
        hopt.step((XT, YT))
    weights, raw = m.weight.detach().clone(), hopt.raw_hparams()[0].detach().clone()
    hopt.zero_grad()
    hopt.train_loss((XT, YT)).backward()
    with torch.inference_mode(), pytest.raises(ValueError, match="torch.inference_mode"):
        hopt.step((XT, YT))
    assert hopt.loop.count == 2 and hopt.hyper_steps == 0
    assert torch.equal(m.weight, weights) and torch.equal(hopt.raw_hparams()[0], raw)


def test_end_step_under_inference_mode_takes_the_plain_loops_hyper_step():
    """begin_step outside, the optimizer's step and end_step under inference mode (a loop
    that wraps its update in it): the hyper-step is the plain loop's (an identity between
    the two loops; before, it was zero)."""
    runs = []
    for wrapped in (False, True):
        m, hopt = _ridge(hg.IFT(hg.CG(maxiter=10, tol=1e-12)))
        for _ in range(3):
            hopt.zero_grad()
            hopt.begin_step()
            hopt.train_loss((XT, YT)).backward()
            if wrapped:
                with torch.inference_mode():
                    hopt.inner_optimizer.step()
                    hopt.end_step((XT, YT))
            else:
                hopt.inner_optimizer.step()
                hopt.end_step((XT, YT))
        runs.append(hopt.history[-1].hypergrad["d"])
    assert runs[0].abs().min() > 0
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("batch_size", [None, 7])
def test_a_single_tensor_as_data_gives_tensor_batches(batch_size):
    """An autoencoder's ``val_data=X`` (one tensor): the losses get tensors, as the training
    loop passes them, not 1-tuples (before: ``m(batch)`` failed at the first hyper-step
    with "linear(): argument 'input' must be Tensor, not tuple"). Reference: the same rows
    as ``val_data=(X,)`` and the same hyper-step as its loss on ``batch[0]``."""
    from hypergradient.hyperoptimizer import BatchSampler

    bare, wrapped = BatchSampler(XV, batch_size, 3), BatchSampler((XV,), batch_size, 3)
    for _ in range(3):
        a, (b,) = bare.next(), wrapped.next()
        assert isinstance(a, torch.Tensor) and torch.equal(a, b)

    def run(data, unwrap):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Tanh(), torch.nn.Linear(2, 4))
        m = m.double()

        def loss(m, h, b):
            b = b[0] if unwrap else b
            return ((m(b) - b) ** 2).mean() + (h["d"] * m[0].weight ** 2).sum()

        hopt = hg.HyperOptimizer(
            m,
            {"d": hg.Positive(torch.full((2, 4), 0.1, dtype=DT))},
            inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
            outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.1),
            train_loss=loss,
            val_loss=loss,
            val_data=data,
            val_batch_size=batch_size,
            method=hg.IFT(hg.CG(maxiter=40), damping=1.0),
            inner_steps=2,
        )
        for _ in range(4):
            hopt.zero_grad()
            hopt.train_loss(data).backward()
            hopt.step(data)
        return hopt.history[-1].hypergrad["d"]

    assert torch.equal(run(XV, False), run((XV,), True))
