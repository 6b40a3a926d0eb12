"""Gradient accumulation over several ``hopt.train_loss`` calls, with T1T2.

T1T2 replays one forward pass of the step's (concatenated) batch, so it skips the
hyper-step of a step accumulated over forward passes that drew random numbers (dropout).
That check compared torch's random-number state between the ``train_loss`` calls, so a
loop's own draws between them (a random augmentation of the next micro-batch) counted as
dropout: a model without dropout skipped every hyper-step and was never tuned. And in a
``begin_step``/``end_step`` loop, where each micro-batch's ``begin_step`` replaces the
last, the check never fired: T1T2 applied the hypergradient of one mask set replayed over
the whole batch. Now only the forward passes' own draws count, in both loops.

A ``hopt.train_loss`` call for logging under ``torch.no_grad()`` took the replay's
random-number state: after the training call (train mode, dropout) it made every hyper-step
skip, T1T2's as "accumulated", Unrolled's replay 1.4 away from the run. A call whose loss
carries no gradient now records nothing for the replay.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hypergradient as hg

GEN = torch.Generator().manual_seed(0)
X = torch.randn(24, 3, generator=GEN, dtype=torch.float64)
Y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
XV = torch.randn(8, 3, generator=GEN, dtype=torch.float64)
YV = XV @ torch.tensor([0.5, 1.0, -1.0], dtype=torch.float64)


class Net(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.lin = nn.Linear(3, 1, bias=False).double()
        self.drop = nn.Dropout(p)

    def forward(self, x):
        return self.lin(self.drop(x))


def train_loss(m, h, b):
    out = m(b[0]).squeeze(-1)
    return ((out - b[1]) ** 2).mean() + 0.5 * (h["decay"] * m.lin.weight[0] ** 2).sum()


def val_loss(m, h, b):
    return ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean()


def make(p=0.0, method=None):
    torch.manual_seed(0)
    model = Net(p)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    hopt = hg.HyperOptimizer(
        model,
        {"decay": torch.full((3,), 0.1, dtype=torch.float64)},
        inner_optimizer=inner,
        outer_optimizer=lambda q: torch.optim.SGD(q, lr=0.5),
        train_loss=train_loss,
        val_loss=val_loss,
        val_data=(XV, YV),
        method=method or hg.T1T2(),
        inner_steps=1,
    )
    return model, inner, hopt


def augmented_batches():
    torch.manual_seed(1)
    out = []
    for i in range(3):
        parts = []
        for j in range(2):
            rows = slice(8 * i + 4 * j, 8 * i + 4 * j + 4)
            parts.append((X[rows] + 0.01 * torch.randn_like(X[rows]), Y[rows]))
        out.append(parts)
    return out


def test_accumulation_with_the_loops_own_draws_and_no_dropout_takes_every_hyper_step():
    model, inner, hopt = make()
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(3):
            hopt.zero_grad()
            parts = []
            for j in range(2):
                rows = slice(8 * i + 4 * j, 8 * i + 4 * j + 4)
                mb = (X[rows] + 0.01 * torch.randn_like(X[rows]), Y[rows])  # augmentation
                parts.append(mb)
                (hopt.train_loss(mb) / 2).backward()
            hopt.step((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
    assert hopt.hyper_steps == 3 and hopt.skipped == 0
    # the reference: one forward pass over the same augmented batches
    ref_model, _, ref = make()
    for parts in augmented_batches():
        batch = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        ref.zero_grad()
        ref.train_loss(batch).backward()
        ref.step(batch)
    assert torch.allclose(hopt.hparams["decay"], ref.hparams["decay"], rtol=0, atol=1e-14)
    assert torch.allclose(model.lin.weight, ref_model.lin.weight, rtol=0, atol=1e-14)


def test_begin_step_per_micro_batch_with_dropout_skips_as_step_does():
    model, inner, hopt = make(p=0.5)
    decay = hopt.hparams["decay"].clone()
    with pytest.warns(hg.HypergradientWarning, match="accumulated over several train_loss"):
        for i in range(2):
            inner.zero_grad()
            parts = []
            for j in range(2):
                rows = slice(8 * i + 4 * j, 8 * i + 4 * j + 4)
                mb = (X[rows], Y[rows])
                parts.append(mb)
                hopt.begin_step()  # a new call replaces the unfinished one
                (hopt.train_loss(mb) / 2).backward()
            inner.step()
            hopt.end_step((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
    assert hopt.hyper_steps == 0 and hopt.skipped == 2
    assert torch.equal(hopt.hparams["decay"], decay)


def test_one_forward_per_step_with_dropout_still_hyper_steps():
    model, inner, hopt = make(p=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(2):
            b = (X[8 * i : 8 * i + 8], Y[8 * i : 8 * i + 8])
            hopt.zero_grad()
            hopt.train_loss(b).backward()
            hopt.step(b)
    assert hopt.hyper_steps == 2


def run_with_logging(log_with_hopt, method, where):
    """A loop that logs the training loss under ``torch.no_grad()`` (train mode, dropout
    drawing) after backward, or (eval mode) before the step's forward pass."""
    model, inner, hopt = make(p=0.5, method=method)
    for i in range(4):
        b = (X[4 * i : 4 * i + 4], Y[4 * i : 4 * i + 4])
        if where == "before":
            model.eval()
        with torch.no_grad():
            if where == "before":
                hopt.train_loss(b) if log_with_hopt else train_loss(model, hopt.hparams, b)
        model.train()
        hopt.zero_grad()
        hopt.train_loss(b).backward()
        with torch.no_grad():
            if where == "after":
                hopt.train_loss(b) if log_with_hopt else train_loss(model, hopt.hparams, b)
        hopt.step(b)
    return hopt


@pytest.mark.parametrize("where", ["after", "before"])
@pytest.mark.parametrize("method", [hg.T1T2, hg.Unrolled])
def test_a_logging_call_under_no_grad_neither_skips_nor_changes_the_replay(method, where):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logged = run_with_logging(True, method(), where)
    plain = run_with_logging(False, method(), where)  # the same draws, without hopt
    assert logged.hyper_steps == 4 and logged.skipped == 0
    assert torch.equal(logged.hparams["decay"], plain.hparams["decay"])
    for record in logged.history:
        assert record.diagnostics.get("replay_error", 0.0) < 1e-14
