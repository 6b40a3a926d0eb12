"""Every example runs end to end in its --quick mode (smoke test; figures are checked in
the examples' own sanity checks and quoted in the README)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted(
    p
    for p in (Path(__file__).parent.parent / "examples").glob("*.py")
    if not p.name.startswith("_")
)


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
    if "--out" in script.read_text():
        assert list(tmp_path.glob("*.png")), "the example saved no plot"
