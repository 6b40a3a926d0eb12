"""Two gloo ranks on this machine, for the data-parallel tests: a free port, and a rank's
process-group initialization (one CPU thread, a short timeout: a rank left waiting fails the
test instead of hanging it).

The ranks start from a fork server (``start_method="forkserver"``) that has imported torch,
``torch.distributed`` and hypergradient and done nothing else: each rank is a fork of that
clean process (no OpenMP thread started, no test's state), with the test process's
environment, working directory and ``sys.path``, instead of a fresh interpreter re-importing
torch (about 10 s per pair of ranks on a loaded 2-core machine; the server's imports are paid
once per pytest process). ``spawn(..., start_method="spawn")`` still starts fresh
interpreters (tests/test_ranks_spawn.py runs that path).

The ranks report to the test through :func:`shared_dict`, a dictionary held by a manager
process that is also a child of the fork server. ``multiprocessing.Manager()`` would fork
the pytest process itself, whose other threads (pytest-xdist's, torch's) may hold a lock at
that instant that the manager then waits on forever: a rank writing its result blocked the
suite once that way. A rank that does not end within ``JOIN_SECONDS`` is killed and fails
the test, instead of stalling the whole run."""

from __future__ import annotations

import datetime
import os
import signal
import socket
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2

#: How long the test waits for a pair of ranks (gloo's own timeout is 60 s per collective).
JOIN_SECONDS = 300.0

#: What the fork server imports once, before it forks any rank.
PRELOAD = [
    "torch",
    "torch.distributed",
    "torch.multiprocessing",
    "hypergradient",
    "pytest",
    "ranks",
]
mp.set_forkserver_preload(PRELOAD)


_manager: Any = None


def shared_dict() -> Any:
    """A dictionary the ranks can write and the test read, from one manager per pytest
    process started by the fork server (never by forking the test process)."""
    global _manager
    if _manager is None:
        _manager = mp.get_context("forkserver").Manager()
    return _manager.dict()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )


def spawn(worker: Callable[..., None], args: tuple, start_method: str = "forkserver") -> None:
    """``mp.spawn(worker, args, nprocs=WORLD, join=True)``, where a rank killed by a signal
    after its ``worker`` returned is not a failure: gloo's threads can abort the process at
    exit ("terminate called without an active exception", SIGABRT) once the worker's results
    are in the parent's dictionary, which the test then checks as usual. Every rank is
    joined (``mp.spawn`` would kill the others at the first exit, before their work is
    done); a rank that exits otherwise before its worker returned fails the test."""
    done = shared_dict()
    ctx = mp.start_processes(
        _marked,
        args=(worker, done, args, dict(os.environ)),
        nprocs=WORLD,
        join=False,
        start_method=start_method,
    )
    deadline = time.monotonic() + JOIN_SECONDS
    for process in ctx.processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, process in enumerate(ctx.processes) if process.is_alive()]
    for r in hung:
        ctx.processes[r].kill()
        ctx.processes[r].join()
    if hung:
        raise RuntimeError(f"rank(s) {hung} still running after {JOIN_SECONDS:.0f} s: killed")
    codes = [process.exitcode for process in ctx.processes]
    died = [f"rank {r}: {_exit(c)}" for r, c in enumerate(codes) if c and r not in done]
    if died:
        raise RuntimeError("a rank exited before its work was done: " + "; ".join(died))
    if any(codes):
        warnings.warn(f"a rank aborted at exit after its work (exit codes {codes})", stacklevel=2)


def _exit(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def _marked(
    rank: int, worker: Callable[..., None], done: Any, args: tuple, environ: dict[str, str]
) -> None:
    # a forked rank has the fork server's environment: give it the test's, as spawn would
    os.environ.clear()
    os.environ.update(environ)
    worker(rank, *args)
    done[rank] = True
