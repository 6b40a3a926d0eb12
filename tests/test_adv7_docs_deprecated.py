"""docs/api/methods.md said ``hg.HyperMethod`` and ``hg.HyperContext`` "still work for one
release"; they are aliases of ``hg.Method`` and ``hg.Problem``, whose interface changed, so
code written against them failed: ``HyperContext(train_loss=...)`` with a TypeError from
``Problem``, and a ``HyperMethod`` subclass implementing the old ``compute(ctx)`` with a bare
``NotImplementedError`` (empty message) at its first hyper-step. The page now says what
porting takes, and ``HyperOptimizer`` refuses such a method at construction, naming the
change, before anything is touched.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg


def _old_method_class() -> type:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        base = hg.HyperMethod

    class OldMethod(base):  # type: ignore[misc,valid-type]
        def compute(self, ctx):  # the previous release's interface
            return torch.zeros_like(ctx.raw), {}

    return OldMethod


def test_old_method_is_refused_at_construction_naming_the_interface():
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    before = [p.detach().clone() for p in model.parameters()]
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    decay = torch.full((1, 2), 0.1)
    x, y = torch.randn(10, 2), torch.randn(10)

    def loss(m, h, b):
        return ((m(b[0]).squeeze(1) - b[1]) ** 2).mean() + (h["d"] * m.weight**2).sum()

    with pytest.raises(TypeError, match=r"__call__\(problem\).*compute\(ctx\)"):
        hg.HyperOptimizer(
            model,
            {"d": decay},
            inner_optimizer=inner,
            outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            train_loss=loss,
            val_loss=loss,
            val_data=(x, y),
            method=_old_method_class()(),
            inner_steps=1,
        )
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert inner.state_dict()["state"] == {} and torch.equal(decay, torch.full((1, 2), 0.1))


def test_calling_a_method_without_call_names_the_interface():
    with pytest.raises(NotImplementedError, match=r"OldMethod must implement __call__"):
        _old_method_class()()(hg.Problem(lambda w, h: w.sum(), lambda w, h: w.sum(), 1, 1))


def test_hypercontext_builds_a_problem_with_its_field_names():
    def f(w, h):
        return 0.5 * ((w - h) ** 2).sum()

    def g(w, h):
        return 0.5 * (w**2).sum()

    w, h = (
        torch.tensor([1.0, 2.0], dtype=torch.float64),
        torch.tensor([1.0, 2.0], dtype=torch.float64),
    )
    with pytest.warns(DeprecationWarning):
        ctx = hg.HyperContext(inner_loss=f, outer_loss=g, params=w, hparams=h, lr=0.1)
    hyper, _ = hg.Implicit(hg.Exact())(ctx)
    # f's minimum is w = h, so g(w*(h)) = |h|^2 / 2 and dg/dh = h
    torch.testing.assert_close(hyper, h, rtol=1e-12, atol=1e-14)
