"""Shared pieces of the HyperOptimizer tests: a small problem, injectable fake methods, and
``everything`` / ``assert_same``, which compare every tensor and counter of a run (checked
here to detect a change anywhere)."""

from __future__ import annotations

import copy
import dataclasses
import io
import math

import numpy as np
import pytest
import torch

import hypergradient as hg

DT = torch.float64
BCE = torch.nn.functional.binary_cross_entropy_with_logits
D = 6


def data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, D, generator=g, dtype=DT)
    w = torch.randn(D, generator=g, dtype=DT)
    y = (X @ w + 0.5 * torch.randn(n, generator=g, dtype=DT) > 0).to(DT)
    return X, y


TRAIN, VAL = data(48, 0), data(40, 1)


def batches(k, size=16, seed=2):
    """``k`` training mini-batches (tuples of tensors)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        idx = torch.randint(0, TRAIN[0].shape[0], (size,), generator=g)
        out.append((TRAIN[0][idx], TRAIN[1][idx]))
    return out


def weights(m):
    """The first weight matrix of a module (also when reparametrized)."""
    return next(p for p in m.parameters() if p.dim() == 2)


def train_loss(m, h, batch):
    x, y = batch
    return BCE(m(x).reshape(-1), y) + 0.5 * (h["decay"] * weights(m) ** 2).sum()


def val_loss(m, h, batch):
    x, y = batch
    return BCE(m(x).reshape(-1), y)


def mlp(width=4, dropout=0.0, batchnorm=False, seed=0):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(D, width)]
    if batchnorm:
        layers.append(torch.nn.BatchNorm1d(width))
    layers += [torch.nn.Tanh(), torch.nn.Dropout(dropout), torch.nn.Linear(width, 1)]
    return torch.nn.Sequential(*layers).double()


def build(method=None, *, model=None, inner="sgd", decay=None, outer_lr=0.05, **kw):
    """A hyper-optimizer on an MLP (per-weight decay of the first layer by default)."""
    model = mlp() if model is None else model
    if decay is None:
        decay = hg.Positive(torch.full(tuple(weights(model).shape), 1e-2, dtype=DT))
    if inner == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
    kw.setdefault("val_data", VAL)
    kw.setdefault("val_batch_size", 16)
    kw.setdefault("inner_steps", 3)
    hopt = hg.HyperOptimizer(
        model,
        {"decay": decay},
        inner_optimizer=opt,
        outer_optimizer=kw.pop("outer_optimizer", lambda hp: torch.optim.Adam(hp, lr=outer_lr)),
        train_loss=kw.pop("train_loss", train_loss),
        val_loss=kw.pop("val_loss", val_loss),
        method=hg.IFT(hg.CG(maxiter=5), damping=1.0) if method is None else method,
        **kw,
    )
    return model, hopt


def run(hopt, steps):
    """The documented loop over ``steps`` (a list of batches)."""
    for batch in steps:
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        hopt.step(batch)


def everything(model, hopt):
    """Every tensor and counter of a run: weights, buffers, the hyper-optimizer's checkpoint
    (optimizers, hyperparameters, samplers, method, window, counters, history), the inner
    optimizer's live settings, the gradients and torch's random-number state."""
    return copy.deepcopy(
        {
            "model": model.state_dict(),
            "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            "hopt": hopt.state_dict(),
            "settings": [
                {k: v for k, v in g.items() if k != "params"}
                for g in hopt.inner_optimizer.param_groups
            ],
            "raw": [r.detach().clone() for r in hopt.raw_hparams()],
            "hyper_steps": hopt.hyper_steps,
            "history_len": len(hopt.history),
            "rng": torch.get_rng_state(),
        }
    )


def assert_same(a, b, path="run"):
    """Bit-for-bit equality of nested dicts/lists of tensors, numbers and strings."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.shape == b.shape and a.dtype == b.dtype, path
        assert torch.equal(a.nan_to_num(1.5e300), b.nan_to_num(1.5e300)), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (path, list(a), list(b))
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), (path, len(a), len(b))
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    elif path.endswith("['seconds']"):
        pass  # wall time
    else:
        assert a == b, (path, a, b)


class Recording(hg.Method):
    """Delegates to ``method`` and keeps the problems it saw (injected via ``method=``)."""

    def __init__(self, method):
        self.method = method
        self.name = method.name
        self.needs_trajectory = method.needs_trajectory
        self.tunes_optimizer = method.tunes_optimizer
        self.problems = []

    def __call__(self, problem):
        self.problems.append(problem)
        return self.method(problem)

    def state_dict(self):
        return self.method.state_dict()

    def load_state_dict(self, state):
        self.method.load_state_dict(state)


class Constant(hg.Method):
    """Returns a fixed hypergradient ``{name: value}`` (a full tensor of that value)."""

    name = "constant"

    def __init__(self, values, tunes_optimizer=False):
        self.values = values
        self.tunes_optimizer = tunes_optimizer

    def __call__(self, problem):
        hyper = {k: torch.full_like(v, self.values[k]) for k, v in problem.hparams.items()}
        return hyper, hg.Info(method=self.name, outer_loss=1.0)


# --------------------------------------------------------------- the helpers themselves


def test_everything_and_assert_same_see_any_change():
    model, hopt = build()
    run(hopt, batches(4))
    base = everything(model, hopt)
    assert_same(base, everything(model, hopt))
    changes = [
        lambda: model[0].weight.data.add_(1e-12),
        lambda: model[0].weight.grad.add_(1e-12),
        lambda: hopt.raw_hparams()[0].data.add_(1e-12),
        lambda: hopt.val_sampler.next(),
        lambda: torch.rand(1),
        lambda: hopt.inner_optimizer.param_groups[0].update(lr=0.2999),
        lambda: setattr(hopt.loop, "count", hopt.loop.count + 1),
        lambda: hopt.history.append(hopt.history[-1]),
        lambda: next(iter(hopt.inner_optimizer.state.values()))["momentum_buffer"].add_(1e-12),
        lambda: next(iter(hopt.outer_optimizer.state.values()))["exp_avg"].add_(1e-12),
    ]
    for change in changes:
        model, hopt = build()
        run(hopt, batches(4))
        before = everything(model, hopt)
        change()
        with pytest.raises(AssertionError):
            assert_same(before, everything(model, hopt))


def roundtrip(state):
    """``torch.save`` then ``torch.load(weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def size_of(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.tell()


@dataclasses.dataclass
class Pair:
    """A dataclass batch, importable from this module."""

    x: torch.Tensor
    y: torch.Tensor


def numpy_batch(batch):
    return (batch[0].numpy().copy(), batch[1].numpy().astype(np.float64))
