"""Every example runs end to end in its --quick mode (smoke test; figures are checked in
the examples' own sanity checks and quoted in the README).

Quick mode must also be honest and readable: the script says its figures are a smoke run
(not the documented results), prints no ``nan`` in place of a number, uses no deprecated
name of the API, and saves its plots at a readable resolution.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted(
    p
    for p in (Path(__file__).parent.parent / "examples").glob("*.py")
    if not p.name.startswith("_")
)

#: Plots below this resolution were unreadable (meta_learning_sine saved 60 dpi in quick mode).
MIN_DPI = 100


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_quick(script, tmp_path):
    args = [sys.executable, str(script), "--quick"]
    if "--out" in script.read_text():
        args += ["--out", str(tmp_path)]
    done = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"},
    )
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
