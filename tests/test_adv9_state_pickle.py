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


def test_a_hyper_optimizer_logging_to_a_list_of_loggers_pickles(tmp_path):
    """The list's sinks were joined by a closure: ``Can't pickle local object
    '_as_sink.<locals>.fan_out'``, though every logger in it pickles."""
    from hypergradient.integrations import CSVLogger

    path = tmp_path / "run.csv"
    model, hopt = build(logger=[CSVLogger(path), CSVLogger(tmp_path / "copy.csv")])
    run(hopt, batches(3))
    model2, hopt2 = pickle.loads(pickle.dumps((model, hopt)))
    steps = batches(3, seed=4)
    rng = torch.get_rng_state()
    run(hopt, steps)
    torch.set_rng_state(rng)
    run(hopt2, steps)
    assert_same(everything(model, hopt), everything(model2, hopt2))
    rows = CSVLogger(path, append=True).rows()  # both wrote their second hyper-step here
    assert [r["hyper_step"] for r in rows] == ["1", "2", "2"]
