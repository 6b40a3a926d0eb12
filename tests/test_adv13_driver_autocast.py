"""``hopt.step()`` inside ``torch.autocast`` (the usual AMP loop: forward, backward and
step in one region).

The hyper-step inherited the region and computed everything in bfloat16: with training
identical in float32 and only ``hopt.step`` inside the region, T1T2's hypergradient was
3.9% off the float32 one, HOAG's 1.1%, Unrolled's 4.8% (with a "replay is not the run"
warning), silently. A hyper-step now runs outside autocast, except the replays of training
steps, which run in the autocast state of the step's forward pass (``hopt.train_loss``'s,
else the one around ``step()``): the same hypergradient whether ``step()`` is inside the
region or not, and no false warning; the checks that catch a replay that is not the run
still fire.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch import nn

import hypergradient as hg
from hypergradient.hyperoptimizer import precision

GEN = torch.Generator().manual_seed(0)
X, Y = torch.randn(64, 8, generator=GEN), torch.randn(64, 1, generator=GEN)
XV, YV = torch.randn(32, 8, generator=GEN), torch.randn(32, 1, generator=GEN)
STEPS = 4  # inner_steps=2: two hyper-steps


def train_loss(m, h, b):
    penalty = sum((p**2).sum() for n, p in m.named_parameters() if n.endswith("weight"))
    return ((m(b[0] * h["s"]) - b[1]) ** 2).mean() + h["d"] * penalty


def val_loss(m, h, b):
    return ((m(b[0]) - b[1]) ** 2).mean()


def mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def linear() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 1))


METHODS = {
    "T1T2": (hg.T1T2, mlp),
    "IFT": (lambda: hg.IFT(hg.CG(maxiter=40, tol=1e-6)), linear),
    "HOAG": (hg.HOAG, linear),
    "Unrolled": (hg.Unrolled, mlp),
}


def region(on: bool, device: str = "cpu", dtype: torch.dtype = torch.bfloat16):
    return torch.autocast(device, dtype=dtype) if on else contextlib.nullcontext()


POINTS: list = []


def run(name, train_in, step_in, device="cpu", dtype=torch.bfloat16, own_loss=False):
    """Hypergradients (flat) of a loop whose forward/backward run under autocast when
    ``train_in``, and whose ``hopt.step`` does when ``step_in``; and the warnings (the
    weights and batch of each hyper-step in ``POINTS``)."""
    POINTS.clear()
    method, build = METHODS[name]
    model = build().to(device)
    hopt = hg.HyperOptimizer(
        model,
        {"d": torch.tensor(0.01, device=device), "s": torch.ones(8, device=device)},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5),
        outer_optimizer=lambda r: torch.optim.SGD(r, lr=0.0),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(XV.to(device), YV.to(device)),
        method=method(),
        inner_steps=2,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(STEPS):
            batch = (X[16 * i : 16 * i + 16].to(device), Y[16 * i : 16 * i + 16].to(device))
            hopt.zero_grad()
            with region(train_in, device, dtype):  # the AMP loop: all in one region
                loss = train_loss(model, hopt.hparams, batch) if own_loss else None
                loss = hopt.train_loss(batch) if loss is None else loss
                loss.backward()
                if step_in and train_in:
                    hopt.step(batch)
            if not train_in:
                with region(step_in, device, dtype):
                    hopt.step(batch)
            elif not step_in:
                hopt.step(batch)
            if i % 2:
                POINTS.append(([p.detach().clone() for p in model.parameters()], batch))
    assert hopt.skipped == 0 and len(hopt.history) == STEPS // 2
    grads = [torch.cat([r.hypergrad["d"].reshape(1), r.hypergrad["s"]]) for r in hopt.history]
    return [g.double().cpu() for g in grads], [str(w.message) for w in caught]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", list(METHODS))
def test_a_hyper_step_inside_autocast_is_the_float32_hyper_step(name):
    # training identical in float32; only hopt.step is inside the region
    exact, none = run(name, train_in=False, step_in=False)
    inside, caught = run(name, train_in=False, step_in=True)
    assert none == [] and caught == []
    assert all(float(g.norm()) > 0 for g in exact)
    for a, b in zip(inside, exact):
        assert rel(a, b) <= 1e-6  # was 3.9e-2 (T1T2), 1.1e-2 (HOAG), 4.8e-2 (Unrolled)


def dense_float64_ift(weights, batch, h) -> torch.Tensor:
    """The implicit hypergradient of the linear model at ``weights``, in float64:
    ``dg/dh - (d2f/dh dtheta)^T H^-1 dg/dtheta`` with the dense Hessian."""
    w0 = torch.cat([w.reshape(-1) for w in weights]).double()
    x, y = batch[0].double(), batch[1].double()

    def f(theta, lam):
        w, b = theta[:8], theta[8]
        return ((x * lam[1:]) @ w + b - y[:, 0]).pow(2).mean() + lam[0] * w.pow(2).sum()

    def g(theta):
        return ((XV.double() @ theta[:8] + theta[8] - YV.double()[:, 0]) ** 2).mean()

    hess = torch.autograd.functional.hessian(lambda t: f(t, h), w0)
    mixed = torch.autograd.functional.jacobian(
        lambda lam: torch.autograd.grad(f(w0.requires_grad_(), lam), w0, create_graph=True)[0], h
    )  # (theta, lam)
    gt = torch.autograd.functional.jacobian(g, w0)
    return -mixed.T @ torch.linalg.solve(hess, gt)


@pytest.mark.parametrize("train_in", [False, True])
def test_ift_hyper_step_inside_autocast_matches_a_dense_float64_solve(train_in):
    h = torch.cat([torch.tensor([0.01]), torch.ones(8)]).double()
    grads, caught = run("IFT", train_in=train_in, step_in=True)  # (train_in: the AMP loop)
    assert caught == []  # before: CG warned its tolerance was out of bfloat16's reach
    for got, (weights, batch) in zip(grads, POINTS):
        exact = dense_float64_ift(weights, batch, h)
        assert rel(got, exact) <= 1e-5  # 1.7e-7 (bfloat16 products: 3e-3 to 7e-3 before)


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("own_loss", [False, True])
def test_the_amp_loop_gets_the_hyper_step_of_the_same_loop_stepping_outside(name, own_loss):
    reference, _ = run(name, train_in=False, step_in=False)  # float32 training
    inside, caught_in = run(name, train_in=True, step_in=True, own_loss=own_loss)
    assert caught_in == []  # no "the replay is not the run" warning (Unrolled)
    if not own_loss:  # the step's train_loss call recorded its autocast state
        outside, caught_out = run(name, train_in=True, step_in=False)
        assert caught_out == []  # Unrolled replays the bfloat16 steps: no false warning
        for a, b in zip(inside, outside):
            assert rel(a, b) <= 1e-6  # was 2.9e-3 apart (T1T2)
    for a, b in zip(inside, reference):
        assert rel(a, b) <= 3e-2  # bfloat16 training: rounding of the trained weights


def test_the_replay_checks_still_fire_under_autocast():
    # gradient clipping in an AMP loop: the replay is not the run, and says so
    method, build = METHODS["Unrolled"]
    model = build()
    hopt = hg.HyperOptimizer(
        model,
        {"d": torch.tensor(0.01), "s": torch.ones(8)},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        outer_optimizer=lambda r: torch.optim.SGD(r, lr=0.0),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(XV, YV),
        method=method(),
        inner_steps=2,
    )
    with pytest.warns(hg.HypergradientWarning, match="replay"):
        for i in range(2):
            batch = (X[16 * i : 16 * i + 16], Y[16 * i : 16 * i + 16])
            hopt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                hopt.train_loss(batch).backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
                hopt.step(batch)


def _dropout_run(between: bool) -> tuple[int, list[str]]:
    """T1T2 on a model with dropout, the loop's own loss, everything under autocast;
    ``between``: something draws random numbers between the steps."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 1))
    hopt = hg.HyperOptimizer(
        model,
        {"d": torch.tensor(0.01), "s": torch.ones(8)},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        outer_optimizer=lambda r: torch.optim.SGD(r, lr=0.0),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(XV, YV),
        method=hg.T1T2(),
        inner_steps=2,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(STEPS):
            batch = (X[16 * i : 16 * i + 16], Y[16 * i : 16 * i + 16])
            hopt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                train_loss(model, hopt.hparams, batch).backward()
                hopt.step(batch)
            if between:
                torch.rand(3)  # a draw the replay cannot know of
    return hopt.skipped, [str(w.message) for w in caught]


def test_t1t2_draws_check_replays_as_the_step_did():
    skipped, caught = _dropout_run(between=False)
    assert skipped == 0 and caught == []  # a float32 replay of the step is ~1e-2 away
    skipped, caught = _dropout_run(between=True)
    assert skipped == 2 and all("points" in c for c in caught)


def test_autocast_as_sets_exactly_the_given_state_and_restores():
    cpu = torch.device("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outer = precision.state(cpu)
        assert outer == (("cpu", torch.bfloat16),)
        with precision.autocast_as(None, cpu):
            assert precision.state(cpu) == ()
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
            with precision.autocast_as(outer, cpu):
                assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
        assert precision.state(cpu) == outer
    assert precision.state(cpu) == ()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", list(METHODS))
def test_cuda_float16_autocast(name):
    kw = {"device": "cuda", "dtype": torch.float16}
    exact, _ = run(name, train_in=False, step_in=False, device="cuda")
    inside, caught = run(name, train_in=False, step_in=True, **kw)
    assert caught == []
    for a, b in zip(inside, exact):
        assert rel(a, b) <= 1e-5
    amp, caught = run(name, train_in=True, step_in=True, **kw)
    outside, caught_out = run(name, train_in=True, step_in=False, **kw)
    assert caught == [] and caught_out == []
    for a, b, c in zip(amp, outside, exact):
        assert rel(a, b) <= 1e-5 and rel(a, c) <= 3e-2
