"""The model zoo (issue 10, item 6): tiny float64 versions of what users train.

Five models, each with dropout on or off: a tanh MLP, a CNN with BatchNorm, a
``nn.TransformerEncoderLayer`` classifier (scaled dot-product attention), a GRU and an
Embedding + LayerNorm text classifier. Each comes as a :class:`Zoo`: the module, its data,
functional losses for the functional API (``inner(params, hparams)`` in train mode with one
weight decay per parameter tensor, ``outer(params, hparams)`` in eval mode on validation
data) and the ``(model, hparams, batch)`` losses of ``HyperOptimizer``.

References used by the zoo tests:

- :func:`loop_outer`: the same inner loop in plain autograd (for central differences);
- :func:`dense_implicit`: the implicit formula with a dense float64 Hessian and mixed
  matrix built row by row and ``torch.linalg.solve``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

DT = torch.float64
CLASSES = 3
NAMES = ("mlp", "cnn_bn", "transformer", "gru", "text")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run a zoo module with one intra-op thread (restored after it).

    The zoo's models are tiny: a second thread buys nothing, and on a machine shared by
    other processes thread contention made each functional call ~50 times slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Last(nn.Module):
    """The GRU's last hidden state."""

    def __init__(self, gru: nn.GRU):
        super().__init__()
        self.gru = gru

    def forward(self, x: Tensor) -> Tensor:
        return self.gru(x)[0][:, -1]


class _Mean(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(self.dim)


def _module(
    name: str, p: float, w: int = 1
) -> tuple[nn.Module, Callable[[torch.Generator, int], Tensor]]:
    """The module (hidden sizes times ``w``) and a sampler of its inputs."""
    if name == "mlp":
        net = nn.Sequential(
            nn.Linear(4, 6 * w), nn.Tanh(), nn.Dropout(p), nn.Linear(6 * w, CLASSES)
        )
        return net, lambda g, n: torch.randn(n, 4, generator=g, dtype=DT)
    if name == "cnn_bn":
        net = nn.Sequential(
            nn.Conv2d(1, 2 * w, 3),
            nn.BatchNorm2d(2 * w),
            nn.Tanh(),
            nn.Dropout(p),
            nn.Flatten(),
            nn.Linear(18 * w, CLASSES),
        )
        return net, lambda g, n: torch.randn(n, 1, 5, 5, generator=g, dtype=DT)
    if name == "transformer":
        d = 4 * w
        layer = nn.TransformerEncoderLayer(
            d_model=d, nhead=2, dim_feedforward=2 * d, dropout=p, batch_first=True
        )
        net = nn.Sequential(layer, _Mean(1), nn.Linear(d, CLASSES))
        return net, lambda g, n: torch.randn(n, 4, d, generator=g, dtype=DT)
    if name == "gru":
        gru = nn.GRU(3, 5 * w, batch_first=True)
        net = nn.Sequential(_Last(gru), nn.Dropout(p), nn.Linear(5 * w, CLASSES))
        return net, lambda g, n: torch.randn(n, 4, 3, generator=g, dtype=DT)
    if name == "text":
        net = nn.Sequential(
            nn.Embedding(12, 6 * w),
            nn.LayerNorm(6 * w),
            _Mean(1),
            nn.Dropout(p),
            nn.Linear(6 * w, CLASSES),
        )
        return net, lambda g, n: torch.randint(0, 12, (n, 5), generator=g)
    raise ValueError(name)


@dataclass
class Zoo:
    """One zoo model with its data and losses (see the module docstring)."""

    name: str
    dropout: float
    module: nn.Module
    X: Any
    y: Tensor
    Xv: Any
    yv: Tensor
    buffers: dict[str, Tensor] = field(default_factory=dict)

    # ------------------------------------------------------------------ functional
    def params0(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.module.named_parameters()}

    def hparams0(self, value: float = 1e-2) -> dict[str, Tensor]:
        n = len(list(self.module.parameters()))
        g = torch.Generator().manual_seed(7)
        return {"decay": value * (1 + torch.rand(n, generator=g, dtype=DT))}

    def logits(self, p: dict[str, Tensor], X: Any, train: bool) -> Tensor:
        self.module.train(train)
        state = {**{k: b.clone() for k, b in self.buffers.items()}, **p}
        return functional_call(self.module, state, (X,))

    def inner(self, p: dict[str, Tensor], h: dict[str, Tensor]) -> Tensor:
        decay = sum(h["decay"][i] * (v**2).sum() for i, v in enumerate(p.values()))
        return nn.functional.cross_entropy(self.logits(p, self.X, True), self.y) + 0.5 * decay

    def outer(self, p: dict[str, Tensor], h: dict[str, Tensor]) -> Tensor:
        return nn.functional.cross_entropy(self.logits(p, self.Xv, False), self.yv)

    # ------------------------------------------------------------------ HyperOptimizer
    @staticmethod
    def train_loss(m: nn.Module, h: dict[str, Tensor], batch: Any) -> Tensor:
        decay = sum(h["decay"][i] * (v**2).sum() for i, v in enumerate(m.parameters()))
        return nn.functional.cross_entropy(m(batch[0]), batch[1]) + 0.5 * decay

    @staticmethod
    def val_loss(m: nn.Module, h: dict[str, Tensor], batch: Any) -> Tensor:
        """Evaluated in eval mode (no dropout, BatchNorm's running statistics)."""
        was = m.training
        m.eval()
        try:
            return nn.functional.cross_entropy(m(batch[0]), batch[1])
        finally:
            m.train(was)

    def batches(self, k: int, size: int = 8) -> list[tuple[Any, Tensor]]:
        n = self.y.shape[0]
        return [
            (self.X[(i * size) % n : (i * size) % n + size], self.y[(i * size) % n :][:size])
            for i in range(k)
        ]


def make(name: str, dropout: bool = False, seed: int = 0, n: int = 16, width: int = 1) -> Zoo:
    """A zoo model (float64, initialized from ``seed``) with ``n`` training and validation
    rows; ``width`` multiplies its hidden sizes (the benchmark's larger versions)."""
    p = 0.25 if dropout else 0.0
    torch.manual_seed(seed)
    module, sample = _module(name, p, width)
    module = module.to(DT)
    g = torch.Generator().manual_seed(seed + 100)
    X, Xv = sample(g, n), sample(g, n)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    yv = torch.randint(0, CLASSES, (n,), generator=g)
    buffers = {k: b.detach().clone() for k, b in module.named_buffers()}
    return Zoo(name, p, module, X, y, Xv, yv, buffers)


# ----------------------------------------------------------------------------- references


@contextlib.contextmanager
def math_attention():
    """The math attention kernel (it has a double backward) for the references."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


def flat(tree: dict[str, Tensor]) -> Tensor:
    return torch.cat([v.reshape(-1) for v in tree.values()])


def unflat(vec: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vec[i : i + v.numel()].reshape(v.shape)
        i += v.numel()
    return out


def dense_terms(zoo: Zoo, params: dict[str, Tensor], h: dict[str, Tensor], seed: int):
    """Dense ``H``, mixed matrix ``M = d grad_theta f / d phi``, ``grad_theta g``, ``d_phi g``.

    ``f`` is evaluated once, after ``torch.manual_seed(seed)`` (its dropout masks), with the
    math attention kernel; every row is one backward pass through that graph.
    """
    theta = flat(params).detach().requires_grad_(True)
    phi = h["decay"].detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    with math_attention():
        f = zoo.inner(unflat(theta, params), {"decay": phi})
        (grad,) = torch.autograd.grad(f, theta, create_graph=True)
        eye = torch.eye(theta.numel(), dtype=DT)
        H, M = torch.autograd.grad(grad, (theta, phi), eye, is_grads_batched=True)
    g = zoo.outer(unflat(theta, params), {"decay": phi})
    g_theta, g_phi = torch.autograd.grad(g, (theta, phi), allow_unused=True)
    g_phi = torch.zeros_like(phi) if g_phi is None else g_phi
    return 0.5 * (H + H.T), M, g_theta, g_phi, grad.detach()


def dense_implicit(zoo: Zoo, params, h, seed: int, damping: float = 0.0) -> Tensor:
    """``d_phi g - M^T (H + damping I)^{-1} grad_theta g`` with dense float64 algebra."""
    H, M, g_theta, g_phi, _ = dense_terms(zoo, params, h, seed)
    x = torch.linalg.solve(H + damping * torch.eye(H.shape[0], dtype=DT), g_theta)
    return g_phi - M.T @ x


def loop_outer(zoo: Zoo, params0, h, steps: int, lr: float, momentum: float, seed: int) -> Tensor:
    """The outer loss after ``steps`` momentum-SGD steps of plain autograd (draws from ``seed``)."""
    torch.manual_seed(seed)
    keys = list(params0)
    p = [params0[k] for k in keys]
    buf = [torch.zeros_like(x) for x in p]
    with math_attention():
        for _ in range(steps):
            leaves = [x.detach().requires_grad_(True) for x in p]
            g = torch.autograd.grad(zoo.inner(dict(zip(keys, leaves)), h), leaves)
            buf = [momentum * b + gi for b, gi in zip(buf, g)]
            p = [x - lr * b for x, b in zip(p, buf)]
        return zoo.outer(dict(zip(keys, p)), h)


def directional_fd(fn: Callable[[Tensor], Tensor], phi: Tensor, u: Tensor, eps: float = 1e-5):
    """Central difference ``(fn(phi + eps u) - fn(phi - eps u)) / 2 eps``."""
    return float((fn(phi + eps * u) - fn(phi - eps * u)) / (2 * eps))
