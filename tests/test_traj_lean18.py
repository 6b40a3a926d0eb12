"""The reverse sweep's cheaper bookkeeping makes the same decisions as before.

- :class:`AdjointWatch` takes each step's leaf norms as they come and combines them once, in
  :meth:`~AdjointWatch.growth`: the growth is bit for bit the one of the per-step norms
  (the old computation, kept here as the reference), NaN, Inf and zero starts included.
- the reverse step's vector-Jacobian product passes the cotangents as ``grad_outputs`` once
  torch's symbolic-shape module is imported (no cold start left to save), and takes the
  gradient of ``sum_i <out_i, cot_i>`` before: both give the same hypergradients, bit for
  bit, with momentum and Adam buffers among the outputs.
"""

import importlib
import math
import sys
import warnings

import pytest
import torch

import hypergradient as hg
from hypergradient.methods.growth import AdjointWatch

traj_step = sys.modules["hypergradient.methods.traj_step"]


def _old_growth(first, pushed):
    """AdjointWatch.growth as it was: one norm of the leaves' norms per step, stacked."""
    norms = [AdjointWatch._norm(first)] + [AdjointWatch._norm(a) for a in pushed]
    if len(norms) < 2:
        return None
    values = torch.stack(norms).tolist()
    if not (values[0] > 0 and all(map(math.isfinite, values))):
        return None
    return max(values[1:]) / values[0]


def _leaves(shapes, dtype, scale, gen):
    return [torch.randn(s, dtype=dtype, generator=gen) * scale for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shapes", [[(3,)], [(30,), (1,)], [(64, 32), (32,), (32, 10), (10,)]])
def test_adjoint_growth_same_as_per_step_norms(dtype, shapes):
    gen = torch.Generator().manual_seed(len(shapes))
    for trial in range(12):
        first = _leaves(shapes, dtype, 10.0 ** (trial % 5 - 2), gen)
        if trial == 3:
            first = [torch.zeros_like(x) for x in first]  # a zero start: None
        pushed = []
        for t in range(int(torch.randint(0, 8, (), generator=gen))):
            scale = 10.0 ** float(torch.randn((), generator=gen) * 3)
            adj = _leaves(shapes, dtype, scale, gen)
            if trial == 5 and t == 2:
                adj[0][0] = float("nan")
            if trial == 7 and t == 1:
                adj[-1][-1] = float("inf")
            pushed.append(adj)
        watch = AdjointWatch(first)
        for adj in pushed:
            assert watch.push(adj) is adj
        old, new = _old_growth(first, pushed), watch.growth()
        assert (old is None and new is None) or old == new, (trial, old, new)
        assert watch.growth() == new  # idempotent


def test_adjoint_growth_without_leaves():
    watch = AdjointWatch([])
    watch.push([])
    assert watch.growth() is None


def _problem(optimizer):
    torch.manual_seed(0)
    X, y = torch.randn(40, 5, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    h = {"decay": torch.full((5,), -2.0, dtype=torch.float64)}
    h["lr"] = torch.tensor(0.05, dtype=torch.float64)

    def f(p, h):
        return ((X @ p["w"] + p["b"] - y) ** 2).mean() + (h["decay"].exp() * p["w"] ** 2).sum()

    def g(p, h):
        return ((X[:10] @ p["w"] + p["b"] - y[:10]) ** 2).mean()

    p0 = {"w": torch.zeros(5, dtype=torch.float64), "b": torch.zeros((), dtype=torch.float64)}
    return f, g, p0, h, optimizer(h["lr"])


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda lr: hg.optim.sgd(lr=lr),
        lambda lr: hg.optim.sgd(lr=lr, momentum=0.9),
        lambda lr: hg.optim.adam(lr=lr),
    ],
)
def test_vjp_with_or_without_grad_outputs_is_the_same(monkeypatch, optimizer):
    f, g, p0, h, opt = _problem(optimizer)
    importlib.import_module(traj_step._SHAPES)  # (loaded: the grad_outputs path)
    fast, info = hg.unrolled(f, g, p0, h, 15, opt, return_info=True)
    monkeypatch.setattr(traj_step, "_SHAPES", "not.a.module.that.is.imported")
    scalar, info2 = hg.unrolled(f, g, p0, h, 15, opt, return_info=True)
    for k in h:
        assert torch.equal(fast[k], scalar[k]), k
    assert info.stats["adjoint_growth"] == info2.stats["adjoint_growth"]


def _old_check_recomputed(again, first, other_kernels=False):
    """check_recomputed's decision as it was (per-step conversions): the step warned about."""
    steps = [t for t in sorted(again) if t < len(first)]
    if not steps:
        return None
    a = torch.stack([again[t].reshape(()).double() for t in steps])
    b = torch.stack([first[t].detach().reshape(()).to(a) for t in steps])
    eps = max(torch.finfo(again[t].dtype).eps for t in steps)
    gap = ((a - b).abs() / b.abs().clamp_min(torch.finfo(torch.float64).tiny)).tolist()
    worst = max(range(len(steps)), key=lambda i: gap[i])
    bound = max(1e-4, 16 * eps, 2.0**-7 if other_kernels else 0.0)
    return steps[worst] if gap[worst] > bound else None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_check_recomputed_same_decisions(dtype):
    gen = torch.Generator().manual_seed(3)
    for trial in range(40):
        T = int(torch.randint(1, 12, (), generator=gen))
        first = [torch.randn((), generator=gen).to(dtype) for _ in range(T)]
        rel = 10.0 ** float(torch.randint(-9, -1, (), generator=gen))
        again = {
            t: (x.double() * (1 + rel * float(torch.randn((), generator=gen)))).to(dtype)
            for t, x in enumerate(first)
            if trial % 3 or t % 2
        }
        if trial == 7:
            again[0] = torch.tensor(float("nan"), dtype=dtype)
        if trial == 9:
            first[-1] = torch.tensor(0.0, dtype=dtype)
        for other in (False, True):
            expected = _old_check_recomputed(again, first, other)
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                traj_step.check_recomputed(again, first, other)
            got = [w for w in seen if "re-evaluated at step" in str(w.message)]
            if expected is None:
                assert not got, (trial, other)
            else:
                assert len(got) == 1 and f"at step {expected} gave" in str(got[0].message)
