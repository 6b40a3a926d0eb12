"""Two gloo ranks on this machine, for the data-parallel tests: a free port, and a rank's
process-group initialization (one CPU thread, a short timeout: a rank left waiting fails the
test instead of hanging it)."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

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
