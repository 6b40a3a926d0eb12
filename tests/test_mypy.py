"""``mypy src`` is clean under the project's configuration (``[tool.mypy]`` in pyproject.toml:
every function annotated, bodies checked, no implicit Optional, no stale ignores).
The whole of ``src`` is clean: a new error anywhere fails.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy")

ROOT = Path(__file__).resolve().parent.parent

ERROR = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: (?P<message>.*)$")


def test_the_configuration_is_strict_enough_to_mean_something():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    for key in ("disallow_untyped_defs", "disallow_incomplete_defs", "check_untyped_defs"):
        assert config.get(key) is True, key
    assert config.get("files") == ["src"]
    assert (ROOT / "src" / "hypergradient" / "py.typed").exists()


def test_mypy_src_is_clean():
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--show-error-codes"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode not in (0, 1):  # 2: mypy itself failed (config, crash)
        pytest.fail(f"mypy did not run: {done.stderr[-2000:]}{done.stdout[-2000:]}")
    errors = [m.group(0) for m in map(ERROR.match, done.stdout.splitlines()) if m]
    assert not errors, "mypy errors:\n" + "\n".join(errors)
    assert done.returncode == 0, done.stdout[-2000:]
