"""The reprs of the objects a user keeps say what they are: a constraint's settings (an
``Interval``'s bounds, a ``Positive``'s transform: both printed as ``Positive(value=...)``
and ``Interval(value=...)``, two different hyperparameters looked the same), a logger's
destination (was ``<...CSVLogger object at 0x...>``), and a trajectory window's settings
without its tensors (its start parameters and batches were printed in full: 17 kB for a
64-unit MLP)."""

from __future__ import annotations

import torch

import hypergradient as hg
from hypergradient.integrations import CSVLogger, ProgressBar
from test_hyperoptimizer_support import batches, build, mlp, run


def test_constraints_show_their_settings():
    assert repr(hg.Positive(torch.tensor([0.5]), transform="softplus")) == (
        "Positive(value=tensor([0.5000]), transform='softplus')"
    )
    assert repr(hg.Interval(torch.tensor([0.5]), low=0.0, high=2.0)) == (
        "Interval(value=tensor([0.5000]), low=0.0, high=2.0)"
    )
    assert repr(hg.Unconstrained(torch.tensor([0.5]))) == "Unconstrained(value=tensor([0.5000]))"


def test_loggers_show_where_they_write(tmp_path):
    path = tmp_path / "run.csv"
    assert repr(CSVLogger(path)) == f"CSVLogger({str(path)!r}, columns=0)"
    assert repr(ProgressBar(total=5, disable=True)) == "ProgressBar(n=0, total=5)"


def test_a_trajectory_window_repr_leaves_its_tensors_out():
    model, hopt = build(hg.Unrolled(), model=mlp(width=64))
    run(hopt, batches(4))
    text = repr(hopt.loop.window)
    assert text.startswith("TrajectoryWindow(optimizer=SGD(lr=0.3, momentum=0.9")
    assert "tensor(" not in text and len(text) < 1000
