"""The two-rank test helper: a rank that aborts after its work (as gloo's threads can at
process exit, "terminate called without an active exception") does not fail the test; one
that aborts before its work returned does."""

from __future__ import annotations

import atexit
import os

import pytest
import torch.multiprocessing as mp

from ranks import WORLD, spawn


def _abort_at_exit(rank, results):
    results[rank] = rank * 10
    if rank == 1:
        atexit.register(os.abort)  # after the worker returned: the teardown crash


def _abort_inside(rank, results):
    if rank == 1:
        os.abort()
    results[rank] = rank * 10


def test_an_abort_after_the_work_is_not_a_failure():
    results = mp.Manager().dict()
    with pytest.warns(UserWarning, match="aborted at exit after its work"):
        spawn(_abort_at_exit, (results,))
    assert dict(results) == {r: r * 10 for r in range(WORLD)}


def test_an_abort_before_the_work_returned_fails():
    results = mp.Manager().dict()
    with pytest.raises(RuntimeError, match="rank 1: signal SIGABRT"):
        spawn(_abort_inside, (results,))
