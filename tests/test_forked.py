"""tests/forked.py runs a script as ``python script.py`` would: the same exit code (an
exception, ``sys.exit(3)``, ``sys.exit("message")``, a signal), the same stdout and stderr
(tracebacks, a DeprecationWarning raised from the script's own lines), with the caller's
environment, working directory and arguments, ``__name__ == "__main__"``, the script's folder
first on ``sys.path``, the exit handlers run, and none of a previous script's state; a
script over its time is killed and raises ``TimeoutExpired``."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from forked import ScriptServer

SCRIPT = """
import atexit, os, sys, warnings
import json
print("argv", sys.argv[1:], "path0", os.path.basename(sys.path[0]), "name", __name__)
print("cwd", os.path.basename(os.getcwd()), "env", os.environ.get("HG_FORKED_PROBE"))
print("state", getattr(json, "_forked_probe", None))
json._forked_probe = "left by an earlier script"
atexit.register(lambda: print("exit handler ran"))
def old():
    warnings.warn("an old name", DeprecationWarning, stacklevel=2)
old()
mode = sys.argv[1]
if mode == "raise":
    raise ValueError("boom")
if mode == "exit3":
    sys.exit(3)
if mode == "message":
    sys.exit("stopped with a message")
if mode == "abort":
    os.abort()
if mode == "sleep":
    import time
    time.sleep(60)
"""


@pytest.fixture(scope="module")
def server():
    with ScriptServer(["json"], dict(os.environ)) as running:
        yield running


@pytest.mark.parametrize("mode", ["ok", "raise", "exit3", "message", "abort"])
def test_a_script_runs_as_python_would_run_it(server, tmp_path, monkeypatch, mode):
    folder = tmp_path / "scripts"
    folder.mkdir()
    script = folder / "probe.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "HG_FORKED_PROBE": "the caller's"}
    work = tmp_path / "work"
    work.mkdir()
    want = subprocess.run(
        [sys.executable, str(script), mode],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=60,
    )
    for _ in range(2):  # the second script sees nothing the first one left
        got = server.run([str(script), mode], env=env, timeout=60, cwd=str(work))
        assert got.returncode == want.returncode
        assert got.stdout == want.stdout
        assert got.stderr == want.stderr
    assert "argv ['" + mode + "'] path0 scripts name __main__" in got.stdout
    assert "cwd work env the caller's\nstate None\n" in got.stdout
    assert "DeprecationWarning: an old name" in got.stderr
    assert ("exit handler ran" in got.stdout) == (mode != "abort")
    assert got.returncode == {"ok": 0, "raise": 1, "exit3": 3, "message": 1, "abort": -6}[mode]


def test_a_script_over_its_time_is_killed(server, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        server.run([str(script), "sleep"], env=dict(os.environ), timeout=1)
    assert time.monotonic() - started < 30
    assert server.run([str(script), "ok"], env=dict(os.environ), timeout=60).returncode == 0
