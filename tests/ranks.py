"""Two gloo ranks on this machine, for the data-parallel tests: a free port, and a rank's
process-group initialization (one CPU thread, a short timeout: a rank left waiting fails the
test instead of hanging it)."""

from __future__ import annotations

import datetime
import os
import socket
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


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


def spawn(worker: Callable[..., None], args: tuple) -> None:
    """``mp.spawn(worker, args, nprocs=WORLD, join=True)``, where a rank killed by a signal
    after its ``worker`` returned is not a failure: gloo's threads can abort the process at
    exit ("terminate called without an active exception", SIGABRT) once the worker's results
    are in the parent's dictionary, which the test then checks as usual. A rank killed
    before its worker returned still fails the test."""
    done = mp.Manager().dict()
    try:
        mp.spawn(_marked, args=(worker, done, args), nprocs=WORLD, join=True)
    except mp.ProcessExitedException as exc:
        if exc.signal_name is None or set(done.keys()) != set(range(WORLD)):
            raise
        warnings.warn(f"a rank aborted at exit after its work ({exc})", stacklevel=2)


def _marked(rank: int, worker: Callable[..., None], done: Any, args: tuple) -> None:
    worker(rank, *args)
    done[rank] = True
