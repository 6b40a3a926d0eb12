"""A trajectory window whose steps were taken in different train/eval modes.

The replay of Unrolled, ForwardMode and DrMAD runs every step of the window in the mode the
model is in at the hyper-step. A loop that took a step in eval mode (``model.eval()`` to
evaluate, ``model.train()`` forgotten until later) trained another run than the one
replayed: with BatchNorm the replay ended 4.5e-2 (relative) from the model's weights, under
the 10% bound, and a hypergradient 5.7% off central differences of the run was applied
with a generic replay warning. Such a window's hyper-step is now skipped with a warning
naming the module and the switch (as a learning-rate change or ``model.to()`` inside a
window are); a loop that evaluates in eval mode and trains in train mode is unaffected and
gets the exact hypergradient. A checkpoint taken mid-window keeps the window's modes."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

import hypergradient as hg
from test_hyperoptimizer_support import DT, VAL, batches, build, mlp, train_loss, val_loss

METHODS = {"Unrolled": hg.Unrolled, "ForwardMode": hg.ForwardMode, "DrMAD": hg.DrMAD}
DECAY0 = torch.full((4, 6), 1e-2, dtype=DT)


def _model():
    model = mlp(batchnorm=True)
    with torch.no_grad():  # running statistics away from their initial values
        for b in batches(5, seed=11):
            model(b[0])
    return model


def _hopt(method, model):
    return build(
        method,
        model=model,
        decay=hg.Positive(DECAY0.clone()),
        outer_optimizer=lambda hp: torch.optim.SGD(hp, lr=1.0),  # applied = raw0 - raw1
        val_batch_size=None,
    )[1]


def _step(hopt, batch):
    hopt.zero_grad()
    hopt.train_loss(batch).backward()
    hopt.step(batch)


def _evaluate(model):
    model.eval()
    with torch.no_grad():
        val_loss(model, None, VAL)
    model.train()


def _run_as_trained(start, raw, steps, modes):
    """The plain torch loop (momentum SGD) the hyper-optimizer watched, in its modes; the
    validation loss at its end in train mode (the hyper-step's)."""
    m = copy.deepcopy(start)
    opt = torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9)
    for b, mode in zip(steps, modes):
        m.train(mode)
        opt.zero_grad()
        train_loss(m, {"decay": raw.exp()}, b).backward()
        opt.step()
    m.train()
    with torch.no_grad():
        return val_loss(m, None, VAL)


def _central_differences(start, steps, modes, eps=1e-5):
    raw = DECAY0.log()
    fd = torch.zeros_like(raw)
    for i in range(raw.numel()):
        e = torch.zeros_like(raw)
        e.view(-1)[i] = eps
        up = _run_as_trained(start, raw + e, steps, modes)
        down = _run_as_trained(start, raw - e, steps, modes)
        fd.view(-1)[i] = (up - down) / (2 * eps)
    return fd


@pytest.mark.parametrize("name", list(METHODS))
def test_a_step_taken_in_eval_mode_inside_a_window_skips_its_hyper_step(name):
    model = _model()
    hopt = _hopt(METHODS[name](), model)
    steps = batches(3)
    with pytest.warns(hg.HypergradientWarning, match=r"'model' switched from eval to train mode"):
        for batch, mode in zip(steps, (False, True, True)):
            model.train(mode)
            _step(hopt, batch)
    assert (hopt.hyper_steps, hopt.skipped) == (0, 1)
    assert torch.equal(hopt.raw_hparams()[0], DECAY0.log())


@pytest.mark.parametrize("name", list(METHODS))
def test_evaluating_in_eval_mode_between_steps_keeps_the_exact_hypergradient(name):
    model = _model()
    start = copy.deepcopy(model)
    hopt = _hopt(METHODS[name](), model)
    steps = batches(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.HypergradientWarning)
        for batch in steps:
            _step(hopt, batch)
            _evaluate(model)
    assert (hopt.hyper_steps, hopt.skipped) == (1, 0)
    if name == "DrMAD":  # an approximation: applied, not compared
        return
    applied = DECAY0.log() - hopt.raw_hparams()[0].detach()
    fd = _central_differences(start, steps, (True, True, True))
    assert torch.allclose(applied, fd, rtol=1e-6, atol=1e-9 * float(fd.abs().max()))


def test_a_checkpoint_mid_window_keeps_the_modes_at_its_start():
    model = _model()
    hopt = _hopt(hg.Unrolled(), model)
    steps = batches(3)
    model.eval()
    _step(hopt, steps[0])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "hopt": hopt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["hopt"]["window"]["modes0"][""] is False

    resumed_model = _model()
    resumed_model.load_state_dict(saved["model"])
    resumed = _hopt(hg.Unrolled(), resumed_model)
    resumed.load_state_dict(saved["hopt"])
    resumed_model.train()  # the process restarted in train mode: not the window's steps
    with pytest.warns(hg.HypergradientWarning, match=r"switched from eval to train mode"):
        for batch in steps[1:]:
            _step(resumed, batch)
    assert (resumed.hyper_steps, resumed.skipped) == (0, 1)


def test_a_malformed_modes_entry_is_refused_and_changes_nothing():
    model = _model()
    hopt = _hopt(hg.Unrolled(), model)
    _step(hopt, batches(1)[0])
    state = hopt.state_dict()
    state["window"]["modes0"] = {"": "train"}
    before = copy.deepcopy(hopt.state_dict())
    with pytest.raises(ValueError, match="modes0"):
        hopt.load_state_dict(state)
    after = hopt.state_dict()
    assert torch.equal(before["window"]["params0"][0], after["window"]["params0"][0])
    assert after["window"]["modes0"] == {k: True for k in after["window"]["modes0"]}
