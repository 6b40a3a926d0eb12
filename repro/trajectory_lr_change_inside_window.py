"""A trajectory method replays a window with the inner optimizer's settings at its start,
even when they change inside the window (a torch lr scheduler stepped every step, or
Lightning's documented warm-up idiom that sets param_groups' lr in `optimizer_step`).

Nothing detects it: the replay ends 0.27 (relative) away from the real weights and the
warning blames the user's train_loss ("train_loss must be the loss the model was trained
on ..."); the (wrong) hypergradient is applied. The Lightning callback refuses configured
lr schedulers up front (integrations/_lightning_checks.check_schedulers), but cannot see a
change made in `optimizer_step` or by a scheduler stepped by hand.
Expected: either the window records each step's settings (the replay then stays exact), or
`end_step`/`step` raise when a setting differs from the window's start, naming it.
The fix belongs in hyperoptimizer/ (window.py / stepping.py)."""

import sys
import warnings
from pathlib import Path

import torch

import hypergradient as hg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_hyperoptimizer_support import batches, build  # noqa: E402

for schedule in (False, True):
    model, hopt = build(hg.Unrolled(), inner_steps=3)
    sched = torch.optim.lr_scheduler.StepLR(hopt.inner_optimizer, 1, 0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for b in batches(6):
            hopt.zero_grad()
            hopt.train_loss(b).backward()
            hopt.step(b)
            if schedule:
                sched.step()
    errors = [r.info.replay_error for r in hopt.history]
    print(f"lr halved every step: {schedule}; replay errors {errors}; warnings {len(caught)}")
# lr halved every step: False -> replay errors ~1e-16
# lr halved every step: True  -> replay errors [0.27, 0.05], blamed on train_loss
