"""SGDHD / AdamHD (hypergradient descent on the learning rate) against exact references."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor

from conftest import to_device
from hypergradient.optim.hd import SGDHD, AdamHD

DT = torch.float64

SGD_VARIANTS: list[dict[str, object]] = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "dampening": 0.3},
    {"momentum": 0.8, "nesterov": True},
    {"weight_decay": 0.05},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 0.05},
    {"momentum": 0.5, "maximize": True},
]
ADAM_VARIANTS: list[dict[str, object]] = [
    {},
    {"betas": (0.8, 0.99), "eps": 1e-6},
    {"weight_decay": 0.05},
    {"maximize": True, "betas": (0.5, 0.9)},
]


# ----------------------------------------------------------------------------- a small problem


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add contention (seconds on a loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


_G = torch.Generator().manual_seed(3)
XS = torch.randn(30, 4, generator=_G, dtype=DT)
YS = (torch.randn(30, generator=_G, dtype=DT) > 0).to(DT)
W1_0 = 0.5 * torch.randn(4, 5, generator=_G, dtype=DT)
W2_0 = 0.5 * torch.randn(5, generator=_G, dtype=DT)


def small_loss(w1: Tensor, w2: Tensor) -> Tensor:
    """A nonlinear (one tanh layer) logistic loss; varied gradients at every step."""
    return F.binary_cross_entropy_with_logits(torch.tanh(XS @ w1) @ w2, YS)


def small_params() -> list[Tensor]:
    return [W1_0.clone().requires_grad_(), W2_0.clone().requires_grad_()]


def train(opt: torch.optim.Optimizer, params: list[Tensor], steps: int) -> list[float]:
    """``steps`` closure steps on ``small_loss``; returns the lr after each step."""

    def closure() -> Tensor:
        opt.zero_grad()
        loss = small_loss(*params)
        loss.backward()
        return loss

    lrs = []
    for _ in range(steps):
        opt.step(closure)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


# ----------------------------------------------------------------------------- 1. hypergrad_lr=0


@pytest.mark.parametrize("kw", SGD_VARIANTS)
def test_sgdhd_without_hypergradient_is_torch_sgd(kw: dict[str, object]) -> None:
    pa, pb = small_params(), small_params()
    ref = torch.optim.SGD(pa, lr=0.3, **kw)
    opt = SGDHD(pb, lr=0.3, hypergrad_lr=0.0, **kw)
    train(ref, pa, 20)
    lrs = train(opt, pb, 20)
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
    assert lrs == [0.3] * 20
    assert not torch.equal(pb[0], W1_0)  # it did move


@pytest.mark.parametrize("kw", ADAM_VARIANTS)
def test_adamhd_without_hypergradient_is_torch_adam(kw: dict[str, object]) -> None:
    pa, pb = small_params(), small_params()
    ref = torch.optim.Adam(pa, lr=0.05, **kw)
    opt = AdamHD(pb, lr=0.05, hypergrad_lr=0.0, **kw)
    train(ref, pa, 20)
    lrs = train(opt, pb, 20)
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
    assert lrs == [0.05] * 20
    assert not torch.equal(pb[0], W1_0)


# ----------------------------------------------------------------------------- 2. closed form


def test_sgdhd_scalar_quadratic_closed_form() -> None:
    # f = a/2 theta^2: g_t = a theta_{t-1}, theta_1 = theta_0 (1 - alpha_0 a), and
    # alpha_2 = alpha_0 + beta g_2 g_1, alpha_3 = alpha_2 + beta g_3 g_2.
    a, th0, al0, beta = 2.0, 1.0, 0.1, 0.01
    th = torch.tensor([th0], dtype=DT, requires_grad=True)
    opt = SGDHD([th], lr=al0, hypergrad_lr=beta)
    lrs = []
    for _ in range(3):
        opt.zero_grad()
        (0.5 * a * th**2).sum().backward()
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
    th1 = th0 * (1 - al0 * a)
    al2 = al0 + beta * a**2 * th0**2 * (1 - al0 * a)
    al3 = al2 + beta * a**2 * th1**2 * (1 - al2 * a)
    assert lrs[0] == al0  # no previous direction at the first step
    assert lrs[1] == pytest.approx(al2, rel=1e-14, abs=0) == pytest.approx(0.132, rel=1e-14)
    assert lrs[2] == pytest.approx(al3, rel=1e-14, abs=0) == pytest.approx(0.1508416, rel=1e-14)
    th2 = th1 * (1 - al2 * a)
    th3 = th2 * (1 - al3 * a)
    assert th.item() == pytest.approx(th3, rel=1e-14)


def _quadratic() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(7)
    M = torch.randn(6, 6, generator=g, dtype=DT)
    A = M @ M.T / 6 + 0.1 * torch.eye(6, dtype=DT)
    return A, torch.randn(6, generator=g, dtype=DT)


def ref_sgdhd_lrs(
    A: Tensor,
    th: Tensor,
    alpha: float,
    beta: float,
    steps: int,
    mu: float = 0.0,
    damp: float = 0.0,
    nesterov: bool = False,
    wd: float = 0.0,
) -> list[float]:
    """SGD(N)-HD written out: g_t = A th + wd th, alpha += beta g_t . u_{t-1}."""
    alphas, u_prev, b = [], None, None
    for _ in range(steps):
        g = A @ th + wd * th
        if u_prev is not None:
            alpha = alpha + beta * float(g @ u_prev)
        if mu:
            b = g.clone() if b is None else mu * b + (1 - damp) * g
            u = g + mu * b if nesterov else b
        else:
            u = g
        th = th - alpha * u
        u_prev = u
        alphas.append(alpha)
    return alphas


@pytest.mark.parametrize("kw", SGD_VARIANTS[:-1])
def test_sgdhd_lr_matches_hand_recursion_on_quadratic(
    kw: dict[str, object], device: torch.device
) -> None:
    A, th0 = _quadratic()
    alpha0, beta = 0.05, 0.02
    # theta split over two tensors of one group: the dot product must sum over both
    A_d, th0_d = to_device(device, (A, th0))
    p1, p2 = th0_d[:4].clone().requires_grad_(), th0_d[4:].clone().requires_grad_()
    opt = SGDHD([p1, p2], lr=alpha0, hypergrad_lr=beta, **kw)
    got = []
    for _ in range(3):
        opt.zero_grad()
        th = torch.cat([p1, p2])
        (0.5 * th @ A_d @ th).backward()
        opt.step()
        got.append(opt.param_groups[0]["lr"])
    ref = ref_sgdhd_lrs(
        A,
        th0,
        alpha0,
        beta,
        3,
        mu=float(kw.get("momentum", 0.0)),  # type: ignore[arg-type]
        damp=float(kw.get("dampening", 0.0)),  # type: ignore[arg-type]
        nesterov=bool(kw.get("nesterov", False)),
        wd=float(kw.get("weight_decay", 0.0)),  # type: ignore[arg-type]
    )
    assert ref[0] == alpha0 and ref[2] != pytest.approx(alpha0, rel=1e-3)  # the lr moved
    for g, r in zip(got, ref):
        assert g == pytest.approx(r, rel=1e-12, abs=0)


def test_adamhd_lr_matches_hand_recursion_on_quadratic(device: torch.device) -> None:
    A, th0 = _quadratic()
    alpha0, beta, b1, b2, eps = 0.05, 1e-3, 0.9, 0.999, 1e-8
    A_d, th0_d = to_device(device, (A, th0))
    p = th0_d.clone().requires_grad_()
    opt = AdamHD([p], lr=alpha0, hypergrad_lr=beta, betas=(b1, b2), eps=eps)
    got = []
    for _ in range(3):
        opt.zero_grad()
        (0.5 * p @ A_d @ p).backward()
        opt.step()
        got.append(opt.param_groups[0]["lr"])
    th, alpha, m, v, u_prev, ref = th0.clone(), alpha0, 0 * th0, 0 * th0, None, []
    for t in range(1, 4):
        g = A @ th
        if u_prev is not None:
            alpha = alpha + beta * float(g @ u_prev)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps)
        th = th - alpha * u
        u_prev = u
        ref.append(alpha)
    assert abs(ref[2] - alpha0) > 1e-3
    for g_, r in zip(got, ref):
        assert g_ == pytest.approx(r, rel=1e-12, abs=0)
    assert p.device == th0_d.device
    assert torch.allclose(p.detach().cpu(), th, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------- 3. finite differences


def _effective_objective(kw: dict[str, object]) -> Callable[[list[Tensor]], float]:
    sign = -1.0 if kw.get("maximize") else 1.0
    wd = float(kw.get("weight_decay", 0.0))  # type: ignore[arg-type]

    def objective(ps: list[Tensor]) -> float:
        return float(sign * small_loss(*ps) + 0.5 * wd * sum((q * q).sum() for q in ps))

    return objective


@pytest.mark.parametrize(
    ("cls", "kw"),
    [(SGDHD, kw) for kw in SGD_VARIANTS] + [(AdamHD, kw) for kw in ADAM_VARIANTS],
)
def test_hypergradient_is_derivative_of_one_step_map(
    cls: type[torch.optim.Optimizer], kw: dict[str, object]
) -> None:
    """h_t = d/d alpha f(theta_{t-2} - alpha u_{t-1}) at alpha_{t-1}, by central differences."""
    beta = 1e-3
    params = small_params()
    opt = cls(params, lr=0.2 if cls is SGDHD else 0.02, hypergrad_lr=beta, **kw)
    objective = _effective_objective(kw)
    train(opt, params, 1)
    checked = 0
    for _ in range(5):
        before = [q.detach().clone() for q in params]
        train(opt, params, 1)  # step t-1: theta_{t-2} -> theta_{t-1} with alpha_{t-1}, u_{t-1}
        alpha_prev = opt.param_groups[0]["lr"]
        dirs = [opt.state[q]["prev_direction"].clone() for q in params]
        for q, q0, u in zip(params, before, dirs):  # the stored direction is the applied one
            assert torch.allclose(q.detach(), q0 - alpha_prev * u, rtol=1e-13, atol=1e-15)
        train(opt, params, 1)  # step t
        h = (alpha_prev - opt.param_groups[0]["lr"]) / beta

        def phi(alpha: float, before: list[Tensor] = before, dirs: list[Tensor] = dirs) -> float:
            return objective([q0 - alpha * u for q0, u in zip(before, dirs)])

        d = 1e-5
        fd = (phi(alpha_prev + d) - phi(alpha_prev - d)) / (2 * d)
        assert abs(h) > 1e-6
        assert h == pytest.approx(fd, rel=1e-6, abs=1e-10)
        checked += 1
    assert checked == 5


# ----------------------------------------------------------------------------- 4. digits acceptance


def _digits() -> tuple[Tensor, Tensor]:
    X, y = load_digits(return_X_y=True)
    X = torch.as_tensor(X, dtype=DT)
    sd = X.std(0)
    sd[sd == 0] = 1.0
    return (X - X.mean(0)) / sd, torch.as_tensor(y)


def digits_run(
    make: Callable[[list[Tensor]], torch.optim.Optimizer], epochs: int = 30, batch: int = 128
) -> tuple[float, float]:
    """Multinomial logistic regression from zero, mini-batches (fixed seed): (train loss, lr)."""
    X, y = _digits()
    W = torch.zeros(X.shape[1], 10, dtype=DT, requires_grad=True)
    b = torch.zeros(10, dtype=DT, requires_grad=True)
    opt = make([W, b])
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(batch):
            opt.zero_grad()
            F.cross_entropy(X[idx] @ W + b, y[idx]).backward()
            opt.step()
    with torch.no_grad():
        return F.cross_entropy(X @ W + b, y).item(), opt.param_groups[0]["lr"]


def test_digits_sgdhd_beats_sgd_from_too_small_lr() -> None:
    lr0 = 1e-3  # a good constant lr here is ~0.5
    loss_sgd, _ = digits_run(lambda p: torch.optim.SGD(p, lr=lr0))
    loss_hd, lr_hd = digits_run(lambda p: SGDHD(p, lr=lr0))  # default hypergrad_lr=1e-4
    print(
        f"\n[digits, 30 epochs, batch 128] SGD: loss {loss_sgd:.4f} (lr {lr0:g}) | "
        f"SGD-HD(beta=1e-4): loss {loss_hd:.4f}, lr {lr0:g} -> {lr_hd:.4g}"
    )
    assert loss_hd < loss_sgd
    assert lr_hd > 5 * lr0


def test_digits_adamhd_beats_adam_with_paper_beta() -> None:
    lr0 = 1e-3
    loss_adam, _ = digits_run(lambda p: torch.optim.Adam(p, lr=lr0))
    loss_hd, lr_hd = digits_run(lambda p: AdamHD(p, lr=lr0))  # paper's beta = 1e-7
    print(
        f"\n[digits, 30 epochs, batch 128] Adam: loss {loss_adam:.4f} (lr {lr0:g}) | "
        f"Adam-HD(beta=1e-7): loss {loss_hd:.4f}, lr {lr0:g} -> {lr_hd:.4g}"
    )
    # With the paper's beta the loss is lower and the lr rises, but only by ~18% over these
    # 420 steps (not 5x): the 5x criterion needs beta ~1e-5 here, so it is not asserted.
    assert loss_hd < loss_adam
    assert lr_hd > lr0


# ----------------------------------------------------------------------------- 5. state_dict


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))


@pytest.mark.parametrize(
    "make",
    [
        lambda p: SGDHD(p, lr=0.01, hypergrad_lr=1e-3),
        lambda p: SGDHD(p, lr=0.01, momentum=0.9, nesterov=True, hypergrad_lr=1e-3),
        lambda p: AdamHD(p, lr=1e-3, hypergrad_lr=1e-5, weight_decay=1e-3),
    ],
)
def test_state_dict_round_trip_is_bit_exact(
    make: Callable[[list[Tensor]], torch.optim.Optimizer], device: torch.device
) -> None:
    X, y = _digits()
    X, y = to_device(device, (X.float(), y))
    batches = torch.randperm(len(y), generator=torch.Generator().manual_seed(1)).split(64)[:20]
    batches = to_device(device, list(batches))

    def run(model: torch.nn.Module, opt: torch.optim.Optimizer, bs: list[Tensor]) -> None:
        for idx in bs:
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()

    model = _mlp(0).to(device)
    opt = make(list(model.parameters()))
    run(model, opt, batches[:10])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    lr_mid = opt.param_groups[0]["lr"]
    run(model, opt, batches[10:])  # the uninterrupted run

    buf.seek(0)
    saved = torch.load(buf, map_location=device)
    model2 = _mlp(1).to(device)  # different weights and lr: everything must come from the file
    opt2 = make(list(model2.parameters()))
    opt2.param_groups[0]["lr"] = 123.0
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["lr"] == lr_mid
    run(model2, opt2, batches[10:])

    assert opt.param_groups[0]["lr"] != lr_mid
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- 6. validation


@pytest.mark.parametrize(
    ("cls", "kw", "name"),
    [
        (SGDHD, {"lr": -0.1}, r"^`lr` "),
        (SGDHD, {"lr": float("nan")}, r"^`lr` "),
        (SGDHD, {"hypergrad_lr": -1e-4}, r"^`hypergrad_lr` "),
        (SGDHD, {"momentum": -0.9}, r"^`momentum` "),
        (SGDHD, {"dampening": 1.5}, r"^`dampening` "),
        (SGDHD, {"weight_decay": -1.0}, r"^`weight_decay` "),
        (SGDHD, {"nesterov": True}, r"^`nesterov"),
        (SGDHD, {"nesterov": True, "momentum": 0.9, "dampening": 0.1}, r"^`nesterov"),
        (AdamHD, {"lr": -1e-3}, r"^`lr` "),
        (AdamHD, {"hypergrad_lr": -1e-7}, r"^`hypergrad_lr` "),
        (AdamHD, {"betas": (1.0, 0.999)}, r"^`betas\[0\]` "),
        (AdamHD, {"betas": (0.9, -0.1)}, r"^`betas\[1\]` "),
        (AdamHD, {"betas": (0.9,)}, r"^`betas` "),
        (AdamHD, {"eps": -1e-8}, r"^`eps` "),
        (AdamHD, {"weight_decay": -1e-2}, r"^`weight_decay` "),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(
    cls: type[torch.optim.Optimizer], kw: dict[str, object], name: str
) -> None:
    with pytest.raises(ValueError, match=name):
        cls(small_params(), **kw)


def test_add_param_group_validates_per_group_values() -> None:
    p, q = small_params()
    opt = SGDHD([p])
    with pytest.raises(ValueError, match=r"^`hypergrad_lr` "):
        opt.add_param_group({"params": [q], "hypergrad_lr": -1.0})
    assert len(opt.param_groups) == 1
    opt2 = AdamHD([p])
    with pytest.raises(ValueError, match=r"^`betas\[1\]` "):
        opt2.add_param_group({"params": [q], "betas": (0.9, 1.0)})


# ----------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("cls", [SGDHD, AdamHD])
def test_groups_adapt_independently_with_their_own_hypergrad_lr(
    cls: type[torch.optim.Optimizer],
) -> None:
    pa, pb = small_params(), small_params()
    both = cls([{"params": [pa[0]], "hypergrad_lr": 1e-3}, {"params": [pa[1]], "lr": 0.05}], lr=0.1)
    single = [cls([pb[0]], lr=0.1, hypergrad_lr=1e-3), cls([pb[1]], lr=0.05)]
    default_beta = 1e-4 if cls is SGDHD else 1e-7
    assert both.param_groups[1]["hypergrad_lr"] == default_beta
    for _ in range(8):
        for o in [both, *single]:
            o.zero_grad()
        small_loss(*pa).backward()
        small_loss(*pb).backward()
        both.step()
        for o in single:
            o.step()
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
    assert both.param_groups[0]["lr"] == single[0].param_groups[0]["lr"] != 0.1
    assert both.param_groups[1]["lr"] == single[1].param_groups[0]["lr"] != 0.05


def test_param_without_grad_is_skipped_and_its_stale_direction_dropped() -> None:
    p = torch.tensor([1.0, -2.0], dtype=DT, requires_grad=True)
    q = torch.tensor([0.5], dtype=DT, requires_grad=True)
    beta, lr0 = 0.01, 0.1
    opt = SGDHD([p, q], lr=lr0, hypergrad_lr=beta)

    def step(use_q: bool) -> None:
        opt.zero_grad()  # set_to_none: q.grad stays None when q is unused
        ((p**2).sum() + ((q**2).sum() if use_q else 0.0)).backward()
        opt.step()

    step(True)
    q1, u1 = q.detach().clone(), opt.state[q]["prev_direction"].clone()
    step(False)  # q has no gradient: does not move, and u1 must not enter the next h
    assert torch.equal(q.detach(), q1) and "prev_direction" not in opt.state[q]
    lr2, up = opt.param_groups[0]["lr"], opt.state[p]["prev_direction"].clone()
    gp = 2 * p.detach()
    step(True)
    assert u1.abs().sum() > 0
    assert opt.param_groups[0]["lr"] == pytest.approx(lr2 + beta * float(gp @ up), rel=1e-14)


@pytest.mark.parametrize("cls", [SGDHD, AdamHD])
def test_closure_loss_returned_and_sparse_gradients_rejected(
    cls: type[torch.optim.Optimizer],
) -> None:
    params = small_params()
    opt = cls(params, lr=0.01)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = small_loss(*params)
        loss.backward()
        return loss

    expected = small_loss(*params).item()
    assert opt.step(closure).item() == expected  # type: ignore[union-attr]
    assert opt.step() is None

    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt_s = cls(emb.parameters(), lr=0.01)
    emb(torch.tensor([1, 2])).sum().backward()
    w0 = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt_s.step()
    assert torch.equal(emb.weight.detach(), w0)


def test_lr_falls_when_successive_gradients_disagree() -> None:
    # f = theta^2 with alpha = 0.9 overshoots (theta flips sign each step): g_t . g_{t-1} < 0.
    th = torch.tensor([1.0], dtype=DT, requires_grad=True)
    opt = SGDHD([th], lr=0.9, hypergrad_lr=0.01)
    lrs = []
    for _ in range(4):
        opt.zero_grad()
        (th**2).sum().backward()
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == 0.9 and all(b < a for a, b in zip(lrs, lrs[1:]))
    assert math.isfinite(lrs[-1])
