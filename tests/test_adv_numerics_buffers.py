"""Hypergradients leave a train-mode BatchNorm model's buffers as training would.

The client code: ``functional_call(net, params, x)`` with ``net`` in train mode, buffers
not passed as copies, so every forward pass updates ``net``'s running statistics. Before
the fix, ``hg.implicit`` updated them once in the double-backward modes (and the outer loss
read the updated ones) and 6 to 61 times with first-order products (``num_batches_tracked``
0 -> 61 with ``hg.Exact``); the trajectory methods' reverse sweeps and first-order tangents
added ``T`` to ``2 T`` updates after training's ``T``. Now the implicit methods change
nothing (bit-equal buffers, and the hypergradient of a call that passes buffer copies),
and the trajectory methods leave exactly plain training's buffers.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hypergradient as hg

DT = torch.float64
T = 3
LR, MOMENTUM = 0.1, 0.5


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).to(DT)


NET = _net()
_g = torch.Generator().manual_seed(1)
BATCHES = [
    (
        torch.randn(16, 3, generator=_g, dtype=DT) * (1 + i) + i,
        torch.randn(16, 1, generator=_g, dtype=DT),
    )
    for i in range(T)
]
XV, YV = torch.randn(16, 3, generator=_g, dtype=DT), torch.randn(16, 1, generator=_g, dtype=DT)
P0 = {k: v.detach().clone() for k, v in NET.named_parameters()}
B0 = {k: v.clone() for k, v in NET.named_buffers()}
H = {"decay": torch.tensor(-2.0, dtype=DT)}


def _losses(copies: bool):
    """(inner, outer) on NET; ``copies``: pass clones of the buffers (the safe client)."""

    def call(p, x):
        state = {**{k: b.clone() for k, b in NET.named_buffers()}, **p} if copies else p
        return functional_call(NET, state, (x,))

    def inner(p, h, batch=BATCHES[0]):
        NET.train()
        x, y = batch
        reg = h["decay"].exp() * sum((v**2).sum() for v in p.values())
        return ((call(p, x) - y) ** 2).mean() + reg

    def outer(p, h):
        NET.eval()
        return ((call(p, XV) - YV) ** 2).mean()

    return inner, outer


def _reset() -> None:
    with torch.no_grad():
        for k, v in NET.named_buffers():
            v.copy_(B0[k])


def _buffers() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in NET.named_buffers()}


def _assert_bit_equal(a, b) -> None:
    for k in a:
        assert torch.equal(a[k], b[k]), k


SOLVERS = {
    "cg": lambda: hg.CG(maxiter=30, tol=1e-10),
    "exact": lambda: hg.Exact(),
    "neumann": lambda: hg.Neumann(maxiter=5, alpha="auto", seed=0),
    "nystrom_pcg": lambda: hg.NystromPCG(rank=3, seed=0, tol=1e-10),
}


@pytest.mark.parametrize("hvp", ["double", "double_math", "first_order"])
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_implicit_leaves_buffers_bit_equal(hvp, solver):
    _reset()
    inner, outer = _losses(copies=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        out = hg.implicit(inner, outer, P0, H, solver=SOLVERS[solver](), hvp=hvp)
        _assert_bit_equal(_buffers(), B0)
        # the same hypergradient as a client that passes buffer copies (outer loss reads
        # the running statistics the model has, not ones updated by the solver's passes)
        safe_inner, safe_outer = _losses(copies=True)
        ref = hg.implicit(safe_inner, safe_outer, P0, H, solver=SOLVERS[solver](), hvp=hvp)
    assert float(out["decay"]) == pytest.approx(float(ref["decay"]), rel=1e-9, abs=1e-14)


@pytest.mark.parametrize("method", ["hoag", "implicit_first_order"])
def test_implicit_methods_leave_buffers_bit_equal(method):
    _reset()
    inner, outer = _losses(copies=False)
    m = hg.HOAG(hvp="first_order") if method == "hoag" else hg.Implicit(hg.CG(), hvp="first_order")
    problem = hg.Problem(inner_loss=inner, outer_loss=outer, params=P0, hparams=H)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        m(problem)
    _assert_bit_equal(_buffers(), B0)


@pytest.mark.parametrize("mixed", ["params", "hparams"])
def test_t1t2_leaves_buffers_bit_equal(mixed):
    """T1T2's direct path (both orders of its mixed product) evaluates ``f`` and ``g`` once
    more than training: neither pass may touch the running statistics."""
    _reset()
    inner, outer = _losses(copies=False)
    after = {k: v - LR * 0.1 for k, v in P0.items()}  # a look-ahead point
    problem = hg.Problem(inner, outer, after, H, lr=LR, prev_params=P0)
    out, info = hg.T1T2(mixed=mixed)(problem)
    _assert_bit_equal(_buffers(), B0)
    assert info.stats["hvp"] == "double" and info.stats["mixed"] == mixed
    safe_inner, safe_outer = _losses(copies=True)
    safe = hg.Problem(safe_inner, safe_outer, after, H, lr=LR, prev_params=P0)
    ref, _ = hg.T1T2(mixed=mixed)(safe)
    assert float(out["decay"]) == pytest.approx(float(ref["decay"]), rel=1e-12, abs=1e-15)


def _plain_training_buffers(inner) -> dict[str, torch.Tensor]:
    """Momentum SGD for T steps with the user's closure: the buffers training leaves."""
    _reset()
    p, buf = dict(P0), None
    for t in range(T):
        leaves = {k: v.detach().requires_grad_(True) for k, v in p.items()}
        grads = torch.autograd.grad(inner(leaves, H, BATCHES[t]), list(leaves.values()))
        buf = list(grads) if buf is None else [MOMENTUM * b + gi for b, gi in zip(buf, grads)]
        p = {k: v.detach() - LR * b for (k, v), b in zip(leaves.items(), buf)}
    out = _buffers()
    _reset()
    return out


@pytest.mark.parametrize("hvp", ["double", "first_order"])
@pytest.mark.parametrize("method", ["unrolled", "forward_mode", "drmad"])
def test_trajectory_methods_leave_training_buffers(method, hvp):
    inner, outer = _losses(copies=False)
    want = _plain_training_buffers(inner)
    assert int(want["1.num_batches_tracked"]) == T
    fn = getattr(hg, method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        fn(inner, outer, P0, H, T, hg.optim.sgd(LR, momentum=MOMENTUM), batches=BATCHES, hvp=hvp)
    _assert_bit_equal(_buffers(), want)
    _reset()


@pytest.mark.parametrize("method", ["unrolled", "forward_mode", "drmad"])
def test_a_train_mode_outer_loss_leaves_training_buffers(method):
    """The outer loss evaluated in train mode (no ``NET.eval()``): its pass at the final
    parameters is extra to training too (it made one more update before)."""
    inner, _ = _losses(copies=False)

    def outer_train_mode(p, h):
        return ((functional_call(NET, p, (XV,)) - YV) ** 2).mean()

    want = _plain_training_buffers(inner)
    fn = getattr(hg, method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        fn(inner, outer_train_mode, P0, H, T, hg.optim.sgd(LR, momentum=MOMENTUM), batches=BATCHES)
    _assert_bit_equal(_buffers(), want)
    _reset()


def test_buffers_of_a_failing_pass_are_restored():
    from hypergradient.operators.buffers import keep_buffers

    _reset()
    NET.train()
    with pytest.raises(RuntimeError, match="boom"), keep_buffers():
        NET(BATCHES[0][0])
        raise RuntimeError("boom")
    _assert_bit_equal(_buffers(), B0)
    assert NET[1].running_mean is not None
    # outside the block the module trains as usual
    NET(BATCHES[0][0])
    assert int(NET[1].num_batches_tracked) == 1
    _reset()


@pytest.mark.parametrize("kw", [{"checkpoint_every": 2}, {"truncate": 2}])
def test_unrolled_recomputation_leaves_training_buffers(kw):
    inner, outer = _losses(copies=False)
    want = _plain_training_buffers(inner)
    hg.unrolled(inner, outer, P0, H, T, hg.optim.sgd(LR, momentum=MOMENTUM), batches=BATCHES, **kw)
    _assert_bit_equal(_buffers(), want)
    _reset()


def test_spectral_norm_first_order_products_see_one_function():
    # spectral_norm in train mode advances its power iteration (buffers _u, _v) at every
    # forward pass: before, each first-order difference of the reverse sweep evaluated a
    # different f, and hg.unrolled(hvp="first_order") was 68% off (-0.00346 vs -0.00206);
    # now every re-evaluation starts from the run's buffers
    torch.manual_seed(0)
    sn = nn.utils.parametrizations.spectral_norm(nn.Linear(5, 8))
    net = nn.Sequential(sn, nn.Tanh(), nn.Linear(8, 1)).to(DT)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(32, 5, generator=g, dtype=DT), torch.randn(32, 1, generator=g, dtype=DT)
    p0 = {k: v.detach().clone() for k, v in net.named_parameters()}
    u0 = {k: v.clone() for k, v in net.named_buffers()}

    def inner(p, h, batch=None):
        reg = h["decay"].exp() * sum((v**2).sum() for v in p.values())
        return ((functional_call(net, p, (x,)) - y) ** 2).mean() + reg

    def outer(p, h):
        return ((functional_call(net, p, (x[:8],)) - y[:8]) ** 2).mean()

    def loop(wd: float) -> float:  # plain training from the initial buffers
        with torch.no_grad():
            for k, v in net.named_buffers():
                v.copy_(u0[k])
        p, hh = dict(p0), {"decay": torch.tensor(wd, dtype=DT)}
        for _ in range(T):
            leaves = {k: v.detach().requires_grad_(True) for k, v in p.items()}
            grads = torch.autograd.grad(inner(leaves, hh), list(leaves.values()))
            p = {k: v.detach() - LR * gk for (k, v), gk in zip(leaves.items(), grads)}
        return float(outer(p, hh))

    fd = (loop(-2.0 + 1e-6) - loop(-2.0 - 1e-6)) / 2e-6
    for hvp in ("double", "first_order"):
        loop(-2.0)  # buffers back to the start (loop resets them first)
        with torch.no_grad():
            for k, v in net.named_buffers():
                v.copy_(u0[k])
        out = hg.unrolled(inner, outer, p0, H, T, hg.optim.sgd(LR), hvp=hvp)
        # FD also differentiates the power iteration, which autograd treats as constant
        assert float(out["decay"]) == pytest.approx(fd, rel=2e-3), hvp
