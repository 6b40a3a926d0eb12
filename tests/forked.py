"""Run Python scripts as ``python script.py args`` would, each in a fork of one server
process that has imported the heavy modules (torch, hypergradient, matplotlib, ...) once.

A script's test spent most of its time in the fresh interpreter's imports (an example's
``--quick`` run: about half of its CPU time on this 2-core machine). Every script still runs
in a process of its own that has imported those modules and run nothing else (no test's
state, no OpenMP thread started: the server is single-threaded, checked at start), with the
test's environment, working directory, ``sys.argv`` and ``sys.path[0]`` (the script's
folder), ``__name__ == "__main__"``, the interpreter's exit handlers at the end, and its own
stdout and stderr; what the server's imports printed is put at the start of each script's
output, where a fresh interpreter would have printed it.

    with ScriptServer(["torch", "hypergradient"], env) as server:
        done = server.run([script, "--quick"], env=env, timeout=120)  # CompletedProcess

Run as a program, this module is the server: it imports the modules named in its arguments,
then reads one JSON request a line from stdin and answers each with the script's exit code
(negative: killed by that signal) once the script has ended.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any


class ScriptServer:
    """A server process that imported ``preload`` in ``env`` (started at once; the first
    :meth:`run` waits for its imports)."""

    def __init__(self, preload: list[str], env: dict[str, str]) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="forked-")
        self._log = Path(self._tmp.name) / "server.log"
        with open(self._log, "w") as log:
            self._proc = subprocess.Popen(
                [sys.executable, __file__, *preload],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                text=True,
            )
        self._count = 0

    def run(
        self, argv: list[str], env: dict[str, str], timeout: float, cwd: str | None = None
    ) -> subprocess.CompletedProcess:
        """``subprocess.run([sys.executable, *argv], env=env, cwd=cwd, timeout=timeout,
        capture_output=True, text=True)``, the script forked from the server."""
        self._count += 1
        out = Path(self._tmp.name) / f"{self._count}.out"
        err = Path(self._tmp.name) / f"{self._count}.err"
        request = {"argv": [str(a) for a in argv], "env": env, "cwd": cwd or os.getcwd()}
        request.update(out=str(out), err=str(err), timeout=timeout)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        try:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            pass
        reply = self._proc.stdout.readline()
        if not reply:
            raise RuntimeError("the script server died: " + self._log.read_text()[-4000:])
        code = json.loads(reply)["returncode"]
        stdout = out.read_text(errors="replace")
        stderr = err.read_text(errors="replace")
        if code is None:
            raise subprocess.TimeoutExpired(argv, timeout, stdout, stderr)
        return subprocess.CompletedProcess(argv, code, stdout, stderr)

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._tmp.cleanup()

    def __enter__(self) -> ScriptServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------------------ the server


def _threads() -> int:
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1


def _preload(names: list[str]) -> tuple[bytes, bytes]:
    """Import ``names`` with fds 1 and 2 going to files; returns what they printed."""
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            for name in names:
                importlib.import_module(name)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
        out.seek(0)
        err.seek(0)
        return out.read(), err.read()


def _exit_code(code: object) -> int:
    """What the interpreter exits with on ``SystemExit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _child(request: dict, printed: tuple[bytes, bytes]) -> None:
    """Become ``python argv...``: never returns."""
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path, early in ((1, request["out"], printed[0]), (2, request["err"], printed[1])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.write(target, early)
            os.dup2(target, fd)
            os.close(target)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        script = os.path.abspath(request["argv"][0])
        sys.argv = list(request["argv"])
        sys.path[0] = os.path.dirname(script)
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = _exit_code(stop.code)
        except BaseException as error:  # as the interpreter reports it: from the script's frame
            tb = error.__traceback__
            while tb is not None and tb.tb_frame.f_code.co_filename != script:
                tb = tb.tb_next
            error.__traceback__ = tb or error.__traceback__
            sys.excepthook(type(error), error, error.__traceback__)
            code = 1
        threading._shutdown()  # as the interpreter does at exit: join non-daemon threads
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(code)


def _wait(pid: int, timeout: float) -> int | None:
    """The child's exit code (negative: its signal), or None after ``timeout`` (killed)."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.05)


def serve(preload: list[str]) -> None:
    printed = _preload(preload)
    if _threads() != 1:  # forking a process with other threads could copy a held lock
        raise SystemExit(f"the server has {_threads()} threads after importing {preload}")
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0)  # a timeout kills the script's own children too
            _child(request, printed)
        try:
            os.setpgid(pid, pid)  # (either call may come first)
        except OSError:
            pass
        code = _wait(pid, float(request["timeout"]))
        sys.stdout.write(json.dumps({"returncode": code}) + "\n")
        sys.stdout.flush()
    os._exit(0)  # every script has been waited for: skip the interpreter's slow teardown


if __name__ == "__main__":
    serve(sys.argv[1:])
