"""Trajectory hypergradients against finite differences, identities between methods, and
the functional optimizers against torch.optim."""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg
from conftest import to_device

DT = torch.float64
GEN = torch.Generator().manual_seed(7)
X = torch.randn(40, 5, generator=GEN, dtype=DT)
Y = torch.randn(40, generator=GEN, dtype=DT)
XV = torch.randn(30, 5, generator=GEN, dtype=DT)
YV = torch.randn(30, generator=GEN, dtype=DT)
W0 = 0.1 * torch.randn(5, generator=GEN, dtype=DT)


def make_losses(X, Y, XV, YV):
    """The inner and outer losses on this data (moved to a device for the device tests)."""

    def inner(w, h):
        # a mildly non-quadratic loss so that the Hessian changes along the trajectory
        r = X @ w - Y
        return (
            0.5 * (r**2).mean()
            + 0.1 * torch.log(torch.cosh(r)).mean()
            + 0.5 * (h["decay"] * w**2).sum()
        )

    def outer(w, h):
        return 0.5 * ((XV @ w - YV) ** 2).mean()

    return inner, outer


inner, outer = make_losses(X, Y, XV, YV)


def hparams():
    return {
        "decay": torch.linspace(0.05, 0.3, 5, dtype=DT),
        "lr": torch.tensor(0.1, dtype=DT),
        "momentum": torch.tensor(0.7, dtype=DT),
    }


def run_loop(h, opt_factory, steps, w0=W0):
    """The same inner loop written directly with autograd, for finite differences."""
    opt = opt_factory(h)
    p = [w0.clone()]
    state = opt.init(p)
    for t in range(steps):
        g = torch.func.grad(inner)(p[0], h)
        p, state = opt.update(p, [g], state, t)
    return outer(p[0], h)


def finite_differences(h, opt_factory, steps, eps=1e-6):
    out = {}
    for k, v in h.items():
        grad = torch.zeros_like(v)
        for i in range(v.numel()):
            e = torch.zeros_like(v).reshape(-1)
            e[i] = eps
            e = e.reshape(v.shape)
            plus = run_loop({**h, k: v + e}, opt_factory, steps)
            minus = run_loop({**h, k: v - e}, opt_factory, steps)
            grad.reshape(-1)[i] = (plus - minus) / (2 * eps)
        out[k] = grad
    return out


def flat(d):
    return torch.cat([d[k].reshape(-1) for k in sorted(d)])


def rel(a, b):
    return float((flat(a) - flat(b)).norm() / flat(b).norm())


def cpu(d):
    return {k: v.cpu() for k, v in d.items()}


OPTIMIZERS = {
    "sgd": lambda h: hg.optim.sgd(lr=h["lr"]),
    "momentum": lambda h: hg.optim.sgd(lr=h["lr"], momentum=h["momentum"]),
    "nesterov": lambda h: hg.optim.sgd(lr=h["lr"], momentum=h["momentum"], nesterov=True),
    "adam": lambda h: hg.optim.adam(lr=h["lr"], betas=(h["momentum"], 0.99)),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_unrolled_matches_finite_differences(name):
    h = hparams()
    if name == "sgd":
        h.pop("momentum")
    if name == "adam":
        h["lr"] = torch.tensor(0.03, dtype=DT)
    factory = OPTIMIZERS[name]
    steps = 12
    got = hg.unrolled(inner, outer, W0, h, steps, factory(h))
    fd = finite_differences(h, factory, steps)
    assert rel(got, fd) < 1e-7
    # learning rate and momentum receive hypergradients
    assert float(got["lr"].abs()) > 1e-4


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_forward_mode_equals_reverse_mode(name, device):
    h_cpu = hparams()
    ref = hg.unrolled(inner, outer, W0, h_cpu, 10, OPTIMIZERS[name](h_cpu))
    h = to_device(device, hparams())
    f, g = make_losses(*to_device(device, (X, Y, XV, YV)))
    w0 = to_device(device, W0)
    opt = OPTIMIZERS[name](h)
    rev = hg.unrolled(f, g, w0, h, 10, opt)
    assert all(v.device == w0.device for v in rev.values())
    assert rel(cpu(rev), ref) < 1e-12
    fwd, info = hg.forward_mode(f, g, w0, h, 10, opt, return_info=True)
    assert rel(cpu(fwd), ref) < 1e-12
    fwd_chunked = hg.forward_mode(f, g, w0, h, 10, opt, chunk_size=2)
    assert rel(cpu(fwd_chunked), ref) < 1e-12
    assert info.stored_states == 1


def test_truncation_and_checkpointing():
    h = hparams()
    opt = OPTIMIZERS["momentum"](h)
    full, info = hg.unrolled(inner, outer, W0, h, 13, opt, return_info=True)
    assert info.stored_states == 13 and info.reverse_steps == 13
    same = hg.unrolled(inner, outer, W0, h, 13, opt, truncate=13)
    assert rel(same, full) == 0.0
    for c in (1, 3, 5, 13):
        ck, cinfo = hg.unrolled(inner, outer, W0, h, 13, opt, checkpoint_every=c, return_info=True)
        assert rel(ck, full) < 1e-14
        assert cinfo.stored_states <= -(-13 // c) + c
    # truncated to K steps = unrolled through the last K steps from theta_{T-K}, with the
    # optimizer state at T-K (computed without differentiating the first T-K steps)
    tr = hg.unrolled(inner, outer, W0, h, 13, opt, truncate=4, checkpoint_every=2)
    tr_full = hg.unrolled(inner, outer, W0, h, 13, opt, truncate=4)
    assert rel(tr, tr_full) < 1e-14
    assert rel(tr, full) > 1e-6  # it is an approximation


def test_truncated_sgd_matches_manual_truncation():
    """Plain SGD has no state: truncation to K = unrolling K steps from theta_{T-K}."""
    h = {"decay": torch.linspace(0.05, 0.3, 5, dtype=DT), "lr": torch.tensor(0.1, dtype=DT)}
    opt = hg.optim.sgd(lr=h["lr"])
    _, info = hg.unrolled(inner, outer, W0, h, 6, opt, return_info=True)
    w6 = info.params
    tr = hg.unrolled(inner, outer, W0, h, 10, opt, truncate=4)
    manual = hg.unrolled(inner, outer, w6, h, 4, opt)
    assert rel(tr, manual) < 1e-13


def test_unrolled_sgd_from_optimum_equals_neumann_series():
    """i SGD steps from theta* of a quadratic = i-term Neumann series with alpha = lr."""
    lam = torch.linspace(0.05, 0.3, 5, dtype=DT)

    def quad(w, h):
        return 0.5 * ((X @ w - Y) ** 2).mean() + 0.5 * (h * w**2).sum()

    A = X.T @ X / X.shape[0] + torch.diag(lam)
    w_star = torch.linalg.solve(A, X.T @ Y / X.shape[0])
    lr = 0.3
    for i in (1, 2, 5, 20):
        unr = hg.unrolled(quad, outer, w_star, lam, i, hg.optim.sgd(lr=lr))
        # Neumann(iters=k) sums k + 1 terms
        if i == 1:
            neu = hg.implicit(quad, outer, w_star, lam, hg.Identity(lr))
        else:
            neu = hg.implicit(quad, outer, w_star, lam, hg.Neumann(maxiter=i - 1, alpha=lr))
        assert torch.allclose(unr, neu, rtol=1e-10, atol=1e-14), i


def test_drmad_points_the_right_way():
    h = hparams()
    for name in ("sgd", "momentum"):
        hh = dict(h)
        if name == "sgd":
            hh.pop("momentum")
        opt = OPTIMIZERS[name](hh)
        exact = hg.unrolled(inner, outer, W0, hh, 30, opt)
        approx, info = hg.drmad(inner, outer, W0, hh, 30, opt, return_info=True)
        cos = float(flat(exact) @ flat(approx) / (flat(exact).norm() * flat(approx).norm()))
        assert cos > 0.5, (name, cos)
        assert info.stored_states == 2


def test_drmad_is_exact_when_the_trajectory_does_not_move(device):
    """Started at the minimum of a quadratic, the straight line is the trajectory."""
    lam = torch.linspace(0.05, 0.3, 5, dtype=DT)
    A = X.T @ X / X.shape[0] + torch.diag(lam)
    w_star = torch.linalg.solve(A, X.T @ Y / X.shape[0])
    Xd, Yd, lam, w_star = to_device(device, (X, Y, lam, w_star))
    _, outer_d = make_losses(*to_device(device, (X, Y, XV, YV)))

    def quad(w, h):
        return 0.5 * ((Xd @ w - Yd) ** 2).mean() + 0.5 * (h * w**2).sum()

    a = hg.drmad(quad, outer_d, w_star, lam, 8, hg.optim.sgd(lr=0.2))
    b = hg.unrolled(quad, outer_d, w_star, lam, 8, hg.optim.sgd(lr=0.2))
    assert a.device == b.device == w_star.device
    assert torch.allclose(a.cpu(), b.cpu(), rtol=1e-10, atol=1e-14)


def test_minibatches_and_randomness_are_replayed(device):
    g = torch.Generator().manual_seed(3)
    batches = to_device(device, [torch.randperm(40, generator=g)[:10] for _ in range(8)])
    Xd, Yd, w0 = to_device(device, (X, Y, W0))
    _, outer_d = make_losses(*to_device(device, (X, Y, XV, YV)))

    def inner_b(w, h, idx):
        # dropout-like random mask, drawn by the device's generator (CUDA's on a GPU): the
        # reverse pass must see the same draws
        mask = (torch.rand(5, dtype=DT, device=w.device) > 0.3).to(DT)
        r = Xd[idx] @ (w * mask) - Yd[idx]
        return 0.5 * (r**2).mean() + 0.5 * (h["decay"] * w**2).sum()

    h = {"decay": torch.full((5,), 0.1, dtype=DT), "lr": torch.tensor(0.2, dtype=DT)}
    h = to_device(device, h)
    opt = hg.optim.sgd(lr=h["lr"], momentum=0.5)
    torch.manual_seed(0)
    rev = hg.unrolled(inner_b, outer_d, w0, h, 8, opt, batches=iter(batches))
    torch.manual_seed(0)
    ck = hg.unrolled(inner_b, outer_d, w0, h, 8, opt, batches=batches, checkpoint_every=3)
    torch.manual_seed(0)
    fwd = hg.forward_mode(inner_b, outer_d, w0, h, 8, opt, batches=batches)
    assert rel(ck, rev) < 1e-13
    assert rel(fwd, rev) < 1e-12

    # finite differences of the same random loop (same seed per evaluation)
    def loop(hh):
        torch.manual_seed(0)
        o = hg.optim.sgd(lr=hh["lr"], momentum=0.5)
        p, st = [w0.clone()], o.init([w0])
        for t, idx in enumerate(batches):
            gr = torch.func.grad(inner_b)(p[0], hh, idx)
            p, st = o.update(p, [gr], st, t)
        return outer_d(p[0], hh)

    eps = 1e-6
    fd = (loop({**h, "lr": h["lr"] + eps}) - loop({**h, "lr": h["lr"] - eps})) / (2 * eps)
    assert abs(float(fd - rev["lr"])) < 1e-7 * max(1.0, abs(float(fd)))


@pytest.mark.parametrize(
    "name,torch_opt,kwargs",
    [
        ("sgd", torch.optim.SGD, dict(lr=0.1)),
        ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
        ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
        ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.3)),
        ("adam", torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.01)),
    ],
)
def test_functional_optimizers_match_torch_optim(name, torch_opt, kwargs):
    w_ref = torch.nn.Parameter(W0.clone())
    ref = torch_opt([w_ref], **kwargs)
    mine = (hg.optim.sgd if name == "sgd" else hg.optim.adam)(**kwargs)
    p = [W0.clone()]
    state = mine.init(p)
    for t in range(15):
        ref.zero_grad()
        inner(w_ref, {"decay": torch.zeros(5, dtype=DT)}).backward()
        ref.step()
        g = torch.func.grad(inner)(p[0], {"decay": torch.zeros(5, dtype=DT)})
        p, state = mine.update(p, [g], state, t)
    assert torch.allclose(p[0], w_ref.detach(), rtol=1e-12, atol=1e-14)


def test_adam_zero_gradient_coordinates_do_not_give_nan():
    def inner0(w, h):  # w[4] never gets a gradient
        return 0.5 * ((X[:, :4] @ w[:4] - Y) ** 2).mean() + 0.5 * (h[:4] * w[:4] ** 2).sum()

    h = torch.full((5,), 0.1, dtype=DT)
    out = hg.unrolled(inner0, outer, torch.zeros(5, dtype=DT), h, 5, hg.optim.adam(lr=0.01))
    assert bool(torch.isfinite(out).all())


def test_tensor_setting_outside_hparams_warns():
    h = hparams()
    with pytest.warns(hg.HypergradientWarning, match="lr.*not one of"):
        out = hg.unrolled(inner, outer, W0, h, 3, hg.optim.sgd(lr=h["lr"] * 0.5))
    assert float(out["lr"]) == 0.0


def test_bad_input():
    h = hparams()
    opt = OPTIMIZERS["momentum"](h)
    with pytest.raises(ValueError, match="steps"):
        hg.unrolled(inner, outer, W0, h, 0, opt)
    with pytest.raises(ValueError, match="truncate"):
        hg.unrolled(inner, outer, W0, h, 3, opt, truncate=4)
    with pytest.raises(TypeError, match="optimizer"):
        hg.unrolled(inner, outer, W0, h, 3, torch.optim.SGD([torch.nn.Parameter(W0)], lr=0.1))
    with pytest.raises(ValueError, match="batches"):
        hg.unrolled(lambda w, hh, b: inner(w, hh), outer, W0, h, 3, opt, batches=[1, 2])
    with pytest.raises(ValueError, match="inner_loss.*scalar"):
        hg.unrolled(lambda w, hh: w, outer, W0, h, 3, opt)
    with pytest.raises(ValueError, match="outer_loss.*scalar"):
        hg.forward_mode(inner, lambda w, hh: w, W0, h, 3, opt)
    with pytest.raises(TypeError, match=r"params0\[0\].*int64"):
        hg.drmad(inner, outer, [torch.arange(5)], h, 3, opt)
    with pytest.raises(ValueError, match="lr"):
        hg.optim.sgd(lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        hg.optim.adam(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="nesterov"):
        hg.optim.sgd(lr=0.1, nesterov=True)
    init = W0.clone()  # the initialization as a hyperparameter: zero hypergradient otherwise
    with pytest.raises(ValueError, match=r"\['init'\].*also a leaf of `params0`"):
        hg.unrolled(inner, outer, init, {"init": init, **h}, 3, opt)


def test_divergent_run_raises_instead_of_returning_nan():
    h = {"decay": torch.full((5,), 0.1, dtype=DT), "lr": torch.tensor(1e3, dtype=DT)}
    with pytest.raises(hg.NonFiniteHypergradientError, match="not finite"):
        hg.unrolled(inner, outer, W0, h, 200, hg.optim.sgd(lr=h["lr"]))


def test_inputs_not_modified_and_result_detached():
    h = hparams()
    before = {k: v.clone() for k, v in h.items()}
    w0 = W0.clone().requires_grad_()
    out, info = hg.unrolled(inner, outer, w0, h, 5, OPTIMIZERS["momentum"](h), return_info=True)
    assert all(torch.equal(h[k], before[k]) and not h[k].requires_grad for k in h)
    assert torch.equal(w0.detach(), W0) and w0.grad is None
    assert all(not v.requires_grad for v in out.values())
    assert set(out) == set(h) and out["lr"].shape == ()
    assert len(info.inner_losses) == 5 and info.inner_losses[-1] < info.inner_losses[0]


def test_recorded_rng_states_replay_the_real_dropout_masks():
    """Trajectory.rng_states: every replay of step t draws the real run's masks."""
    h = {"decay": torch.full((5,), 0.1, dtype=DT), "lr": torch.tensor(0.2, dtype=DT)}

    def loss(w, hh, batch):  # dropout-like mask from the global generator
        mask = (torch.rand(5, dtype=DT) > 0.3).to(DT)
        r = X @ (w * mask) - Y
        return 0.5 * (r**2).mean() + 0.5 * (hh["decay"] * w**2).sum()

    def real_run(hh, states=None):
        opt = hg.optim.sgd(lr=hh["lr"], momentum=0.5)
        p, st, seen = [W0.clone()], opt.init([W0]), []
        for t in range(6):
            seen.append(hg.methods.rng_state("cpu"))
            if states is None:
                g = torch.func.grad(loss)(p[0], hh, None)
            else:
                with hg.methods.replay_rng(states[t], "cpu"):
                    g = torch.func.grad(loss)(p[0], hh, None)
            p, st = opt.update(p, [g], st, t)
        return p[0], seen

    torch.manual_seed(5)
    final, states = real_run(h)
    fd = {}
    for k in h:  # central differences of the real run, replaying its draws
        e = torch.zeros_like(h[k]).reshape(-1)
        fd[k] = torch.zeros_like(e)
        for i in range(e.numel()):
            e.zero_()
            e[i] = 1e-6
            plus = outer(real_run({**h, k: h[k] + e.reshape(h[k].shape)}, states)[0], h)
            minus = outer(real_run({**h, k: h[k] - e.reshape(h[k].shape)}, states)[0], h)
            fd[k][i] = (plus - minus) / 2e-6
        fd[k] = fd[k].reshape(h[k].shape)
    opt = hg.optim.sgd(lr=h["lr"], momentum=0.5)
    for method in (hg.Unrolled(), hg.Unrolled(checkpoint_every=2), hg.ForwardMode()):
        traj = hg.Trajectory(loss, W0, opt, [None] * 6, rng_states=states, final_params=final)
        torch.manual_seed(99)  # the caller's generator: neither used nor advanced
        before = torch.get_rng_state()
        out, info = method(
            hg.Problem(lambda w, hh: loss(w, hh, None), outer, W0, h, trajectory=traj)
        )
        assert torch.equal(torch.get_rng_state(), before)
        assert info.replay_error == 0.0, method
        assert rel(out, fd) < 1e-7, method
    # DrMAD replays the same masks too (its forward sweep ends at the real parameters)
    traj = hg.Trajectory(loss, W0, opt, [None] * 6, rng_states=states, final_params=final)
    _, info = hg.DrMAD()(hg.Problem(lambda w, hh: loss(w, hh, None), outer, W0, h, trajectory=traj))
    assert info.replay_error == 0.0
    # without the states the replay draws other masks: another trajectory, and a warning
    traj = hg.Trajectory(loss, W0, opt, [None] * 6, final_params=final)
    with pytest.warns(hg.HypergradientWarning, match="replay"):
        hg.Unrolled()(hg.Problem(lambda w, hh: loss(w, hh, None), outer, W0, h, trajectory=traj))
    with pytest.raises(ValueError, match="rng_states"):
        bad = hg.Trajectory(loss, W0, opt, [None] * 6, rng_states=states[:3])
        hg.Unrolled()(hg.Problem(lambda w, hh: loss(w, hh, None), outer, W0, h, trajectory=bad))
