"""HyperOptimizer: each method against exact references, end to end on real data,
checkpoints, constraints and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from sklearn.datasets import load_breast_cancer

import hypergradient as hg
from conftest import to_device

DT = torch.float64
BCE = torch.nn.functional.binary_cross_entropy_with_logits


def _data():
    X, y = load_breast_cancer(return_X_y=True)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    X = torch.as_tensor(X, dtype=DT)[perm]
    y = torch.as_tensor(y, dtype=DT)[perm]
    X = (X - X[:100].mean(0)) / X[:100].std(0)
    return (X[:100], y[:100]), (X[100:300], y[100:300])


TRAIN, VAL = _data()
D = TRAIN[0].shape[1]


def train_loss(m, h, batch):
    x, y = batch
    w = m.weight.reshape(-1)  # attribute access sees the hyper-step's parameters too
    return BCE(m(x).reshape(-1), y) + 0.5 * (h["decay"] * w**2).sum()


def val_loss(m, h, batch):
    x, y = batch
    return BCE(m(x).reshape(-1), y)


def make(
    method, inner_steps=10, lr=0.5, momentum=0.0, decay=1e-2, outer_lr=0.1, device="cpu", **kw
):
    method = Recording(method)
    torch.manual_seed(0)
    model = to_device(device, torch.nn.Linear(D, 1).double())
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    dec = hg.Positive(to_device(device, torch.full((D,), decay, dtype=DT)))
    inner = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    hopt = hg.HyperOptimizer(
        model,
        {"decay": dec},
        inner_optimizer=inner,
        outer_optimizer=kw.pop("outer", lambda hp: torch.optim.Adam(hp, lr=outer_lr)),
        train_loss=train_loss,
        val_loss=kw.pop("val_loss", val_loss),
        val_data=to_device(device, VAL),
        method=method,
        inner_steps=inner_steps,
        **kw,
    )
    return model, dec, hopt


def train(hopt, steps, batch=TRAIN):
    for _ in range(steps):
        hopt.zero_grad()
        hopt.train_loss(batch).backward()
        hopt.step(batch)


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def functional_losses(model, dec):
    names = [k for k, _ in model.named_parameters()]

    def f(p, raw):
        w = p[names.index("weight")].reshape(-1)
        logits = TRAIN[0] @ w + p[names.index("bias")]
        return BCE(logits, TRAIN[1]) + 0.5 * (dec.transform(raw) * w**2).sum()

    def g(p, raw):
        w = p[names.index("weight")].reshape(-1)
        return BCE(VAL[0] @ w + p[names.index("bias")], VAL[1])

    return f, g


# ----------------------------------------------------------------------- exactness


def test_t1t2_equals_one_unrolled_step():
    model, dec, hopt = make(hg.T1T2(), inner_steps=1)
    train(hopt, 5)  # move away from zero first
    before = [p.detach().clone() for p in model.parameters()]
    raw_before = dec.raw.detach().clone()
    train(hopt, 1)
    got = hopt.history[-1].hypergrad["decay"]
    f, g = functional_losses(model, dec)
    ref = hg.unrolled(f, g, tuple(before), raw_before, 1, hg.optim.sgd(lr=0.5))
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize(
    "method",
    [hg.HOAG(maxiter=200, tol=1e-12, decay=1.0), hg.IFT(hg.CG(maxiter=200, tol=1e-12))],
    ids=["hoag", "ift-cg"],
)
def test_implicit_methods_converge_to_the_exact_hypergradient(method):
    # start at the inner optimum (Newton), then one negligible inner step
    model, dec, hopt = make(
        method, inner_steps=1, lr=1e-14, outer=lambda hp: torch.optim.SGD(hp, lr=1e-12)
    )
    f, g = functional_losses(model, dec)
    w = tuple(p.detach().clone() for p in model.parameters())
    raw = dec.raw.detach()
    for _ in range(30):
        grads = torch.func.grad(f)(w, raw)
        flat = torch.cat([x.reshape(-1) for x in grads])
        if flat.norm() < 1e-13:
            break
        H = torch.func.hessian(lambda v: f((v[:D].reshape(1, D), v[D:]), raw))(
            torch.cat([x.reshape(-1) for x in w])
        )
        step = torch.linalg.solve(H, flat)
        w = (w[0] - step[:D].reshape(1, D), w[1] - step[D:])
    with torch.no_grad():
        for p, v in zip(model.parameters(), w):
            p.copy_(v)
    train(hopt, 1)
    got = hopt.history[-1].hypergrad["decay"]
    params = tuple(p.detach() for p in model.parameters())
    exact, info = hg.implicit(f, g, params, raw, hg.Exact(), return_info=True)
    assert info.inner_grad_norm < 1e-10
    assert torch.allclose(got, exact, rtol=1e-8, atol=1e-12)


def test_ift_default_is_neumann_with_the_inner_learning_rate():
    model, dec, hopt = make(hg.IFT(), inner_steps=4, lr=0.3)
    train(hopt, 3)
    f, g = functional_losses(model, dec)
    train(hopt, 1)
    params = tuple(p.detach() for p in model.parameters())
    # the outer update happened after the hypergradient: use the raw value it was taken at
    raw = hopt.history[-1].hypergrad["decay"]
    ref = hg.implicit(f, g, params, _raw_at_last_step(hopt, dec), hg.Neumann(10, alpha=0.3))
    assert torch.allclose(raw, ref, rtol=1e-10, atol=1e-15)


def _raw_at_last_step(hopt, dec):
    """The raw hyperparameters the last hypergradient was taken at (see ``Recording``)."""
    return hopt.method.raw_before


class Recording(hg.Method):
    """Delegates to ``method``, keeping the raw hyperparameters of the last call (injected
    through the constructor's ``method=``)."""

    def __init__(self, method):
        self.method = method
        self.name = method.name
        self.needs_trajectory = method.needs_trajectory
        self.tunes_optimizer = method.tunes_optimizer
        self.raw_before = None

    def __call__(self, problem):
        self.raw_before = torch.stack([r.detach().clone() for r in problem.hparams.values()])[0]
        return self.method(problem)

    def state_dict(self):
        return self.method.state_dict()

    def load_state_dict(self, state):
        self.method.load_state_dict(state)


def test_trajectory_methods_replay_the_training_exactly():
    for method in (hg.Unrolled(), hg.ForwardMode(), hg.DrMAD(), hg.Unrolled(truncate=2)):
        model, dec, hopt = make(method, inner_steps=5, momentum=0.9)
        train(hopt, 10)
        assert hopt.history[-1].diagnostics["replay_error"] < 1e-12
    # Unrolled through the window equals hg.unrolled from the window's start
    model, dec, hopt = make(hg.Unrolled(), inner_steps=5, momentum=0.9)
    train(hopt, 5)
    start = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(hopt.inner_optimizer.state_dict())
    train(hopt, 5)
    got = hopt.history[-1].hypergrad["decay"]
    f, g = functional_losses(model, dec)
    fopt = hg.optim.sgd(lr=0.5, momentum=0.9)
    bufs = tuple(state["state"][i]["momentum_buffer"] for i in range(2))
    # the window as a recorded trajectory: momentum buffers and step count at its start
    trajectory = hg.Trajectory(
        lambda p, h, b: f(p, h), tuple(start), fopt, [None] * 5, state0=bufs, step0=1
    )
    problem = hg.Problem(f, g, tuple(start), hopt.method.raw_before, trajectory=trajectory)
    ref, _ = hg.Unrolled()(problem)
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-15)


# ------------------------------------------------------------------------ end to end


def _val_full(model):
    with torch.no_grad():
        return float(BCE(model(VAL[0]).reshape(-1), VAL[1]))


def _exact_optimum_val_loss():
    """Outer loop with exact hypergradients (Newton inner solves): the reference optimum."""
    raw = torch.log(torch.full((D,), 1e-2, dtype=DT))
    raw.requires_grad_(True)
    opt = torch.optim.Adam([raw], lr=0.1)
    w = torch.zeros(D + 1, dtype=DT)

    def f(w, r):
        return BCE(TRAIN[0] @ w[:-1] + w[-1], TRAIN[1]) + 0.5 * (r.exp() * w[:-1] ** 2).sum()

    def g(w, r):
        return BCE(VAL[0] @ w[:-1] + w[-1], VAL[1])

    for _ in range(30):
        for _ in range(30):
            gr = torch.func.grad(f)(w, raw.detach())
            if gr.norm() < 1e-12:
                break
            w = w - torch.linalg.solve(torch.func.hessian(f)(w, raw.detach()), gr)
        raw.grad = hg.exact(f, g, w, raw.detach())
        opt.step()
    return float(g(w, raw))


EXACT_BEST = None
UNTUNED = None


@pytest.mark.parametrize(
    "method",
    [
        hg.T1T2(),
        hg.IFT(),
        hg.IFT(hg.Nystrom(rank=10, rho=0.1, seed=0)),
        hg.HOAG(),
        hg.Unrolled(),
        hg.Unrolled(truncate=3),
        hg.ForwardMode(),
        hg.DrMAD(),
    ],
    ids=["t1t2", "ift-neumann", "ift-nystrom", "hoag", "unrolled", "truncated", "forward", "drmad"],
)
def test_every_method_lowers_the_validation_loss_toward_the_optimum(method):
    global EXACT_BEST, UNTUNED
    if EXACT_BEST is None:
        EXACT_BEST = _exact_optimum_val_loss()
        # baseline: the same training without tuning (no hyper-step within 300 steps)
        model0, _, hopt0 = make(hg.T1T2(), inner_steps=10_000)
        train(hopt0, 300)
        UNTUNED = _val_full(model0)
    untuned = UNTUNED
    model, dec, hopt = make(method, inner_steps=10)
    train(hopt, 300)
    tuned = _val_full(model)
    assert EXACT_BEST < untuned
    closed = (untuned - tuned) / (untuned - EXACT_BEST)
    assert closed > 0.4, (untuned, tuned, EXACT_BEST)
    assert all(r.hypergrad_norm > 0 for r in hopt.history)
    assert bool((dec.value > 0).all())


# ------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize(
    "method", [hg.HOAG(maxiter=5), hg.Unrolled(), hg.IFT()], ids=["hoag", "unrolled", "ift"]
)
def test_checkpoint_resume_is_bit_for_bit(method, tmp_path, device):
    batch = to_device(device, TRAIN)

    def fresh():
        return make(
            copy.deepcopy(method), inner_steps=4, momentum=0.9, val_batch_size=50, device=device
        )

    model_a, dec_a, hopt_a = fresh()
    train(hopt_a, 10, batch)  # step 10: mid-window for the trajectory method
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model_a.state_dict(), "hopt": hopt_a.state_dict()}, path)
    train(hopt_a, 9, batch)
    # Resume a fresh model and hyper-optimizer from the checkpoint at step 10, loaded as
    # saved and mapped to the CPU (a GPU run resumed from a CPU-mapped checkpoint).
    for map_location in (None, "cpu"):
        model_b, dec_b, hopt_b = fresh()
        ck = torch.load(path, map_location=map_location)  # weights_only=True: plain data
        model_b.load_state_dict(ck["model"])
        hopt_b.load_state_dict(ck["hopt"])
        train(hopt_b, 9, batch)
        assert torch.equal(flat_params(model_a), flat_params(model_b))
        assert torch.equal(dec_a.raw, dec_b.raw) and dec_b.raw.device == dec_a.raw.device
        assert len(hopt_a.history) == len(hopt_b.history)


# ------------------------------------------------------------------------ constraints


def test_constraints_hold_whatever_the_outer_steps():
    model, dec, hopt = make(hg.T1T2(), inner_steps=1, outer_lr=50.0)
    train(hopt, 20)
    assert bool((dec.value > 0).all()) and bool(torch.isfinite(dec.value).all())
    iv = hg.Interval(torch.tensor([0.2, 0.9], dtype=DT), low=0.0, high=1.0)
    with torch.no_grad():
        iv.raw.add_(torch.tensor([-1e3, 1e3], dtype=DT))
    v = iv.value
    assert bool((v >= 0).all() and (v <= 1).all())
    soft = hg.Positive(torch.tensor([1e-3, 5.0], dtype=DT), transform="softplus")
    assert torch.allclose(soft.value, torch.tensor([1e-3, 5.0], dtype=DT), rtol=1e-12)
    assert torch.allclose(
        hg.Interval(torch.tensor(0.3), 0.1, 0.5).value, torch.tensor(0.3), rtol=1e-6
    )


# ------------------------------------------------------------------------ bad input


def test_bad_input_is_refused_before_anything_changes():
    model = torch.nn.Linear(D, 1).double()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    leaf = torch.zeros(D, dtype=DT, requires_grad=True)
    common = dict(inner_optimizer=inner, train_loss=train_loss, val_loss=val_loss)
    outer = lambda hp: torch.optim.SGD(hp, lr=0.1)  # noqa: E731
    with pytest.raises(ValueError, match="not a leaf"):
        hg.HyperOptimizer(model, {"decay": leaf * 2}, outer_optimizer=outer, val_data=VAL, **common)
    with pytest.raises(ValueError, match="val_data"):
        hg.HyperOptimizer(model, {"decay": leaf}, outer_optimizer=outer, val_data=None, **common)
    with pytest.raises(TypeError, match="integer|floating"):
        hg.HyperOptimizer(
            model,
            {"decay": torch.zeros(3, dtype=torch.long)},
            outer_optimizer=outer,
            val_data=VAL,
            **common,
        )
    with pytest.raises(ValueError, match="outer_optimizer"):
        hg.HyperOptimizer(
            model,
            {"decay": leaf},
            outer_optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1),
            val_data=VAL,
            **common,
        )
    with pytest.raises(ValueError, match="inner_steps"):
        hg.HyperOptimizer(
            model, {"decay": leaf}, outer_optimizer=outer, val_data=VAL, inner_steps=0, **common
        )
    elsewhere = torch.zeros(D, dtype=DT, device="meta")  # a device other than the model's
    with pytest.raises(ValueError, match=r"hparams\['decay'\] is on meta.*create it there"):
        hg.HyperOptimizer(
            model, {"decay": elsewhere}, outer_optimizer=outer, val_data=VAL, **common
        )
    with pytest.raises(ValueError, match="Unrolled"):
        hg.HyperOptimizer(
            model,
            {"decay": leaf, "lr": torch.tensor(0.1)},
            outer_optimizer=outer,
            val_data=VAL,
            method=hg.IFT(),
            optimizer_hparams={"lr": "lr"},
            **common,
        )
    with pytest.raises(TypeError, match="LBFGS|functional twin"):
        hg.HyperOptimizer(
            model,
            {"decay": leaf},
            outer_optimizer=outer,
            val_data=VAL,
            method=hg.Unrolled(),
            **{**common, "inner_optimizer": torch.optim.LBFGS(model.parameters())},
        )
    _, _, hopt = make(hg.Unrolled(), inner_steps=2)
    with pytest.raises(ValueError, match="batch"):
        hopt.step()


def test_non_finite_hypergradient_rolls_the_step_back():
    def bad_val(m, h, batch):
        return val_loss(m, h, batch) * torch.tensor(float("nan"), dtype=DT)

    model, dec, hopt = make(hg.IFT(), inner_steps=3, val_loss=bad_val)
    train(hopt, 2)
    params = flat_params(model).clone()
    state = copy.deepcopy(hopt.inner_optimizer.state_dict())
    raw = dec.raw.detach().clone()
    hopt.zero_grad()
    hopt.train_loss(TRAIN).backward()
    with pytest.raises(hg.NonFiniteHypergradientError):
        hopt.step(TRAIN)
    assert torch.equal(flat_params(model), params)
    assert torch.equal(dec.raw, raw)
    assert hopt.inner_optimizer.state_dict()["state"] == state["state"]
    assert hopt.state_dict()["counters"]["count"] == 2


# ------------------------------------------------------------------------ models


def test_learning_rate_tuning_raises_a_too_small_learning_rate():
    torch.manual_seed(0)
    model = torch.nn.Linear(D, 1).double()
    lr = hg.Positive(torch.tensor(1e-3, dtype=DT))
    decay = torch.full((D,), 1e-2, dtype=DT)
    inner = torch.optim.SGD(model.parameters(), lr=1e-3)

    def tl(m, h, batch):
        return train_loss(m, {"decay": decay}, batch)

    hopt = hg.HyperOptimizer(
        model,
        {"lr": lr},
        inner_optimizer=inner,
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.2),
        train_loss=tl,
        val_loss=val_loss,
        val_data=VAL,
        method=hg.ForwardMode(),
        inner_steps=10,
        optimizer_hparams={"lr": "lr"},
    )
    train(hopt, 200)
    assert float(lr.value) > 1e-2
    assert inner.param_groups[0]["lr"] == float(lr.value)
    assert hopt.history[-1].val_loss < hopt.history[0].val_loss


def test_batchnorm_buffers_are_not_touched_by_hyper_steps_and_dict_params_work():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(D, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    ).double()
    decay = hg.Positive(torch.tensor(1e-2, dtype=DT))
    inner = torch.optim.SGD(net.parameters(), lr=0.1)

    def tl(m, h, batch):
        reg = sum((p**2).sum() for p in m.parameters())
        return BCE(m(batch[0]).reshape(-1), batch[1]) + 0.5 * h["decay"] * reg

    hopt = hg.HyperOptimizer(
        net,
        {"decay": decay},
        inner_optimizer=inner,
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.05),
        train_loss=tl,
        val_loss=val_loss,
        val_data=VAL,
        method=hg.T1T2(),
        inner_steps=2,
    )
    hopt.zero_grad()
    tl(net, hopt.hparams, TRAIN).backward()
    hopt.step(TRAIN)
    running = net[1].running_mean.clone()
    hopt.zero_grad()
    tl(net, hopt.hparams, TRAIN).backward()  # the user's forward updates the stats once
    after_user = net[1].running_mean.clone()
    hopt.step(TRAIN)  # hyper-step: must not update them again
    assert not torch.equal(running, after_user)
    assert torch.equal(net[1].running_mean, after_user)
    assert len(hopt.history) == 1

    # functional parameters (a dict of leaves) instead of a module
    w = {
        "w": torch.zeros(D, dtype=DT, requires_grad=True),
        "b": torch.zeros((), dtype=DT, requires_grad=True),
    }
    dec = hg.Positive(torch.full((D,), 1e-2, dtype=DT))

    def ftl(p, h, batch):
        return BCE(batch[0] @ p["w"] + p["b"], batch[1]) + 0.5 * (h["decay"] * p["w"] ** 2).sum()

    def fvl(p, h, batch):
        return BCE(batch[0] @ p["w"] + p["b"], batch[1])

    hopt = hg.HyperOptimizer(
        w,
        {"decay": dec},
        inner_optimizer=torch.optim.SGD(w.values(), lr=0.5),
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.1),
        train_loss=ftl,
        val_loss=fvl,
        val_data=VAL,
        method=hg.Unrolled(),
        inner_steps=5,
    )
    train(hopt, 50)
    assert hopt.history[-1].val_loss < hopt.history[0].val_loss
    assert hopt.history[-1].diagnostics["replay_error"] < 1e-12


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(
    "method", [hg.Unrolled(), hg.ForwardMode(), hg.DrMAD()], ids=["unrolled", "forward", "drmad"]
)
def test_trajectory_methods_replay_batchnorm_models_exactly(mode, method):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(D, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(), torch.nn.Linear(4, 1)
    ).double()
    getattr(net, mode)()
    decay = hg.Positive(torch.tensor(1e-2, dtype=DT))

    def tl(m, h, batch):
        reg = sum((p**2).sum() for p in m.parameters())
        return BCE(m(batch[0]).reshape(-1), batch[1]) + 0.5 * h["decay"] * reg

    hopt = hg.HyperOptimizer(
        net,
        {"decay": decay},
        inner_optimizer=torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.05),
        train_loss=tl,
        val_loss=val_loss,
        val_data=VAL,
        method=method,
        inner_steps=3,
    )
    batch = (TRAIN[0][:32], TRAIN[1][:32])
    train(hopt, 6, batch)
    assert len(hopt.history) == 2
    assert all(r.diagnostics["replay_error"] < 1e-12 for r in hopt.history)


@pytest.mark.parametrize(
    "method",
    [
        hg.HOAG(maxiter=100, tol=1e-12, decay=1.0),
        hg.IFT(hg.CG(maxiter=100, tol=1e-12)),
        hg.IFT(hg.Neumann(maxiter=3000, alpha="auto")),
    ],
    ids=["hoag", "ift-cg", "ift-neumann"],
)
def test_implicit_methods_match_the_closed_form_ridge_hypergradient(method, device):
    """Ridge with per-feature L2: w* = A^{-1} X^T y, A = X^T X / n + diag(lam), and
    dg/dlam = -(A^{-1} grad_w g) * w*; with lam = exp(raw), times lam."""
    g = torch.Generator().manual_seed(5)
    X, Xv = torch.randn(60, 8, generator=g, dtype=DT), torch.randn(40, 8, generator=g, dtype=DT)
    y, yv = torch.randn(60, generator=g, dtype=DT), torch.randn(40, generator=g, dtype=DT)
    lam_cpu = torch.linspace(0.05, 0.5, 8, dtype=DT)
    A = X.T @ X / 60 + torch.diag(lam_cpu)
    w_star = torch.linalg.solve(A, X.T @ y / 60)
    lam = hg.Positive(to_device(device, lam_cpu))
    model = to_device(device, torch.nn.Linear(8, 1, bias=False).double())
    with torch.no_grad():
        model.weight.copy_(w_star.unsqueeze(0))
    train_batch, val_batch = to_device(device, ((X, y), (Xv, yv)))

    def tl(m, h, batch):
        return (
            0.5 * ((m(batch[0]).reshape(-1) - batch[1]) ** 2).mean()
            + 0.5 * (h["lam"] * m.weight.reshape(-1) ** 2).sum()
        )

    def vl(m, h, batch):
        return 0.5 * ((m(batch[0]).reshape(-1) - batch[1]) ** 2).mean()

    hopt = hg.HyperOptimizer(
        model,
        {"lam": lam},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=1e-15),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=1e-12),
        train_loss=tl,
        val_loss=vl,
        val_data=val_batch,
        method=method,
        inner_steps=1,
    )
    raw_before = lam.raw.detach().cpu().clone()
    hopt.zero_grad()
    tl(model, hopt.hparams, train_batch).backward()
    hopt.step(train_batch)
    lam_val = raw_before.exp()
    A = X.T @ X / 60 + torch.diag(lam_val)
    grad_v = Xv.T @ (Xv @ w_star - yv) / 40
    closed = -torch.linalg.solve(A, grad_v) * w_star * lam_val
    got = hopt.history[-1].hypergrad["lam"]
    assert got.device == lam.raw.device
    assert torch.allclose(got.cpu(), closed, rtol=1e-7, atol=1e-12)
