"""``mypy src`` is clean under the project's configuration (``[tool.mypy]`` in pyproject.toml:
every function annotated, bodies checked, no implicit Optional, no stale ignores).

TEMPORARY: the modules in ``PENDING`` still have errors, owned by other work in progress;
their errors are tolerated (and listed in the skip-free output below) until they are fixed.
An error anywhere else fails, and so does a ``PENDING`` entry that has become clean (remove
it then), so the list can only shrink.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy")

ROOT = Path(__file__).resolve().parent.parent

#: Modules with known errors, by owner, to be fixed and then removed from this list.
PENDING = {
    "src/hypergradient/__init__.py": "lead: module __getattr__ return type",
    "src/hypergradient/_tree.py": "untyped parameters (lines 144, 197)",
    "src/hypergradient/distributed.py": "an unused type: ignore (line 305)",
    "src/hypergradient/compat/hypergrad/utils.py": "lead: return type (line 21)",
    "src/hypergradient/optim/functional.py": "untyped functions (lines 150, 201)",
    "src/hypergradient/operators/base.py": "operators: unused type: ignore",
    "src/hypergradient/operators/graph.py": "operators: object assigned to bool | str",
    "src/hypergradient/operators/hessian.py": "operators: object assigned to bool | str",
    "src/hypergradient/solvers/sketch.py": "solvers: Optional tensor used unchecked",
    "src/hypergradient/solvers/cg.py": "solvers: untyped function, Tensor as alpha",
    "src/hypergradient/solvers/neumann.py": "solvers: None iterated",
    "src/hypergradient/methods/__init__.py": "methods: module __getattr__ return type",
    "src/hypergradient/methods/forward_mode.py": "methods: untyped functions (49, 52)",
    "src/hypergradient/methods/implicit.py": "methods: untyped shorthands (318-358)",
}

ERROR = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: (?P<message>.*)$")


def test_the_configuration_is_strict_enough_to_mean_something():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    for key in ("disallow_untyped_defs", "disallow_incomplete_defs", "check_untyped_defs"):
        assert config.get(key) is True, key
    assert config.get("files") == ["src"]
    assert (ROOT / "src" / "hypergradient" / "py.typed").exists()


def test_mypy_src_is_clean_outside_the_pending_modules():
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--show-error-codes"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode not in (0, 1):  # 2: mypy itself failed (config, crash)
        pytest.fail(f"mypy did not run: {done.stderr[-2000:]}{done.stdout[-2000:]}")
    errors = [m for m in map(ERROR.match, done.stdout.splitlines()) if m]
    outside = [m.group(0) for m in errors if m.group("path") not in PENDING]
    assert not outside, "mypy errors:\n" + "\n".join(outside)
    dirty = {m.group("path") for m in errors}
    clean = sorted(set(PENDING) - dirty)
    assert not clean, f"No errors left in {clean}: remove them from PENDING in this test."
