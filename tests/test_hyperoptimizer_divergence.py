"""A diverging inner run is detected before its hypergradient is applied (issue 10, item 5).

The inner problem is full-batch ridge regression in float64, whose training-loss Hessian
``X^T X / n + diag(decay)`` is known exactly: gradient descent diverges when
``lr > 2 / lambda_max`` (the top eigencomponent is multiplied by ``1 - lr * lambda_max``
per step) and is stable below; momentum ``beta`` is stable up to ``2 (1 + beta) /
lambda_max``. References: the same steps taken by a plain ``torch.optim.SGD`` (the norms
the warning quotes), and the hyperparameters before the run (a skipped hyper-step must
leave them bit-for-bit unchanged).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import hypergradient as hg
from hypergradient.hyperoptimizer import divergence

DT = torch.float64
N, D = 40, 5


def ridge_data(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=DT)
    return x, x @ torch.randn(D, generator=g, dtype=DT) + 0.1 * torch.randn(
        N, generator=g, dtype=DT
    )


TRAIN, VAL = ridge_data(0), ridge_data(1)
DECAY = torch.full((D,), 0.1, dtype=DT)
LAMBDA_MAX = float(torch.linalg.eigvalsh(TRAIN[0].T @ TRAIN[0] / N + torch.diag(DECAY)).max())


def train_loss(m, h, batch):
    x, y = batch
    return 0.5 * ((m(x).squeeze(1) - y) ** 2).mean() + 0.5 * (h["decay"] * m.weight[0] ** 2).sum()


def val_loss(m, h, batch):
    x, y = batch
    return 0.5 * ((m(x).squeeze(1) - y) ** 2).mean()


class Counting(hg.Method):
    """IFT with an exact dense solve, counting its calls (a skipped hyper-step makes none)."""

    name = "counting"

    def __init__(self):
        self.inner, self.calls = hg.IFT(hg.CG(maxiter=D, tol=1e-12)), 0

    def __call__(self, problem):
        self.calls += 1
        return self.inner(problem)


def model(zero=False):
    torch.manual_seed(0)
    m = torch.nn.Linear(D, 1, bias=False).double()
    if zero:
        torch.nn.init.zeros_(m.weight)
    return m


def build(lr, momentum=0.0, zero=False, inner_steps=8, **kw):
    m = model(zero)
    hopt = hg.HyperOptimizer(
        m,
        {"decay": hg.Positive(DECAY.clone())},
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum),
        outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.05),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=VAL,
        method=Counting(),
        inner_steps=inner_steps,
        **kw,
    )
    return m, hopt


def run(hopt, steps):
    for _ in range(steps):
        hopt.zero_grad()
        hopt.train_loss(TRAIN).backward()
        hopt.step(TRAIN)


def divergence_warnings(caught):
    return [w for w in caught if "diverg" in str(w.message)]


def plain_sgd_norms(lr, steps):
    """The parameter norms of the same run with torch.optim.SGD alone."""
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    norms = []
    for _ in range(steps):
        opt.zero_grad()
        train_loss(m, {"decay": DECAY}, TRAIN).backward()
        opt.step()
        norms.append(float(m.weight.detach().norm()))
    return norms


def test_a_run_far_above_the_stability_limit_is_warned_and_skipped_on_request():
    lr = 5 / LAMBDA_MAX  # the top eigencomponent grows by |1 - 5| = 4 per step
    m, hopt = build(lr, on_divergence="skip")
    raw = hopt.raw_hparams()[0].detach().clone()
    with pytest.warns(hg.HypergradientWarning, match="diverging") as caught:
        run(hopt, 8)
    (w,) = divergence_warnings(caught)
    message = str(w.message)
    assert "learning rate" in message and "clip" in message and "damping" in message
    assert "skipped (on_divergence='skip')" in message
    # the numbers quoted are the plain run's last four parameter norms
    ref = plain_sgd_norms(lr, 8)
    quoted = re.search(r"parameter norms \[([^\]]*)\]", message).group(1)
    assert [float(v) for v in quoted.split(", ")] == pytest.approx(ref[-4:], rel=5e-3)
    assert ref[-1] / ref[-2] == pytest.approx(4.0, rel=0.05)  # truly diverging
    # nothing from the diverged run is applied; the inner steps stand
    assert hopt.method.calls == 0 and hopt.hyper_steps == 0 and hopt.skipped == 1
    assert torch.equal(hopt.raw_hparams()[0], raw)
    assert float(m.weight.detach().norm()) == pytest.approx(ref[-1], rel=1e-12)


def test_by_default_the_hypergradient_is_applied_with_the_warning():
    """Default ``on_divergence="warn"``: the same run, warned, and its hypergradient applied
    (it is the method's: equal to a run that ignores the warning's cause)."""
    _, hopt = build(5 / LAMBDA_MAX)
    raw = hopt.raw_hparams()[0].detach().clone()
    with pytest.warns(hg.HypergradientWarning, match="diverging.*applied") as caught:
        run(hopt, 8)
    assert len(divergence_warnings(caught)) == 1
    assert hopt.method.calls == 1 and hopt.hyper_steps == 1 and hopt.skipped == 0
    assert not torch.equal(hopt.raw_hparams()[0], raw)
    with pytest.raises(ValueError, match="on_divergence"):
        build(1.0, on_divergence="ignore")


@pytest.mark.parametrize(
    "lr_times_lambda, momentum, zero",
    [(1.0, 0.0, False), (1.9, 0.0, False), (3.0, 0.9, False), (1.0, 0.9, True), (0.1, 0.9, True)],
)
def test_healthy_runs_never_warn_and_every_hyper_step_is_applied(lr_times_lambda, momentum, zero):
    """Below the limits (momentum: 2 (1 + beta) = 3.8), also from a zero start, where the
    norm grows fastest (momentum makes it quadratic in the step count)."""
    m, hopt = build(lr_times_lambda / LAMBDA_MAX, momentum, zero, inner_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(hopt, 24)
    assert not divergence_warnings(caught)
    assert hopt.method.calls == 12 and hopt.hyper_steps == 12 and hopt.skipped == 0
    assert torch.isfinite(m.weight).all()


def test_a_growing_loss_is_caught_when_the_norm_grows_slower_than_twofold():
    """lr * lambda_max = 2.8: the top component grows 1.8x per step (the norm rule does
    not fire) and the loss about 3.2x (the loss rule does)."""
    _, hopt = build(2.8 / LAMBDA_MAX, inner_steps=12, on_divergence="skip")
    with pytest.warns(hg.HypergradientWarning, match="training loss grew") as caught:
        run(hopt, 12)
    assert len(divergence_warnings(caught)) == 1 and hopt.method.calls == 0
    ref = plain_sgd_norms(2.8 / LAMBDA_MAX, 12)
    assert all(1.5 < b / a < 2.0 for a, b in zip(ref[-4:], ref[-3:]))


def test_without_the_training_loss_the_norm_rule_still_applies():
    """A loop that computes its own loss (not ``hopt.train_loss``) is watched by norms."""
    m, hopt = build(5 / LAMBDA_MAX, on_divergence="skip")
    with pytest.warns(hg.HypergradientWarning, match="parameter norm grew"):
        for _ in range(8):
            hopt.zero_grad()
            train_loss(m, hopt.hparams, TRAIN).backward()
            hopt.step(TRAIN)
    assert hopt.loop.losses == () and hopt.method.calls == 0


def test_non_finite_weights_raise_and_roll_back_or_skip():
    lr = 1e80 / LAMBDA_MAX  # overflows float64 within four steps
    m, hopt = build(lr, inner_steps=4)
    run(hopt, 3)
    weight = m.weight.detach().clone()
    with pytest.raises(hg.NonFiniteHypergradientError, match="parameter norm is not finite"):
        run(hopt, 1)
    assert torch.equal(m.weight, weight) and hopt.state_dict()["counters"]["count"] == 3
    _, hopt = build(lr, inner_steps=4, nonfinite="skip")
    with pytest.warns(hg.HypergradientWarning, match="skipped.*not finite"):
        run(hopt, 4)
    assert hopt.skipped == 1 and hopt.method.calls == 0


def test_the_detector_rules_on_exact_sequences():
    t = lambda xs: tuple(torch.tensor(x, dtype=DT) for x in xs)  # noqa: E731
    assert divergence.diagnose(t([1, 2, 4, 8]), ()) is not None  # doubling
    assert divergence.diagnose(t([1, 2, 4, 7.9]), ()) is None  # one ratio below 2
    assert divergence.diagnose(t([1, 2.9, 5.61, 9.05]), ()) is None  # momentum from zero
    assert divergence.diagnose(t([1, 1.1, 1.2, 1.3]), t([1, 3, 9, 27]))[1].startswith(
        "The inner run is diverging: the training loss"
    )
    assert divergence.diagnose(t([1, 1.1, 1.0, 1.3]), t([1, 3, 9, 27])) is None  # norm fell
    finite, message = divergence.diagnose(t([1, 2]), t([1, float("nan")]))
    assert not finite and "training loss is not finite" in message
    assert divergence.diagnose((), ()) is None
    params = [torch.randn(3, 4, dtype=torch.float32), torch.randn(5, dtype=DT)]
    flat = torch.cat([params[0].double().reshape(-1), params[1]])
    assert float(divergence.norm(params)) == pytest.approx(float(flat.norm()), rel=1e-12)
