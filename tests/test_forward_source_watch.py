"""ForwardMode's watch for SGD reads the tangents' own growth over their sources.

The probe (one more tangent with no source) cost one more direction of the batched
vector-Jacobian product at every step: 39.5 training steps per hyper-step on the MNIST MLP of
``benchmarks/hyperstep_cost.py`` where the goal is 30 (27.0 without it). For SGD (an update
linear in the parameters, buffers and gradient) the watch now reads, per hyperparameter,
``max_t ||Z_{t+1}|| / sum_{s <= t} ||B_s||`` from the tangents ``Z`` the hypergradient is
made of and their sources ``B_s`` (:class:`~hypergradient.methods.source_watch.SourceWatch`).
Checked here: the ratio's bound on exact recursions; the same decisions as the probe on the
panel of runs where the probe's decisions are pinned (recorded with the probe, main at
2c92374); and an unstable block that no hyperparameter steers and the outer loss does not
read, which the probe flagged and the watch does not, with a hypergradient that central
differences of any step confirm. Adam and the other updates keep the probe (its gain in
the gradient can blow up at a step: a start at the optimum, which no source ratio sees).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergradient as hg
from hypergradient.methods.forward_sources import LinearGains
from hypergradient.methods.source_watch import SourceWatch
from test_adv7_traj_adjoint_growth import P0, XV, YV, X, Y, inner, outer

DT = torch.float64


# ---- the ratio on exact recursions ---------------------------------------------------------
def _watch(jac, sources):
    """Z_{t+1} = J Z_t + B_t from Z_0 = 0, with rows (one per hyperparameter)."""
    watch, z = SourceWatch(), torch.zeros_like(sources[0])
    for b in sources:
        z = z @ jac.T + b
        watch.record([b], None, [z])
    return watch.growth(), z


def test_identity_jacobians_give_one_and_contractions_less():
    b = [torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=DT)] * 5
    assert _watch(torch.eye(2, dtype=DT), b)[0] == pytest.approx(1.0)
    got, _ = _watch(0.5 * torch.eye(2, dtype=DT), b)
    assert got == pytest.approx(1.0)  # the first step's ratio is 1: Z_1 = B_0


def test_the_ratio_is_at_most_the_products_growth_along_the_sources():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        jac = torch.randn(6, 6, generator=gen, dtype=DT) * 0.6
        b = [torch.randn(1, 6, generator=gen, dtype=DT) for _ in range(8)]
        got, _ = _watch(jac, b)
        bound = max(
            float(torch.linalg.vector_norm(torch.linalg.matrix_power(jac, k) @ b[s][0]))
            / float(torch.linalg.vector_norm(b[s][0]))
            for s in range(8)
            for k in range(8 - s)
        )
        assert 0 < got <= bound * (1 + 1e-12)


def test_a_growing_direction_is_read_and_overflow_and_nan_are_told():
    jac = torch.diag(torch.tensor([10.0, 0.5], dtype=DT))
    b = [torch.tensor([[1.0, 1.0]], dtype=DT)] * 8
    got, z = _watch(jac, b)  # Z_8 = (11111111, 1.99), over 8 sources of norm sqrt(2)
    assert got == pytest.approx(float(torch.linalg.vector_norm(z)) / (8 * 2**0.5), rel=1e-12)
    assert got > 9.8e5
    watch = SourceWatch()
    assert watch.growth() is None
    watch.record([torch.zeros(1, 2)], None, [torch.zeros(1, 2)])
    assert watch.growth() is None  # no source: nothing steers the run
    watch.record([torch.ones(1, 2)], None, [torch.full((1, 2), 3e38)])  # a float32 norm overflows
    assert watch.growth() == math.inf
    watch.record([torch.ones(1, 2)], None, [torch.full((1, 2), math.nan)])
    assert watch.growth() is None  # NaN: the finiteness checks' job


# ---- the same decisions as the probe on the runs it was measured on ------------------------
# the data and network: those of the adjoint-growth tests (imported above)
GEN = torch.Generator().manual_seed(0)  # for the data of the tests below


# (lr, steps, momentum, nesterov): the probe's growth and status (main, 2c92374)
PANEL = [
    ((0.44, 200, 0.0, False), 4.94, "fixed_budget"),  # 1.4 x 2 / lambda_max at the start
    ((0.6, 100, 0.0, False), 3.6e67, "diverged"),
    ((0.1, 100, 0.9, False), 2.35, "fixed_budget"),
    ((0.3, 100, 0.9, False), 59.5, "fixed_budget"),
    ((0.6, 100, 0.9, False), 5.7e55, "diverged"),
    ((0.2, 100, 0.9, True), 3.94, "fixed_budget"),
    ((0.4, 100, 0.9, True), 2.4e93, "diverged"),
]


@pytest.mark.parametrize(("setting", "probe", "status"), PANEL)
def test_sgd_runs_get_the_probes_decisions(setting, probe, status):
    lr, steps, momentum, nesterov = setting
    h = {"lr": torch.tensor(lr, dtype=DT)}
    opt = hg.optim.sgd(lr=h["lr"], momentum=momentum, nesterov=nesterov)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, info = hg.forward_mode(inner, outer, P0, h, steps, opt, return_info=True)
    assert info.stats["watch"] == "sources" and info.status.value == status
    growth = info.stats["tangent_growth"]
    assert (growth >= 1e6) == (probe >= 1e6)  # chaotic: the first rule
    assert (growth < 100) == (probe < 100)  # (the second rule needs a rising loss too)


def test_adam_keeps_the_probe():
    h = {"lr": torch.tensor(0.1, dtype=DT)}
    _, info = hg.forward_mode(inner, outer, P0, h, 5, hg.optim.adam(lr=h["lr"]), return_info=True)
    assert info.stats["watch"] == "probe" and info.stats["products"] == 10
    sgd = hg.optim.sgd(lr=h["lr"])
    _, info = hg.forward_mode(inner, outer, P0, h, 5, sgd, return_info=True)
    assert info.stats["watch"] == "sources" and info.stats["products"] == 5
    _, info = hg.forward_mode(inner, outer, P0, h, 5, sgd, hvp="first_order", return_info=True)
    assert info.stats["watch"] == "probe"  # sources by differences would cost 2 m gradients


# ---- an unstable block that the hypergradient does not depend on --------------------------
torch.manual_seed(0)
CHAOS = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
XC, YC = torch.randn(64, 4, generator=GEN, dtype=DT), torch.randn(64, 1, generator=GEN, dtype=DT)
A, B = torch.randn(20, 3, generator=GEN, dtype=DT), torch.randn(20, generator=GEN, dtype=DT)
AV, BV = torch.randn(20, 3, generator=GEN, dtype=DT), torch.randn(20, generator=GEN, dtype=DT)
STEPS = 30


def chaos_out(p, x):
    return torch.func.functional_call(CHAOS, {k: p[k] for k, _ in CHAOS.named_parameters()}, (x,))


def two_blocks(p, h, i):
    """A ridge regression (steered by ``decay``) and the chaotic net of
    test_adv13_traj_forward_growth (Nesterov SGD, lr 0.2, minibatches of 4), side by side."""
    rows = slice((4 * i) % 64, (4 * i) % 64 + 4)
    out = chaos_out(p, XC[rows])
    ridge = 0.5 * ((A @ p["a"] - B) ** 2).mean() + 0.5 * h["decay"] * (p["a"] ** 2).sum()
    chaos = F.mse_loss(out, YC[rows]) + h.get("pen", 0.0) * (p["0.weight"] ** 2).sum()
    return ridge + chaos


def start():
    p = {k: v.detach().clone() for k, v in CHAOS.named_parameters()}
    return {**p, "a": torch.zeros(3, dtype=DT)}


def run(h, outer_loss, steps=STEPS, method=hg.forward_mode, **kw):
    opt = hg.optim.sgd(lr=0.2, momentum=0.9, nesterov=True)
    batches = list(range(steps))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g, info = method(
            two_blocks, outer_loss, start(), h, steps, opt, batches=batches, return_info=True,
            **kw,
        )  # fmt: skip
    return g, info, [w for w in caught if "of no use" in str(w.message)]


def ridge_val(p, h):
    return 0.5 * ((AV @ p["a"] - BV) ** 2).mean()


def plain(decay, steps=STEPS):
    """The ridge block's validation loss after the run, by hand (no library method)."""
    a, buf = torch.zeros(3, dtype=DT), torch.zeros(3, dtype=DT)
    for t in range(steps):
        g = A.T @ (A @ a - B) / len(B) + decay * a
        buf = g if t == 0 else 0.9 * buf + g
        a = a - 0.2 * (g + 0.9 * buf)
    return float(0.5 * ((AV @ a - BV) ** 2).mean())


def hparams(decay=0.05, pen=None):
    h = {"decay": torch.tensor(decay, dtype=DT)}
    return h if pen is None else {**h, "pen": torch.tensor(pen, dtype=DT)}


def test_the_unstable_block_is_there():
    """The same run with an outer loss that reads the chaotic block, and a hyperparameter
    that steers it: flagged (and by Unrolled's adjoint)."""

    def chaos_val(p, h):
        return F.mse_loss(chaos_out(p, XC), YC)

    for method in (hg.forward_mode, hg.unrolled):
        _, info, unstable = run(hparams(pen=0.01), chaos_val, method=method)
        assert info.status == hg.Status.DIVERGED and len(unstable) == 1


def test_an_unstable_block_that_nothing_steers_leaves_the_hypergradient_usable():
    g, info, unstable = run(hparams(), ridge_val)
    assert info.stats["watch"] == "sources" and info.status == hg.Status.FIXED_BUDGET
    assert info.stats["tangent_growth"] < 100 and not unstable
    _, adjoint, _ = run(hparams(), ridge_val, method=hg.unrolled)  # the adjoint agrees
    assert adjoint.status == hg.Status.FIXED_BUDGET
    same, probe, _ = run(hparams(), ridge_val, hvp="first_order")  # the probe: 1.7e4 while
    assert probe.stats["watch"] == "probe" and probe.status == hg.Status.DIVERGED  # the loss
    assert float(same["decay"]) == pytest.approx(float(g["decay"]), rel=1e-6)  # rises 16x
    for eps in (1e-2, 1e-4, 1e-6):  # central differences of any step: the same number
        fd = (plain(0.05 + eps) - plain(0.05 - eps)) / (2 * eps)
        assert float(g["decay"]) == pytest.approx(fd, rel=1e-3 if eps > 1e-3 else 1e-6)


# ---- plain SGD: the sources' gains read once per pattern, as pushing them ------------------
def _growths(monkeypatch, run_it):
    """``tangent_growth`` of each hyper-step with the cached gains, then with the sources
    pushed through the update at every step (the general path)."""
    fast = run_it()
    monkeypatch.setattr(LinearGains, "of", staticmethod(lambda run: None))
    slow = run_it()
    return fast, slow


def _skipping(p, h, b):
    """The net's loss, and a leaf that only odd steps use (skipped at the even ones)."""
    extra = (p["extra"] ** 2).sum() if b % 2 else 0.0
    return inner(p, h) + h["decay"] * (p["w1"] ** 2).sum() + extra


@pytest.mark.parametrize(
    "opt",
    [
        hg.optim.sgd(0.1),
        hg.optim.sgd(0.1, momentum=0.9, weight_decay=1e-2),
        hg.optim.sgd(0.1, momentum=0.9, nesterov=True),
        hg.optim.sgd(0.1, momentum=0.5, dampening=0.3),
    ],
    ids=["plain", "momentum_decay", "nesterov", "dampening"],
)
def test_gains_give_the_pushed_sources_growth(monkeypatch, opt):
    p0 = {**P0, "extra": torch.ones(3, dtype=DT)}
    h = {"decay": torch.tensor(1e-3, dtype=DT)}

    def run_it():
        _, info = hg.forward_mode(
            _skipping, outer, p0, h, 12, opt, batches=list(range(12)), return_info=True
        )
        return [info.stats["tangent_growth"]]

    fast, slow = _growths(monkeypatch, run_it)
    assert fast == pytest.approx(slow, rel=1e-9) and fast[0] > 0


def test_gains_with_param_groups_across_windows(monkeypatch):
    """torch.optim.SGD with two param groups (lr, weight decay, momentum), two windows: the
    second starts at step 10 (no first update there), as the HyperOptimizer replays it."""

    def run_it():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        groups = [
            {"params": model[0].parameters(), "lr": 0.05, "weight_decay": 1e-2},
            {"params": model[2].parameters(), "lr": 0.2},
        ]
        hopt = hg.HyperOptimizer(
            model, {"decay": torch.tensor(1e-3, dtype=DT)},
            inner_optimizer=torch.optim.SGD(groups, momentum=0.9),
            outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
            train_loss=lambda m, h, b: F.mse_loss(m(b[0]), b[1])
            + h["decay"] * (m[0].weight ** 2).sum(),
            val_loss=lambda m, h, b: F.mse_loss(m(b[0]), b[1]), val_data=(XV, YV),
            method=hg.ForwardMode(), inner_steps=10,
        )  # fmt: skip
        for i in range(20):
            b = (X[(8 * i) % 64 :][:8], Y[(8 * i) % 64 :][:8])
            hopt.zero_grad()
            hopt.train_loss(b).backward()
            hopt.step(b)
        assert all(x.info.stats["watch"] == "sources" for x in hopt.history)
        return [x.info.stats["tangent_growth"] for x in hopt.history]

    fast, slow = _growths(monkeypatch, run_it)
    assert len(fast) == 2 and fast == pytest.approx(slow, rel=1e-9)


def test_sources_by_differences_after_a_fallback_to_first_order():
    """``hvp="auto"`` falling back to first order (a ``once_differentiable`` kernel): the
    sources are central differences along ``(0, e_k)``; the same ratio as double backward."""
    from test_trajectory_modes import _Cube, cube_problem

    make, val, w0, h = cube_problem()
    opt = hg.optim.sgd(lr=0.1)
    _, exact = hg.forward_mode(make(lambda w: w**3), val, w0, h, 6, opt, return_info=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        _, info = hg.forward_mode(make(_Cube.apply), val, w0, h, 6, opt, return_info=True)
    assert info.stats["hvp"] == "first_order" and info.stats["watch"] == "sources"
    assert info.stats["tangent_growth"] == pytest.approx(exact.stats["tangent_growth"], rel=1e-5)
