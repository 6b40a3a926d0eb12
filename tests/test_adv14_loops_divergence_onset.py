"""The driver's divergence watch at the onset of a divergence (the figures quoted in
``hyperoptimizer/divergence.py``).

The trajectory methods report a window whose loss ends at its highest, ten times its
lowest, while their sensitivity grew 100-fold (momentum SGD at 0.85 times its stability
limit: losses ``[1.52, 0.99, 1.35, 6.98]``). The driver's watch has no sensitivity, and the
loss or gradient-norm rise alone fires on healthy minibatch training, so it has no such
rule; what it does instead, pinned here: T1T2's one-step hypergradient at the onset
(step 30) stays within the healthy run's range and no warning is given; the next
hyper-step (step 40) is reported by the loss-growth rule while the run is finite; the run
at 0.7 times the limit gets no warning.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import hypergradient as hg
from test_adv13_traj_edge_rise import BETA, DT, LIMIT, NET, XV, YV, X, Y


def _train(m, h, b):
    return F.mse_loss(m(b[0]), b[1]) + 0.5 * h["decay"] * sum((q**2).sum() for q in m.parameters())


def _val(m, h, b):
    return F.mse_loss(m(b[0]), b[1])


def run(factor, steps=40):
    """T1T2 every 10 steps of momentum SGD at ``factor`` times the limit: the decay's
    hypergradients and the steps at which a divergence warning came."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)
    model.load_state_dict(NET.state_dict())
    hopt = hg.HyperOptimizer(
        model,
        {"decay": torch.tensor(1e-3, dtype=DT)},
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=factor * LIMIT, momentum=BETA),
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
        train_loss=_train,
        val_loss=_val,
        val_data=(XV, YV),
        method=hg.T1T2(),
        inner_steps=10,
    )
    warned = []
    for t in range(1, steps + 1):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hopt.zero_grad()
            hopt.train_loss((X, Y)).backward()
            hopt.step((X, Y))
        warned += [(t, str(w.message)) for w in caught if "diverging" in str(w.message)]
    return [float(r.hypergrad["decay"]) for r in hopt.history], warned


def test_the_onset_is_reported_at_the_next_hyper_step_and_t1t2_is_not_amplified():
    healthy, quiet = run(0.7)
    assert not quiet and len(healthy) == 4
    grads, warned = run(0.85)
    low, high = min(healthy), max(healthy)
    assert low <= grads[2] <= high  # step 30, the onset: one step, not amplified (-0.59)
    assert [t for t, _ in warned] == [40]
    assert "training loss grew by at least 3x" in warned[0][1]
    assert abs(grads[3]) > 1e6  # the hyper-step the warning comes with (2.8e9)
