"""Every example runs end to end in its --quick mode (smoke test; figures are checked in
the examples' own sanity checks and quoted in the README).

Each example runs as ``python examples/<name>.py --quick`` would, forked from one process
that has imported torch, hypergradient, matplotlib, scikit-learn and Lightning once
(tests/forked.py): a process of its own with nothing run in it before, its own output and
exit code, without paying those imports ten times. tests/test_distributed.py runs one example
under torchrun, in fresh interpreters.

Quick mode must also be honest and readable: the script says its figures are a smoke run
(not the documented results), prints no ``nan`` in place of a number, uses no deprecated
name of the API, and saves its plots at a readable resolution.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from forked import ScriptServer

EXAMPLES = sorted(
    p
    for p in (Path(__file__).parent.parent / "examples").glob("*.py")
    if not p.name.startswith("_")
)

#: Plots below this resolution were unreadable (meta_learning_sine saved 60 dpi in quick mode).
MIN_DPI = 100

#: What the examples import that takes time (each example still imports what it uses).
PRELOAD = [
    "torch",
    "torch.distributed",
    "hypergradient",
    "numpy",
    "matplotlib.pyplot",
    "sklearn.datasets",
    "sklearn.model_selection",
    "sklearn.metrics",
    "tqdm",
    "lightning.pytorch",
]


def _env() -> dict[str, str]:
    return {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def server():
    with ScriptServer(PRELOAD, _env()) as running:
        yield running


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_quick(script, tmp_path, server):
    args = [str(script), "--quick"]
    if "--out" in script.read_text():
        args += ["--out", str(tmp_path)]
    done = server.run(args, env=_env(), timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.strip(), "the example printed nothing"
    assert "quick mode" in done.stdout.lower(), "quick mode must say it is a smoke run"
    assert not re.search(r"\bnan\b", done.stdout, re.IGNORECASE), done.stdout[-2000:]
    # an example calls the current API: a deprecated alias it uses warns from its own lines
    assert "DeprecationWarning" not in done.stderr, done.stderr[-2000:]
    if "--out" in script.read_text():
        from PIL import Image  # matplotlib's own dependency

        plots = list(tmp_path.glob("*.png"))
        assert plots, "the example saved no plot"
        for plot in plots:
            with Image.open(plot) as image:
                dpi = image.info.get("dpi", (0, 0))[0]
            assert dpi >= MIN_DPI, f"{plot.name} saved at {dpi:.0f} dpi"
