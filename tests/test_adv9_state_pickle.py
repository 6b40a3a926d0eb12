"""A whole hyper-optimizer pickles (``pickle``, ``torch.save(hopt)``, multiprocessing) in
the middle of a trajectory window, and the copy goes on as the original, bit for bit.

The window kept weak references to the last step's gradients (to tell a loop that zeroes
with ``set_to_none=False``), which ``pickle`` refuses: ``TypeError: cannot pickle
'weakref.ReferenceType' object`` at any step but a hyper-step's, for Unrolled, ForwardMode
and DrMAD."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import hypergradient as hg
from test_hyperoptimizer_support import assert_same, batches, build, everything, mlp, run

METHODS = {"Unrolled": hg.Unrolled, "ForwardMode": hg.ForwardMode, "DrMAD": hg.DrMAD}


def _torch_save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES = {
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
    "torch.save": _torch_save,
    "deepcopy": copy.deepcopy,
}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("name", list(METHODS))
def test_a_copy_made_mid_window_continues_as_the_original(name, how):
    model, hopt = build(METHODS[name](), model=mlp(dropout=0.2))
    steps = batches(10)
    run(hopt, steps[:4])  # one hyper-step (inner_steps=3), one step into the next window
    assert len(hopt.loop.window) == 1
    model2, hopt2 = COPIES[how]((model, hopt))
    rng = torch.get_rng_state()
    run(hopt, steps[4:])
    torch.set_rng_state(rng)
    run(hopt2, steps[4:])
    assert hopt.hyper_steps == hopt2.hyper_steps == 3 and hopt.skipped == 0
    assert_same(everything(model, hopt), everything(model2, hopt2))
