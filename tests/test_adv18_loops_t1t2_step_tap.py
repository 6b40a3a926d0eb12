"""T1T2's step-gradient check reads ``train_loss``'s gradient off the step's own backward
pass (:mod:`hypergradient.hyperoptimizer.step_tap`) instead of a replayed backward pass,
and hands its replayed forward pass to the look-ahead (:mod:`~hypergradient.methods.
t1t2_shared`): two training-step passes less per hyper-step. The check must decide as the
replay's own backward pass did, for every loop: each loop below runs with the tap and with
it disabled (the replay's backward pass always), and the warnings, skips, factors and
hypergradients must be the same; the healthy loops must take the tap (no replayed
backward), and the loops whose step is not ``train_loss``'s gradient must not pass by it
(an activation regularizer on a tensor of ``train_loss``'s graph, a parameter used from a
closure, another batch, a parameter moved after the forward pass, a backward pass
restricted to some parameters or taken twice).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hypergradient as hg
from hypergradient.hyperoptimizer import step_grads, step_tap
from test_adv14_loops_t1t2_step_grad import (
    PEN,
    X,
    Y,
    clipped_clone,
    doubled,
    got,
    penalty_outside,
    replaced_doubled,
    summed_halves,
    t1t2,
)

STORE: dict[str, torch.Tensor] = {}


def plain(m, h, loss):
    loss((X, Y)).backward()


def activation_reg(m, h, loss):
    """A regularizer on the network's output kept by ``train_loss`` (AR, as AWD-LSTM's):
    its gradient flows through ``train_loss``'s own graph."""
    out = loss((X, Y))
    (out + 0.3 * (STORE["out"] ** 2).mean()).backward()


def closure_param(m, h, loss):
    """``train_loss`` reads a weight from a closure, outside the reparametrized module: the
    replay holds it constant."""
    STORE["closure"] = m[2].weight
    try:
        loss((X, Y)).backward()
    finally:
        del STORE["closure"]


def other_batch(m, h, loss):
    loss((X[:8], Y[:8])).backward()


def moved_after_forward(m, h, loss):
    loss((X, Y)).backward()
    with torch.no_grad():
        m[0].weight.mul_(1.01)


def partial_inputs(m, h, loss):
    """A backward pass restricted to one weight: the others step on no gradient."""
    loss((X, Y)).backward(inputs=[m[0].weight])


def twice(m, h, loss):
    """The graph backpropagated twice: the step used twice the gradient."""
    out = loss((X, Y))
    out.backward(retain_graph=True)
    out.backward()


def train_loss(m, h, b):
    out = m(b[0])
    STORE["out"] = out
    extra = 0.2 * (STORE["closure"] ** 2).sum() if "closure" in STORE else 0.0
    return F.mse_loss(out, b[1]) + h["pen"] * (out**2).mean() + extra


def residual_loss(m, h, b):
    """The hidden units used twice (a skip connection): their node's incoming gradient is
    the sum of two consumers' (kept for the regularizer of :func:`activation_reg`)."""
    z = m[1](m[0](b[0]))
    STORE["out"] = z
    out = m[2](z) + 0.1 * z.sum(1, keepdim=True)
    return F.mse_loss(out, b[1]) + h["pen"] * (out**2).mean()


LOOPS = [
    plain,
    doubled,
    summed_halves,
    penalty_outside,
    replaced_doubled,
    clipped_clone,
    activation_reg,
    closure_param,
    other_batch,
    moved_after_forward,
    partial_inputs,
    twice,
]
TAKEN = {plain, doubled}  # healthy, one hopt.train_loss call: the tap answers


def run(monkeypatch, loop, own, on_divergence, tap, loss=train_loss):
    """The loop's hyper-step with the tap or without it: what the check decided."""
    import test_adv14_loops_t1t2_step_grad as base

    monkeypatch.setattr(base, "train_loss", loss)
    replays = []  # the replay's backward passes taken
    real = step_grads._replayed

    def spy(*args):
        replays.append(1)
        return real(*args)

    monkeypatch.setattr(step_grads, "_replayed", spy)
    if not tap:
        monkeypatch.setattr(step_tap, "gradient", lambda *args: None)
    hopt, _, caught = t1t2(loop, own=own, on_divergence=on_divergence)
    record = hopt.history[-1] if hopt.hyper_steps else None
    return {
        "warnings": [str(w.message) for w in caught],
        "skipped": hopt.skipped,
        "hyper_steps": hopt.hyper_steps,
        "hypergrad": None if record is None else got(hopt),
        "scale": None if record is None else record.info.stats.get("step_grad_scale"),
        "pen": float(hopt.hparams["pen"]),
    }, len(replays)


@pytest.mark.parametrize("on_divergence", ["warn", "skip"])
@pytest.mark.parametrize("own", [False, True], ids=["hopt.train_loss", "own loss"])
@pytest.mark.parametrize("loop", LOOPS, ids=[f.__name__ for f in LOOPS])
def test_the_tap_decides_as_the_replayed_backward_pass(monkeypatch, loop, own, on_divergence):
    with monkeypatch.context() as mp:
        new, replays = run(mp, loop, own, on_divergence, tap=True)
    with monkeypatch.context() as mp:
        old, before = run(mp, loop, own, on_divergence, tap=False)
    assert new.keys() == old.keys()
    for key in new:
        if key == "hypergrad" and new[key] is not None:
            assert new[key] == pytest.approx(old[key], rel=1e-12, abs=1e-15), key
        else:
            assert new[key] == old[key], key
    assert before >= 1  # (a replayed backward pass decided before)
    # the tap decides alone for the healthy loops with hopt.train_loss, never for the others
    assert (replays == 0) == (loop in TAKEN and not own), replays
    assert bool(new["warnings"]) == (loop not in (plain, doubled, summed_halves, twice))
    if loop in TAKEN:
        assert new["hyper_steps"] == 1


@pytest.mark.parametrize("loop", [plain, activation_reg], ids=["plain", "activation_reg"])
def test_a_node_with_two_consumers_is_checked_by_their_sum(monkeypatch, loop):
    with monkeypatch.context() as mp:
        new, replays = run(mp, loop, False, "warn", tap=True, loss=residual_loss)
    with monkeypatch.context() as mp:
        old, _ = run(mp, loop, False, "warn", tap=False, loss=residual_loss)
    assert new == old
    assert (replays == 0) == (loop is plain), replays
    assert bool(new["warnings"]) == (loop is activation_reg)


def test_the_tap_is_train_losss_gradient_and_leaves_no_graph_behind():
    """The tapped gradient is the replayed one (to rounding), and a dropped hyper-optimizer
    leaves nothing of the tap (its hooks hold it weakly)."""
    import gc
    import weakref

    from test_adv14_loops_t1t2_step_grad import net, val_loss

    m = net()
    hopt = hg.HyperOptimizer(
        m,
        {"pen": torch.tensor(PEN, dtype=torch.float64)},
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(X, Y),
        method=hg.T1T2(),
        inner_steps=1,
    )
    batch = (X, Y)
    hopt.zero_grad()
    hopt.train_loss(batch).backward()
    tap = step_tap._TAPS[hopt]
    assert tap is not None and tap.ok and tap.root_calls == 1
    assert all(n == 1 for n in tap.calls)
    grads = [p.grad.clone() for p in m.parameters()]
    sent = [step_tap._total(s) for s in tap.sent]
    for a, b in zip(sent, grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    ref = weakref.ref(tap)
    hopt.step(batch)
    assert hopt.hyper_steps == 1 and not hopt.history[-1].info.stats.get("step_grad_scale")
    del tap
    gc.collect()
    assert ref() is None  # forgotten at the step's end
