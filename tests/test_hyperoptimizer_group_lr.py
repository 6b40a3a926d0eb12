"""Param groups with different learning rates (a smaller rate for some layers, a frozen
group at lr 0): the inner step is ``theta - Lambda grad`` with ``Lambda`` diagonal, and T1T2
differentiates that step exactly (``Problem.lr`` one rate per trained parameter), against
autograd through the step in float64. (It used to refuse them; before that it took the first
group's lr, 12 % off on the problem below.) IFT takes the smallest positive rate as its
Neumann step and is unaffected by the groups otherwise."""

from __future__ import annotations

import pytest
import torch

import hypergradient as hg

DT = torch.float64
G = torch.Generator().manual_seed(0)
X, Y = torch.randn(40, 4, generator=G, dtype=DT), torch.randn(40, generator=G, dtype=DT)
XV, YV = torch.randn(30, 4, generator=G, dtype=DT), torch.randn(30, generator=G, dtype=DT)


def train_loss(m, h, b):
    penalty = (m.weight**2).sum() + (m.bias**2).sum()
    return 0.5 * ((m(b[0]).reshape(-1) - b[1]) ** 2).mean() + 0.5 * h["lam"] * penalty


def val_loss(m, h, b):
    return 0.5 * ((m(b[0]).reshape(-1) - b[1]) ** 2).mean()


def build(lrs, method, inner_steps=1):
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 1).double()
    groups = [{"params": [m.weight], "lr": lrs[0]}, {"params": [m.bias], "lr": lrs[1]}]
    hopt = hg.HyperOptimizer(
        m,
        {"lam": hg.Unconstrained(torch.tensor(0.3, dtype=DT))},
        inner_optimizer=torch.optim.SGD(groups),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.1),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(XV, YV),
        method=method,
        inner_steps=inner_steps,
    )
    return m, hopt


def step(hopt):
    hopt.zero_grad()
    hopt.train_loss((X, Y)).backward()
    hopt.step((X, Y))


def one_step_derivative(m0, lrs):
    """d/dlam of the validation loss after one SGD step with per-group lrs (autograd)."""
    lam = torch.tensor(0.3, dtype=DT, requires_grad=True)
    w, b = (t.detach().clone().requires_grad_(True) for t in m0)
    f = 0.5 * ((X @ w.T + b).reshape(-1) - Y).pow(2).mean()
    f = f + 0.5 * lam * ((w**2).sum() + (b**2).sum())
    gw, gb = torch.autograd.grad(f, (w, b), create_graph=True)
    w1, b1 = w - lrs[0] * gw, b - lrs[1] * gb
    return torch.autograd.grad(0.5 * ((XV @ w1.T + b1).reshape(-1) - YV).pow(2).mean(), lam)[0]


@pytest.mark.parametrize("lrs", [(0.1, 0.5), (0.5, 0.1), (0.2, 0.0), (0.0, 0.3), (0.2, 0.2)])
def test_t1t2_with_groups_is_the_exact_step_derivative(lrs):
    m, hopt = build(lrs, hg.T1T2())
    m0 = (m.weight.detach().clone(), m.bias.detach().clone())
    step(hopt)
    got = hopt.history[-1].hypergrad["lam"]
    assert float(got) == pytest.approx(float(one_step_derivative(m0, lrs)), rel=1e-10)
    if lrs[0] != lrs[1]:  # the first group's rate alone would be far off: the test can fail
        wrong = one_step_derivative(m0, (lrs[0], lrs[0]))
        assert abs(float(got) - float(wrong)) > 1e-3 * abs(float(got))


def test_groups_whose_rates_change_later_take_the_rates_of_the_step():
    """A scheduler (or the user) changes one group's rate between hyper-steps: each
    hyper-step differentiates the step with the rates it was taken with."""
    m, hopt = build((0.2, 0.2), hg.T1T2(), inner_steps=2)
    step(hopt)
    hopt.inner_optimizer.param_groups[1]["lr"] = 0.5
    m0 = (m.weight.detach().clone(), m.bias.detach().clone())
    step(hopt)
    got = hopt.history[-1].hypergrad["lam"]
    assert float(got) == pytest.approx(float(one_step_derivative(m0, (0.2, 0.5))), rel=1e-10)


def test_all_groups_at_rate_zero_skip_the_hyper_step():
    m, hopt = build((0.0, 0.0), hg.T1T2())
    with pytest.warns(hg.HypergradientWarning, match="learning rate 0"):
        step(hopt)
    assert len(hopt.history) == 0


def test_ift_takes_groups_with_different_learning_rates():
    """IFT does not differentiate the step: at the weights the step reached, the dense
    float64 implicit hypergradient ``-theta^T H^{-1} grad g`` (``d grad f / d lam = theta``)."""
    m, hopt = build((0.1, 0.5), hg.IFT(hg.CG(maxiter=50, tol=1e-12)))
    step(hopt)
    z = torch.cat([m.weight.detach().reshape(-1), m.bias.detach()])
    Xb, XVb = (
        torch.cat([X, torch.ones(40, 1, dtype=DT)], 1),
        torch.cat([XV, torch.ones(30, 1, dtype=DT)], 1),
    )
    H = Xb.T @ Xb / 40 + 0.3 * torch.eye(5, dtype=DT)
    grad_g = XVb.T @ (XVb @ z - YV) / 30
    exact = -z @ torch.linalg.solve(H, grad_g)
    assert float(hopt.history[-1].hypergrad["lam"]) == pytest.approx(float(exact), rel=1e-8)


def test_a_negative_group_rate_is_named_by_its_group_and_nothing_changes():
    m, hopt = build((0.2, 0.1), hg.T1T2(), inner_steps=2)
    step(hopt)
    hopt.inner_optimizer.param_groups[1]["lr"] = -0.1
    before = [p.detach().clone() for p in m.parameters()], hopt.hparams["lam"].clone()
    with pytest.raises(ValueError, match=r"inner_optimizer\.param_groups\[1\]\['lr'\]"):
        step(hopt)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before[0]))
    assert torch.equal(hopt.hparams["lam"], before[1]) and len(hopt.history) == 0
