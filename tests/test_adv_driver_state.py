"""Driver state a client loop can reach and the other tests do not: a checkpoint taken in the
last steps before a hyper-step (the divergence watch's recordings), and hyperparameters
whose elements share memory (refused at construction, before a hyper-step fails to update
them in place and its undo fails too).

References: the uninterrupted run (bit-for-bit), and the state before the call.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

DT = torch.float64
N, D = 40, 5
_g = torch.Generator().manual_seed(0)
X = torch.randn(N, D, generator=_g, dtype=DT)
TRAIN = (X, X @ torch.randn(D, generator=_g, dtype=DT))
VAL = (torch.randn(N, D, generator=_g, dtype=DT), torch.randn(N, generator=_g, dtype=DT))
DECAY = torch.full((D,), 0.1, dtype=DT)
LAMBDA_MAX = float(torch.linalg.eigvalsh(X.T @ X / N + torch.diag(DECAY)).max())


def train_loss(m, h, batch):
    x, y = batch
    return 0.5 * ((m(x).squeeze(1) - y) ** 2).mean() + 0.5 * (h["decay"] * m.weight[0] ** 2).sum()


def val_loss(m, h, batch):
    x, y = batch
    return 0.5 * ((m(x).squeeze(1) - y) ** 2).mean()


def build(lr, decay=None):
    torch.manual_seed(0)
    m = torch.nn.Linear(D, 1, bias=False).double()
    hopt = hg.HyperOptimizer(
        m,
        {"decay": hg.Positive(DECAY.clone()) if decay is None else decay},
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=lr),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.1),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=VAL,
        method=hg.IFT(hg.CG(maxiter=D, tol=1e-12)),
        inner_steps=8,
        on_divergence="skip",
    )
    return m, hopt


def run(hopt, steps):
    for _ in range(steps):
        hopt.zero_grad()
        hopt.train_loss(TRAIN).backward()
        hopt.step(TRAIN)


@pytest.mark.parametrize("saved_at", [5, 6, 7])
def test_a_resume_in_the_last_steps_of_a_window_takes_the_same_divergence_decision(saved_at):
    """lr = 5 / lambda_max: the norm grows 4x per step, and the first hyper-step (step 8) is
    skipped. A checkpoint at step 5, 6 or 7 (inside the watched last four steps) used to
    drop the recorded norms: the resumed run saw fewer than four and applied it."""
    lr = 5 / LAMBDA_MAX
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.HypergradientWarning)
        m, hopt = build(lr)
        run(hopt, saved_at)
        state = torch.load(_roundtrip(hopt.state_dict()), weights_only=True)
        weights = {k: v.clone() for k, v in m.state_dict().items()}
        run(hopt, 8 - saved_at)
        m2, resumed = build(lr)
        m2.load_state_dict(weights)
        resumed.load_state_dict(state)
        run(resumed, 8 - saved_at)
    assert (hopt.skipped, hopt.hyper_steps) == (1, 0)
    assert (resumed.skipped, resumed.hyper_steps) == (1, 0)
    assert torch.equal(resumed.raw_hparams()[0], hopt.raw_hparams()[0])
    assert torch.equal(m2.weight, m.weight)


def _roundtrip(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_a_malformed_watch_entry_is_refused_and_changes_nothing():
    m, hopt = build(0.1)
    run(hopt, 3)
    state = hopt.state_dict()
    state["watch"] = {"norms": [torch.ones(2)]}
    raw = hopt.raw_hparams()[0].detach().clone()
    count = hopt.loop.count
    run(hopt, 1)
    with pytest.raises(ValueError, match="watch"):
        hopt.load_state_dict(state)
    assert hopt.loop.count == count + 1 and torch.equal(hopt.raw_hparams()[0], raw)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.full((1,), 0.1, dtype=DT).expand(D),
        lambda: torch.full((1,), 0.1, dtype=DT).as_strided((D,), (0,)),
        lambda: hg.Unconstrained(torch.tensor(0.1, dtype=DT).expand(D)),
    ],
    ids=["expand", "as_strided", "unconstrained"],
)
def test_a_hyperparameter_whose_elements_share_memory_is_refused(make):
    """Before: accepted; the first hyper-step's in-place outer update raised, and so did
    the undo's copy into it, leaving the inner step and the counters advanced."""
    with pytest.raises(ValueError, match=r"hparams\['decay'\] has elements sharing memory"):
        build(0.1, decay=make())


def test_a_hyperparameter_that_is_a_strided_view_without_overlap_is_tuned():
    """A transposed or sliced (non-contiguous, non-overlapping) tensor is a valid leaf: the
    outer SGD step on it is the plain one."""
    base = torch.full((D, 2), 0.1, dtype=DT)
    decay = base[:, 1]  # stride 2
    assert not decay.is_contiguous()
    m, hopt = build(0.1, decay=decay)
    run(hopt, 8)
    applied = hopt.history[-1].hypergrad["decay"]
    assert torch.equal(decay, torch.full((D,), 0.1, dtype=DT).add(applied, alpha=-0.1))
    assert torch.equal(base[:, 0], torch.full((D,), 0.1, dtype=DT))


class Boom(Exception):
    pass


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["group-dict", "tensor-lr"])
def test_a_rolled_back_step_keeps_the_optimizers_group_dicts_a_loop_holds(tensor_lr):
    """A hand-written schedule holding ``group = inner.param_groups[0]``: after a failed
    hyper-step (undone) it must still drive the optimizer. Before, the undo's
    ``load_state_dict`` replaced the group dicts and the schedule silently stopped acting.
    Likewise a tensor learning rate the loop fills in place (as torch.compile users do).
    Reference: the same run in which the failed call never happened."""
    fail = {"now": False}

    def flaky_val_loss(m, h, batch):
        if fail["now"]:
            fail["now"] = False
            raise Boom
        return val_loss(m, h, batch)

    def schedule_run(fail_at):
        torch.manual_seed(0)
        m = torch.nn.Linear(D, 1, bias=False).double()
        lr = torch.tensor(0.1, dtype=DT) if tensor_lr else 0.1
        inner = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)
        hopt = hg.HyperOptimizer(
            m,
            {"decay": hg.Positive(DECAY.clone())},
            inner_optimizer=inner,
            outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.1),
            train_loss=train_loss,
            val_loss=flaky_val_loss,
            val_data=VAL,
            method=hg.IFT(hg.CG(maxiter=D, tol=1e-12)),
            inner_steps=4,
        )
        group, outer_group = inner.param_groups[0], hopt.outer_optimizer.param_groups[0]
        for step in range(12):
            if tensor_lr:
                lr.fill_(0.1 / (1 + step))  # the loop's own schedule, through its reference
            else:
                group["lr"] = 0.1 / (1 + step)
            outer_group["lr"] = 0.1 / (1 + step)
            for attempt in range(2):
                fail["now"] = attempt == 0 and step == fail_at
                hopt.zero_grad()
                hopt.train_loss(TRAIN).backward()
                try:
                    hopt.step(TRAIN)
                    break
                except Boom:
                    assert step == fail_at
        return m, hopt

    m_ref, ref = schedule_run(fail_at=None)
    m, hopt = schedule_run(fail_at=3)
    assert hopt.hyper_steps == ref.hyper_steps == 3
    assert torch.equal(m.weight, m_ref.weight)
    assert torch.equal(hopt.raw_hparams()[0], ref.raw_hparams()[0])
    assert float(hopt.inner_optimizer.param_groups[0]["lr"]) == 0.1 / 12


def test_a_trajectory_run_stopped_by_its_holdout_guard_resumes_mid_window():
    """patience ran out (hyper-steps stopped, no window recorded any more), saved at a step
    count that is not a multiple of inner_steps. Before: the load expected that window and
    refused the checkpoint ("The checkpoint's `window` is malformed."). Reference: the
    uninterrupted run, bit for bit."""
    holdout = (VAL[0], VAL[1] + 5.0)

    def build_stopping():
        torch.manual_seed(0)
        m = torch.nn.Linear(D, 1, bias=False).double()
        hopt = hg.HyperOptimizer(
            m,
            {"decay": hg.Positive(DECAY.clone())},
            inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5),
            outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.1),
            train_loss=train_loss,
            val_loss=val_loss,
            val_data=VAL,
            holdout_data=holdout,
            patience=1,
            min_delta=10.0,  # no score improves enough: stop at the second hyper-step
            method=hg.Unrolled(),
            inner_steps=3,
        )
        return m, hopt

    m, hopt = build_stopping()
    run(hopt, 7)
    assert hopt.stopped and hopt.hyper_steps == 2 and hopt.loop.window is None
    state = torch.load(_roundtrip(hopt.state_dict()), weights_only=True)
    weights = {k: v.clone() for k, v in m.state_dict().items()}
    run(hopt, 5)
    m2, resumed = build_stopping()
    m2.load_state_dict(weights)
    resumed.load_state_dict(state)
    assert resumed.stopped
    run(resumed, 5)
    assert torch.equal(m2.weight, m.weight)
    assert torch.equal(resumed.raw_hparams()[0], hopt.raw_hparams()[0])
    assert resumed.hyper_steps == hopt.hyper_steps == 2


def test_a_checkpoint_without_guard_state_starts_the_live_guard_fresh():
    """Loading a checkpoint saved without holdout data into a hyper-optimizer whose guard
    has stopped: the guard starts fresh (as documented), not stopped with the later run's
    best values. Before, hyper-steps never resumed. Reference: a new hyper-optimizer
    loading the same checkpoint."""
    holdout = (VAL[0], VAL[1] + 5.0)

    def make(with_holdout):
        torch.manual_seed(0)
        m = torch.nn.Linear(D, 1, bias=False).double()
        extra = {"holdout_data": holdout, "patience": 1, "min_delta": 10.0} if with_holdout else {}
        hopt = hg.HyperOptimizer(
            m,
            {"decay": hg.Positive(DECAY.clone())},
            inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
            outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=0.1),
            train_loss=train_loss,
            val_loss=val_loss,
            val_data=VAL,
            method=hg.IFT(hg.CG(maxiter=D, tol=1e-12)),
            inner_steps=2,
            **extra,
        )
        return m, hopt

    m_plain, plain = make(False)
    run(plain, 4)
    state, weights = plain.state_dict(), {k: v.clone() for k, v in m_plain.state_dict().items()}
    m_live, live = make(True)
    run(live, 6)
    assert live.stopped and live.best_holdout_loss is not None
    m_new, new = make(True)
    for m, hopt in ((m_live, live), (m_new, new)):
        m.load_state_dict(weights)
        hopt.load_state_dict(state)
        assert not hopt.stopped and hopt.best_holdout_loss is None
        run(hopt, 4)
    assert live.hyper_steps == new.hyper_steps == 4
    assert torch.equal(live.raw_hparams()[0], new.raw_hparams()[0])
    assert live.best_holdout_loss == new.best_holdout_loss
