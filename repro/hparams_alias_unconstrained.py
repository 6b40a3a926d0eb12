"""`HyperOptimizer.hparams` ("current values, detached") returns, for a plain-tensor
(Unconstrained) hyperparameter, a detached *view of the raw leaf*: the next hyper-step
updates it in place, so a dict kept from before a step changes with it. For hg.Positive it
returns a new tensor (a snapshot). The optuna integration's `refine` stored the wrong
values because of this (fixed there by copying); other callers keeping `hopt.hparams`
across a step (user code comparing before/after, a holdout/keep-best written elsewhere)
meet the same surprise. Suggested fix in hyperoptimizer/hparams.py `values()`: clone when
the transform returns its input, or document that the values are live views."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import hypergradient as hg  # noqa: E402
from test_hyperoptimizer_support import DT, batches, build  # noqa: E402

for decay in (torch.full((4, 6), 0.05, dtype=DT), hg.Positive(torch.full((4, 6), 0.05, dtype=DT))):
    _, hopt = build(decay=decay, outer_lr=0.5, inner_steps=1)
    before = hopt.hparams["decay"]
    kept = before.clone()
    b = batches(1)[0]
    hopt.zero_grad()
    hopt.train_loss(b).backward()
    hopt.step(b)
    print(
        type(decay).__name__,
        "value kept from before the step changed:",
        not torch.equal(before, kept),
    )
# Tensor   -> True  (a live view)
# Positive -> False (a snapshot)
