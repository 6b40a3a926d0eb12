"""A trajectory whose ``state0`` holds a stepped optimizer's buffers needs its ``step0``
(adversarial probe, round 6). ``hg.optim.from_torch`` returns ``(twin, buffers, step)``; a
``hg.Trajectory(state0=buffers)`` that left ``step0`` at its default 0 replayed SGD with its
momentum restarted from the first gradient and Adam with its moments bias-corrected as a
first step's, silently (a warning only when ``final_params`` were given, and that one blamed
``train_loss``): on the run below -0.2690 for SGD's -0.2241 and -0.0777 for Adam's -0.0850.
It is now refused, as is the converse (a step count without buffers); zero buffers
(``optimizer.init``'s) at step 0 stay fine."""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg

DT = torch.float64
G = torch.Generator().manual_seed(0)
X, Y = torch.randn(20, 4, generator=G, dtype=DT), torch.randn(20, generator=G, dtype=DT)
W0 = 0.3 * torch.randn(4, generator=G, dtype=DT)


def f(w, h, b=None):
    return ((torch.tanh(X @ w) - Y) ** 2).mean() + h["lam"] * (w**2).sum()


def g(w, h):
    return ((torch.tanh(X @ w) - Y) ** 2).mean()


MAKERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_stepped_buffers_with_step0_zero_are_refused_and_step0_gives_finite_differences(name):
    lam = torch.tensor(0.01, dtype=DT)
    w = W0.clone().requires_grad_()
    opt = MAKERS[name]([w])
    for _ in range(5):
        opt.zero_grad()
        f(w, {"lam": lam}).backward()
        opt.step()
    twin, state, step = hg.optim.from_torch(opt, [w])
    p0 = w.detach().clone()

    def problem(step0, state0=state):
        traj = hg.Trajectory(f, p0, twin, [None] * 4, state0=state0, step0=step0)
        return hg.Problem(f, g, p0, {"lam": lam.clone()}, trajectory=traj)

    with pytest.raises(ValueError, match=r"`state0` holds nonzero buffers .* `step0` is 0"):
        hg.Unrolled()(problem(0))
    got = hg.Unrolled()(problem(step))[0]["lam"]

    def torch_run(value: float) -> float:  # the torch optimizer's next 4 steps
        v = p0.clone().requires_grad_()
        o = MAKERS[name]([v])
        o.load_state_dict(opt.state_dict())
        o.state[v] = {k: t.clone() for k, t in opt.state[w].items()}
        for _ in range(4):
            o.zero_grad()
            f(v, {"lam": torch.tensor(value, dtype=DT)}).backward()
            o.step()
        return float(g(v.detach(), None))

    eps = 1e-6
    fd = (torch_run(0.01 + eps) - torch_run(0.01 - eps)) / (2 * eps)
    assert float(got) == pytest.approx(fd, rel=1e-6)
    # fresh (zero) buffers at step 0 are what init() makes: accepted
    zeros = twin.init([p0])
    hg.Unrolled()(problem(0, zeros))


@pytest.mark.parametrize(
    "opt",
    [hg.optim.adam(0.05), hg.optim.sgd(0.1, 0.9, dampening=0.5)],
    ids=["adam", "dampened_sgd"],
)
def test_a_step_count_without_buffers_is_refused(opt):
    """The other half: ``step0=5`` with ``state0=None`` replayed Adam with zero moments
    bias-corrected for step 6 (0.00198 where the fresh run gives 0.00332) and a dampened
    momentum buffer that torch starts at the gradient from zeros, silently."""
    lam = {"lam": torch.tensor(0.01, dtype=DT)}
    traj = hg.Trajectory(f, W0, opt, [None] * 4, state0=None, step0=5)
    with pytest.raises(ValueError, match=r"`step0` is 5 but `state0` is None"):
        hg.Unrolled()(hg.Problem(f, g, W0, lam, trajectory=traj))
    fresh = hg.Trajectory(f, W0, opt, [None] * 4)
    hg.Unrolled()(hg.Problem(f, g, W0, lam, trajectory=fresh))


def test_plain_and_undamped_momentum_sgd_need_no_buffers():
    """No buffers (plain SGD) or a buffer torch would start at the gradient anyway."""
    lam = {"lam": torch.tensor(0.01, dtype=DT)}
    for opt in (hg.optim.sgd(0.1), hg.optim.sgd(0.1, 0.9)):
        got = [
            hg.Unrolled()(
                hg.Problem(f, g, W0, lam, trajectory=hg.Trajectory(f, W0, opt, [None] * 3, step0=s))
            )[0]["lam"]
            for s in (0, 7)
        ]
        assert torch.equal(got[0], got[1])
