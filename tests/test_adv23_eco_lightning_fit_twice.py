"""A second ``trainer.fit`` on the same Trainer and module started the hyper-steps afresh.

The callback built a new hyper-optimizer at every fit: its hyper-step counter and history
restarted (6 hyper-steps of the uninterrupted run became 3 + 3, the library's own loggers
writing the second fit's over the first's at the same steps), and so did the outer
optimizer's state and the holdout guard's best. A second fit of the same Trainer and module
now goes on from the first fit's hyper-optimizer, with the optimizer Lightning builds afresh
(plain SGD here: no state, so the two fits are the uninterrupted run, to the bit).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradient as hg

pytest.importorskip("lightning.pytorch")
from test_integrations_lightning import LogReg, callback, loader, trainer  # noqa: E402


def fit(epochs, again=None):
    module, cb = LogReg(), callback()
    run = trainer(max_epochs=epochs[0], callbacks=[cb])
    run.fit(module, loader())
    for more in epochs[1:]:
        run.fit_loop.max_epochs = more
        run.fit(module if again is None else again(), loader())
    return module, cb


def test_two_fits_are_the_uninterrupted_run():
    whole_module, whole = fit([3])
    module, cb = fit([1, 3])
    assert cb.hopt.hyper_steps == whole.hopt.hyper_steps == 4
    assert [r.step for r in cb.hopt.history] == [r.step for r in whole.hopt.history]
    assert torch.equal(module.decay.value, whole_module.decay.value)
    a, b = cb.hopt.outer_optimizer.state_dict(), whole.hopt.outer_optimizer.state_dict()
    assert all(torch.equal(a["state"][0][k], b["state"][0][k]) for k in ("exp_avg", "exp_avg_sq"))


def test_a_fit_of_another_module_starts_afresh():
    _, cb = fit([1, 3], again=LogReg)
    assert cb.hopt.hyper_steps == 2 and [r.hyper_step for r in cb.hopt.history] == [1, 2]


def test_a_second_fit_that_trains_other_parameters_starts_afresh_with_a_warning():
    module, cb = LogReg(), callback()
    run = trainer(max_epochs=1, callbacks=[cb])
    run.fit(module, loader())
    module.linear.bias.requires_grad_(False)  # frozen now: another set of trained tensors
    run.fit_loop.max_epochs = 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(module, loader())
    ours = [str(w.message) for w in caught if issubclass(w.category, hg.HypergradientWarning)]
    assert any("starts this fit's hyper-steps afresh" in m for m in ours), ours
    assert cb.hopt.hyper_steps == 1
