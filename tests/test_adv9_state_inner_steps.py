"""A trajectory checkpoint loaded into a hyper-optimizer with another ``inner_steps`` is
refused naming ``inner_steps``, and changes nothing.

Saved at a hyper-step (no window) under ``inner_steps=3`` and loaded where ``inner_steps=5``
expects one step since the last hyper-step, the load said "The checkpoint's `window` is
malformed.", which points at a corrupt file rather than at the setting that differs."""

from __future__ import annotations

import pytest

import hypergradient as hg
from test_hyperoptimizer_support import assert_same, batches, build, everything, run


@pytest.mark.parametrize(("saved_at", "inner_steps"), [(6, 5), (5, 4)])
def test_another_inner_steps_is_named_and_changes_nothing(saved_at, inner_steps):
    _, source = build(hg.Unrolled(), inner_steps=3)
    run(source, batches(saved_at))
    state = source.state_dict()
    model, hopt = build(hg.Unrolled(), inner_steps=inner_steps)
    run(hopt, batches(2, seed=5))
    before = everything(model, hopt)
    with pytest.raises(ValueError, match="saved with another inner_steps"):
        hopt.load_state_dict(state)
    assert_same(before, everything(model, hopt))


def test_the_same_inner_steps_loads():
    _, source = build(hg.Unrolled(), inner_steps=3)
    run(source, batches(6))
    _, hopt = build(hg.Unrolled(), inner_steps=3)
    hopt.load_state_dict(source.state_dict())
    assert hopt.hyper_steps == 2 and hopt.loop.window is None
