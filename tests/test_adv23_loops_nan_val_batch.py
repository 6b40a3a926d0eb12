"""A validation batch holding a NaN stopped every later hyper-step.

A skipped hyper-step (``nonfinite="skip"``, the default under a process group) rolled its
validation draw back with the rest of it, so the next hyper-step drew the same batch, found
the same NaN and skipped, forever: a list ``[good, bad, good, good]`` gave 1 hyper-step and
5 skips, tuple data with one NaN row 0 hyper-steps in 20 (one batch drawn 20 times). A
skipped hyper-step now keeps its draws: the next one takes the next batch.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

DT = torch.float64
G = torch.Generator().manual_seed(0)
X, Y = torch.randn(60, 5, generator=G, dtype=DT), torch.randn(60, generator=G, dtype=DT)


def build(val_data, method, **kw):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1).to(DT)
    return hg.HyperOptimizer(
        model, {"decay": hg.Positive(torch.full((5,), 0.1, dtype=DT))},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=lambda r: torch.optim.SGD(r, lr=0.1),
        train_loss=lambda m, h, b: ((m(b[0]).squeeze(1) - b[1]) ** 2).mean()
        + 0.5 * (h["decay"] * m.weight[0] ** 2).sum(),
        val_loss=lambda m, h, b: ((m(b[0]).squeeze(1) - b[1]) ** 2).mean(),
        val_data=val_data, method=method, inner_steps=2, nonfinite="skip", **kw,
    )  # fmt: skip


def run(hopt, steps):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            hopt.zero_grad()
            hopt.train_loss((X[:30], Y[:30])).backward()
            hopt.step((X[:30], Y[:30]))
    return [str(w.message) for w in caught if "skipped" in str(w.message)]


@pytest.mark.parametrize(
    "method", [hg.IFT(hg.CG(maxiter=5)), hg.Unrolled()], ids=["ift", "unrolled"]
)
def test_a_bad_batch_of_a_list_skips_once_a_pass(method):
    good = (X[30:40], Y[30:40])
    bad = (X[40:50].clone(), Y[40:50].clone())
    bad[1][3] = float("nan")
    hopt = build([good, bad, good, good], method)
    skips = run(hopt, 16)  # 8 hyper-steps: two passes over the list, one bad batch each
    assert hopt.skipped == 2 and hopt.hyper_steps == 6 and len(skips) == 2


def test_a_nan_row_of_sampled_tensors_skips_only_the_draws_that_hold_it():
    y = Y[30:].clone()
    y[7] = float("nan")
    hopt = build((X[30:], y), hg.IFT(hg.CG(maxiter=5)), val_batch_size=5)
    run(hopt, 40)  # 20 hyper-steps; a draw of 5 rows of 30 holds row 7 with chance 1/6
    assert hopt.hyper_steps + hopt.skipped == 20
    assert 10 <= hopt.hyper_steps < 20 and hopt.skipped >= 1
    assert hopt.val_sampler.drawn == 20
