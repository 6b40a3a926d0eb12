"""``hypergradient._autograd.grad``: ``torch.autograd.grad`` without its Python layer.

The operators' products and ``_tree.dense_grad`` run the autograd engine as
``torch.autograd.grad`` does, skipping its argument handling (25-40 us per call, a fifth of a
31-parameter Hessian-vector product). The gradients are the same bits; whatever the shortcut
would not check is handed to ``torch.autograd.grad`` (same results, same errors).
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import hypergradient as hg
from hypergradient import _autograd

DT = torch.float64


def _graph():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, generator=gen, dtype=DT).requires_grad_(True)
    b = torch.randn(3, generator=gen, dtype=DT).requires_grad_(True)
    unused = torch.randn(2, generator=gen, dtype=DT).requires_grad_(True)
    x = torch.randn(5, 4, generator=gen, dtype=DT)
    loss = torch.tanh(x @ w + b).pow(2).sum()
    return loss, [w, b, unused]


def _same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.equal(a, b)


def test_gradients_and_products_are_torchs_bit_for_bit():
    assert _autograd.DIRECT  # torch >= 2.3 in this environment
    loss, leaves = _graph()
    grads = _autograd.grad((loss,), leaves, create_graph=True)
    want = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    _same(grads, want)
    assert grads[2] is None and grads[0].requires_grad  # unused input; a graph to go on
    flat = torch.cat([grads[0].reshape(-1), grads[1]])
    v = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(1), dtype=DT)
    for _ in range(2):  # the graph is retained
        got = _autograd.grad((flat,), leaves[:2], (v,))
        _same(got, torch.autograd.grad(flat, leaves[:2], v, retain_graph=True))


def test_retain_graph_false_frees_the_graph_as_torch_does():
    loss, leaves = _graph()
    _autograd.grad((loss,), leaves[:2], retain_graph=False)
    with pytest.raises(RuntimeError, match="second time"):
        _autograd.grad((loss,), leaves[:2])


def test_what_the_shortcut_would_not_check_goes_to_torch():
    loss, leaves = _graph()
    out = torch.tanh(leaves[0]).sum(0)  # 3 entries
    with pytest.raises(RuntimeError, match="Mismatch in shape"):
        _autograd.grad((out,), leaves[:1], (torch.ones(4, dtype=DT),))
    with pytest.raises(RuntimeError, match="implicitly created only for scalar"):
        _autograd.grad((out,), leaves[:1])
    with pytest.raises(RuntimeError, match="does not require grad"):
        _autograd.grad((loss.detach(),), leaves[:1])

    class Seen(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.funcs = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.funcs.append(func)
            return func(*args, **(kwargs or {}))

    with Seen() as mode:  # a __torch_function__ mode sees torch.autograd.grad, as without us
        grads = _autograd.grad((loss,), leaves[:2])
    assert torch.autograd.grad in mode.funcs
    _same(grads, torch.autograd.grad(loss, leaves[:2], retain_graph=True))


def test_without_the_engine_call_the_products_are_the_same(monkeypatch):
    """A torch without ``_engine_run_backward``: everything through torch.autograd.grad."""
    gen = torch.Generator().manual_seed(2)
    X, y = torch.randn(40, 6, generator=gen, dtype=DT), torch.randn(40, generator=gen, dtype=DT)

    def f(p, h):
        return ((X @ p[0] + p[1] - y) ** 2).mean() + (h.exp() * p[0] ** 2).sum()

    def g(p, h):
        return ((X @ p[0] - 1.0) ** 2).mean()

    args = (f, g, (torch.randn(6, dtype=DT), torch.zeros(1, dtype=DT)), torch.zeros(6, dtype=DT))
    kw = dict(return_info=True, stationarity=None)
    fast, info = hg.implicit(*args, hg.CG(maxiter=8, tol=0.0), **kw)
    monkeypatch.setattr(_autograd, "DIRECT", False)
    monkeypatch.setattr(_autograd, "_RUN", None)
    slow, info2 = hg.implicit(*args, hg.CG(maxiter=8, tol=0.0), **kw)
    assert torch.equal(fast, slow) and torch.equal(info.solution, info2.solution)
    assert info.residual_norm == info2.residual_norm


def test_a_changed_private_engine_function_is_not_used(monkeypatch) -> None:
    """``_engine_run_backward`` is private to torch: one whose arguments or result changed
    makes the import-time check fail, and grad() goes through torch.autograd.grad."""

    def changed(*args, **kwargs):
        raise TypeError("_engine_run_backward() got an unexpected keyword argument")

    monkeypatch.setattr(_autograd, "_RUN", changed)
    assert not _autograd._works()
    monkeypatch.setattr(_autograd, "_RUN", lambda *a, **k: (torch.zeros(2),))
    assert not _autograd._works()  # a wrong gradient
    monkeypatch.setattr(_autograd, "DIRECT", False)
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    (g,) = _autograd.grad([(x**3).sum()], [x])
    assert torch.equal(g, 3 * x.detach() ** 2)
