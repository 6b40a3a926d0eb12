"""T1T2 with ``torch.optim.SGD(nesterov=True)`` refused a loss's constant factor.

The step check reads the step's ``.grad`` against the replayed gradient ``r`` and, for
Nesterov SGD, against ``r + momentum * buf`` too (the foreach implementation writes that into
``.grad``). On the CPU's single-tensor implementation ``.grad`` is untouched, but the check
took the closer candidate: ``(2 * loss).backward()`` read as foreach's ``.grad``, its factor
2 refused ("not train_loss's gradient", blamed on clipping) and the hypergradient applied
was half the step's. The Nesterov candidate now counts only for a ``.grad`` written since the
backward pass. Identity: the step on ``2 * loss`` at ``lr`` is the step on ``loss`` at
``2 lr`` (the momentum buffers scale with it), so the two runs' hypergradients agree.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

DT = torch.float64
G = torch.Generator().manual_seed(0)
X, Y = torch.randn(90, 6, generator=G, dtype=DT), torch.randint(0, 3, (90,), generator=G)
CE = torch.nn.functional.cross_entropy


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(DT)


def train_loss(m, h, b):
    return CE(m(b[0]), b[1]) + 0.5 * (h["decay"] * m[0].weight ** 2).sum()


def val_loss(m, h, b):
    return CE(m(b[0]), b[1])


def run(factor, lr, split, foreach=False):
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, foreach=foreach)
    hopt = hg.HyperOptimizer(
        model, {"decay": hg.Positive(torch.full((8, 6), 1e-2, dtype=DT))},
        inner_optimizer=opt, outer_optimizer=lambda r: torch.optim.SGD(r, lr=0.0),
        train_loss=train_loss, val_loss=val_loss, val_data=(X[60:], Y[60:]),
        method=hg.T1T2(), inner_steps=3,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(3):
            batch = (X[i * 20 : i * 20 + 20], Y[i * 20 : i * 20 + 20])
            hopt.zero_grad()
            if split:  # two micro-batches' losses summed, not averaged
                for part in (slice(0, 10), slice(10, 20)):
                    hopt.train_loss(tuple(t[part] for t in batch)).backward()
            else:
                (factor * hopt.train_loss(batch)).backward()
            hopt.step(batch)
    ours = [str(w.message) for w in caught if issubclass(w.category, hg.HypergradientWarning)]
    return hopt.history[-1], ours


@pytest.mark.parametrize("split", [False, True], ids=["scaled loss", "summed micro-batches"])
def test_a_constant_factor_under_nesterov_is_accounted_for(split):
    scaled, ours = run(2.0, 0.05, split)
    same, _ = run(1.0, 0.1, False)
    assert ours == [] and scaled.info.stats["step_grad_scale"] == pytest.approx(2.0)
    assert torch.allclose(scaled.hypergrad["decay"], same.hypergrad["decay"], rtol=1e-8, atol=0)


def test_the_plain_step_is_still_silent_and_unscaled():
    plain, ours = run(1.0, 0.1, False)
    assert ours == [] and plain.info.stats.get("step_grad_scale") in (None, 1.0)


def test_foreach_nesterov_which_writes_into_grad_is_still_read_as_the_step():
    """foreach SGD adds the new buffer to ``.grad`` in place: that candidate still serves."""
    ref, _ = run(1.0, 0.1, False)
    got, ours = run(1.0, 0.1, False, foreach=True)
    assert ours == [] and torch.allclose(got.hypergrad["decay"], ref.hypergrad["decay"])
