"""float16 AMP with ``torch.amp.GradScaler``: ``scaler.step(hopt, batch)``.

Before, ``scaler.step(hopt, batch)`` raised ``AttributeError`` (no ``param_groups``), and
the only way to use a scaler was ``scaler.step(inner_optimizer)`` between ``begin_step``
and ``end_step``, which recorded a step the scaler skipped (inf/NaN gradients) as taken:
with the loop's own loss the hyper-steps then came at other steps (T1T2 0.57 and 1.07,
IFT 1.0 and 7.6 relative off the run without the overflowing batch), with
``hopt.train_loss`` the overflowing loss raised ``NonFiniteHypergradientError``.

Now ``HyperOptimizer`` follows torch's contract for optimizers that handle the scaling
themselves: the gradients are unscaled with the scaler's kernel, a skipped step is
neither taken nor recorded, and the hyper-step never sees the scale. References: the same
loop without loss scaling (the scale is a power of 2: equal to rounding), the float32
loop (to float16's rounding of the trained weights), a dense float64 implicit solve at
the trained weights (IFT), and the run without the overflowing batch.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hypergradient as hg

# the autocast tests' data and the dense float64 reference of the same linear model on it
from test_adv13_driver_autocast import XV, YV, X, Y, dense_float64_ift

GOOD = [(X[16 * i : 16 * i + 16], Y[16 * i : 16 * i + 16]) for i in range(4)]
BAD = (torch.full((16, 8), 1e6), Y[:16])  # overflows float16: the scaler skips its step
WITH_BAD = GOOD[:1] + [BAD] + GOOD[1:]
WITH_INF = GOOD[:1] + [(torch.full((16, 8), float("inf")), Y[:16])] + GOOD[1:]  # (bfloat16)
H = torch.cat([torch.tensor([0.01]), torch.ones(8)]).double()


def train_loss(m, h, b):
    penalty = sum((p**2).sum() for n, p in m.named_parameters() if n.endswith("weight"))
    return ((m(b[0] * h["s"]) - b[1]) ** 2).mean() + h["d"] * penalty


def val_loss(m, h, b):
    return ((m(b[0]) - b[1]) ** 2).mean()


METHODS = {
    "T1T2": (hg.T1T2, False),
    "IFT": (lambda: hg.IFT(hg.CG(maxiter=40, tol=1e-7)), True),
    "HOAG": (hg.HOAG, True),
    "Unrolled": (hg.Unrolled, False),
}


def build(name, device="cpu"):
    method, linear = METHODS[name]
    torch.manual_seed(1)
    layers = [nn.Linear(8, 1)] if linear else [nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)]
    model = nn.Sequential(*layers).to(device)
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    hopt = hg.HyperOptimizer(
        model,
        {"d": torch.tensor(0.01, device=device), "s": torch.ones(8, device=device)},
        inner_optimizer=inner,
        outer_optimizer=lambda r: torch.optim.SGD(r, lr=0.0),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(XV.to(device), YV.to(device)),
        method=method(),
        inner_steps=2,
    )
    return model, inner, hopt


POINTS: list = []  # (weights, batch) after each hyper-step's step


def run(name, batches, *, dtype=torch.float16, scale=2.0**8, mode="hopt", own=False, clip=None):
    """The AMP loop: forward under autocast (``dtype``; None: float32), scaled backward,
    ``scaler.step(hopt, batch)`` (``mode="outside"``: ``scaler.step(inner)`` between
    ``begin_step`` and ``end_step``), ``scaler.update()``. Hypergradients, steps counted,
    the warnings."""
    POINTS.clear()
    device = "cuda" if mode == "cuda" else "cpu"
    model, inner, hopt = build(name, device)
    scaler = torch.amp.GradScaler(device, init_scale=scale, enabled=dtype is not None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in batches:
            b = (x.to(device), y.to(device))
            hopt.zero_grad()
            if mode == "outside":
                hopt.begin_step()
            with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = train_loss(model, hopt.hparams, b) if own else hopt.train_loss(b)
            scaler.scale(loss).backward()
            if clip is not None:
                scaler.unscale_(hopt)
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            if mode == "outside":
                scaler.step(inner)
                scaler.update()
                hopt.end_step(b)
            else:
                count = hopt.loop.count
                scaler.step(hopt, b)
                scaler.update()
                if hopt.loop.count > count and hopt.loop.count % 2 == 0:
                    POINTS.append(([p.detach().clone() for p in model.parameters()], b))
    grads = [torch.cat([r.hypergrad["d"].reshape(1), r.hypergrad["s"]]) for r in hopt.history]
    messages = [str(w.message) for w in caught if "jit" not in str(w.message)]
    return [g.double().cpu() for g in grads], hopt.loop.count, messages


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(METHODS))
def test_scaler_step_of_hopt_is_the_unscaled_amp_loop_and_skips_overflowing_steps(name, dtype):
    unscaled, _, quiet = run(name, GOOD, dtype=dtype, scale=1.0)  # the scale: 1, exact
    bad = WITH_BAD if dtype is torch.float16 else WITH_INF  # (1e6 is finite in bfloat16)
    scaled, count, caught = run(name, bad, dtype=dtype)  # 2^8, one skipped step
    assert quiet == [] and caught == []  # no warning: the skipped step is no event
    assert count == 4 and len(scaled) == 2  # the skipped step is not a step of the run
    for a, b in zip(scaled, unscaled):
        assert rel(a, b) <= 1e-6  # the scale never reaches a hypergradient (was: AttributeError)
    if dtype is torch.float16:
        reference, _, _ = run(name, GOOD, dtype=None)  # the float32 loop
        for a, b in zip(scaled, reference):
            assert rel(a, b) <= 3e-3  # float16 training (measured 6e-5 to 6e-4)


def test_ift_in_a_float16_scaler_loop_matches_a_dense_float64_solve():
    grads, _, caught = run("IFT", WITH_BAD)
    assert caught == [] and len(grads) == len(POINTS) == 2
    for got, (weights, batch) in zip(grads, POINTS):
        assert rel(got, dense_float64_ift(weights, batch, H)) <= 1e-5


@pytest.mark.parametrize("name", ["T1T2", "Unrolled"])
def test_a_step_the_scaler_skipped_outside_is_not_recorded_by_end_step(name):
    # scaler.step(inner) between begin_step and end_step (a Trainer's loop), own loss
    clean, _, _ = run(name, GOOD, mode="outside", own=True)
    grads, count, caught = run(name, WITH_BAD, mode="outside", own=True)
    assert caught == [] and count == 4  # was 5: the skipped step counted
    for a, b in zip(grads, clean):
        assert rel(a, b) <= 1e-6  # was 0.57 / 1.07 off (T1T2)


def test_unscale_then_clip_is_checked_as_clipping_and_a_no_op_clip_is_quiet():
    plain, _, _ = run("T1T2", GOOD, own=True)
    kept, _, quiet = run("T1T2", GOOD, own=True, clip=1e6)  # unscale_(hopt), clip: no-op
    assert quiet == []
    for a, b in zip(kept, plain):
        assert rel(a, b) <= 1e-6
    _, _, caught = run("T1T2", GOOD, clip=1e-2)  # a real clip: T1T2 says so
    assert len(caught) == 2 and all("not train_loss's gradient" in c for c in caught)


def test_hopt_exposes_the_inner_param_groups_for_the_scaler():
    _, inner, hopt = build("IFT")
    assert hopt.param_groups is inner.param_groups
    assert hopt._step_supports_amp_scaling


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", list(METHODS))
def test_cuda_float16_scaler_loop(name):
    unscaled, _, _ = run(name, GOOD, mode="cuda", scale=1.0)
    scaled, count, caught = run(name, WITH_BAD, mode="cuda", scale=2.0**8)
    assert caught == [] and count == 4
    for a, b in zip(scaled, unscaled):
        assert rel(a, b) <= 1e-5


def test_hopt_step_after_scaler_step_of_the_inner_optimizer_is_refused_up_front():
    model, inner, hopt = build("T1T2")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    hopt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = hopt.train_loss(GOOD[0])
    scaler.scale(loss).backward()
    scaler.step(inner)  # the wrapped optimizer stepped by the scaler...
    scaler.update()
    stepped = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"scaler\.step\(hopt, batch\)"):
        hopt.step(GOOD[0])  # ... and again by hopt: refused (was: a second step)
    assert hopt.loop.count == 0
    assert all(torch.equal(a, p) for a, p in zip(stepped, model.parameters()))


def test_steps_of_the_inner_optimizer_before_hopt_takes_over_are_not_refused():
    # a warm-up that steps the inner optimizer itself, then the hyper-optimizer's loop
    model, inner, hopt = build("T1T2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i, b in enumerate(GOOD * 2):
            hopt.zero_grad()
            train_loss(model, hopt.hparams, b).backward()
            inner.step() if i < 4 else hopt.step(b)
    assert hopt.loop.count == 4 and len(hopt.history) == 2


def _small_loss_run(method, dtype, dropout=False, between=False, steps=4):
    """A training loss of order 1e-4 (lr 500: the dynamics of a loss of order 1 at lr
    0.05), whose unscaled float16 backward pass underflows; own loss, ``scaler.step``."""

    def small(m, h, b):
        return 1e-4 * ((m(b[0] * h["s"]) - b[1]) ** 2).mean()

    torch.manual_seed(1)
    drop = [nn.Dropout(0.3)] if dropout else []
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), *drop, nn.Linear(16, 1))
    hopt = hg.HyperOptimizer(
        model,
        {"s": torch.ones(8)},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=500.0),
        outer_optimizer=lambda r: torch.optim.SGD(r, lr=0.0),
        train_loss=small,
        val_loss=val_loss,
        val_data=(XV, YV),
        method=method,
        inner_steps=2,
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, enabled=dtype is not None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(steps):
            b = GOOD[i % 4]
            hopt.zero_grad()
            with torch.autocast("cpu", dtype=dtype or torch.float16, enabled=dtype is not None):
                loss = small(model, hopt.hparams, b)
            scaler.scale(loss).backward()
            scaler.step(hopt, b)
            scaler.update()
            if between:
                torch.rand(3)  # a draw the replay cannot know of
    grads = [r.hypergrad["s"].double() for r in hopt.history]
    return grads, hopt.skipped, [str(w.message) for w in caught]


def test_unrolled_replays_float16_steps_in_float32_where_float16_underflows_unscaled():
    reference, _, _ = _small_loss_run(hg.Unrolled(), None)  # the float32 loop
    grads, _, caught = _small_loss_run(hg.Unrolled(), torch.float16)
    assert caught == []  # a float16 replay: "ended 3.1e-4 away" twice
    assert rel(grads[0], reference[0]) <= 1e-6  # the first window: the float32 loop's
    assert rel(grads[1], reference[1]) <= 1e-3  # (float16 replay: 2.1e-3, 1.4e-3)


def test_t1t2_draws_check_replays_a_float16_step_with_the_loss_scale():
    _, skipped, caught = _small_loss_run(hg.T1T2(), torch.float16, dropout=True, steps=6)
    assert skipped == 0 and caught == []  # unscaled: all 3 hyper-steps skipped
    _, skipped, caught = _small_loss_run(hg.T1T2(), torch.float16, dropout=True, between=True)
    assert skipped == 2 and all("points" in c for c in caught)  # still caught


def test_a_tensor_the_inner_optimizer_steps_outside_the_model_is_unscaled_too():
    def steps(scale):
        torch.manual_seed(1)
        model, temperature = nn.Linear(8, 1), torch.ones((), requires_grad=True)
        inner = torch.optim.SGD([*model.parameters(), temperature], lr=0.05)
        hopt = hg.HyperOptimizer(
            model,
            {"d": torch.tensor(0.01), "s": torch.ones(8)},
            inner_optimizer=inner,
            outer_optimizer=lambda r: torch.optim.SGD(r, lr=0.0),
            train_loss=train_loss,
            val_loss=val_loss,
            val_data=(XV, YV),
            inner_steps=2,
        )
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        for b in GOOD[:2]:
            hopt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = hopt.train_loss(b) * temperature
            scaler.scale(loss).backward()
            scaler.step(hopt, b)
            scaler.update()
        return float(temperature.detach())

    assert steps(2.0**8) == steps(1.0) != 1.0  # was stepped with 256 times its gradient
