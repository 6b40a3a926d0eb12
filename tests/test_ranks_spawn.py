"""The two-rank test helper: a rank that aborts after its work (as gloo's threads can at
process exit, "terminate called without an active exception") does not fail the test; one
that aborts before its work returned does. Ranks forked from the fork server run in the
test's environment and see none of the test process's state. A rank that never ends is
killed and fails its test."""

from __future__ import annotations

import atexit
import os
import sys
import time

import pytest

import hypergradient
import ranks
from ranks import WORLD, shared_dict, spawn


def _abort_at_exit(rank, results):
    results[rank] = rank * 10
    if rank == 1:
        atexit.register(os.abort)  # after the worker returned: the teardown crash


def _abort_inside(rank, results):
    if rank == 1:
        os.abort()
    results[rank] = rank * 10


def test_an_abort_after_the_work_is_not_a_failure():
    # a fresh interpreter per rank (the fork server's children leave by os._exit, without
    # running atexit): the helper's `spawn` start method, kept exercised here
    results = shared_dict()
    with pytest.warns(UserWarning, match="aborted at exit after its work"):
        spawn(_abort_at_exit, (results,), start_method="spawn")
    assert dict(results) == {r: r * 10 for r in range(WORLD)}


def test_an_abort_before_the_work_returned_fails():
    results = shared_dict()
    with pytest.raises(RuntimeError, match="rank 1: signal SIGABRT"):
        spawn(_abort_inside, (results,))


def _report(rank, parent, results):
    results[rank] = (
        os.environ.get("HG_RANKS_PROBE"),
        os.getcwd(),
        os.getpid() != parent,
        hasattr(hypergradient, "_ranks_probe"),
        "torch" in sys.modules,
    )


def test_a_forked_rank_has_the_tests_environment_and_none_of_its_state(monkeypatch, tmp_path):
    monkeypatch.setenv("HG_RANKS_PROBE", "set by the test")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hypergradient, "_ranks_probe", True, raising=False)
    results = shared_dict()
    spawn(_report, (os.getpid(), results))
    want = ("set by the test", str(tmp_path), True, False, True)
    assert dict(results) == {r: want for r in range(WORLD)}


def _sleep_forever(rank):
    if rank == 1:
        time.sleep(3600)


def test_a_rank_that_never_ends_is_killed_and_fails_the_test(monkeypatch):
    monkeypatch.setattr(ranks, "JOIN_SECONDS", 3.0)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] still running after 3 s"):
        spawn(_sleep_forever, ())
    assert time.monotonic() - start < 60


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
def test_the_shared_dictionary_is_not_held_by_a_fork_of_the_test_process():
    # a fork of pytest's process could inherit a lock another thread held at that instant
    shared_dict()
    pid = ranks._manager._process.pid
    with open(f"/proc/{pid}/status") as status:
        parent = next(int(line.split()[1]) for line in status if line.startswith("PPid:"))
    assert parent != os.getpid()
