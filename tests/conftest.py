"""Devices for device-parametrized tests.

Tests that take the ``device`` fixture run once per device name in ``ALL_DEVICES``; a
device that is absent is skipped with a reason (so the report shows what did not run):

    def test_something(device):
        x = to_device(device, X_CPU)  # data made on the CPU with a fixed seed, then moved
        ...
        assert rel(result.cpu(), reference) < tol

``to_device`` also skips the test on MPS when the data is float64, which MPS lacks.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

# Under pytest-xdist (`make test` runs one worker per CPU), each worker takes its share of
# the CPUs for torch's intra-op threads instead of all of them (oversubscription).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

ALL_DEVICES = ("cpu", "cuda", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


_AVAILABLE = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": _mps_available()}
_MISSING = {
    "cuda": "no CUDA device (torch.cuda.is_available() is False)",
    "mps": "no MPS device (torch.backends.mps.is_available() is False)",
}

#: The devices present on this machine: "cpu", then "cuda" and "mps" when available.
DEVICES = [name for name in ALL_DEVICES if _AVAILABLE[name]]

#: ``pytest.param`` per device name, the absent ones marked skip (for ``parametrize``).
DEVICE_PARAMS = [
    pytest.param(
        name,
        id=name,
        marks=() if _AVAILABLE[name] else pytest.mark.skip(reason=_MISSING[name]),
    )
    for name in ALL_DEVICES
]


@pytest.fixture(params=DEVICE_PARAMS)
def device(request: pytest.FixtureRequest) -> torch.device:
    """``torch.device`` of each device in turn; skipped (with a reason) where absent."""
    return torch.device(request.param)


@pytest.fixture
def products(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``products[0]``: the Hessian-vector products every operator takes while the test
    runs (``matvec`` one each, ``matmat`` one per row)."""
    from hypergradient.operators.base import LinearOperator

    count = [0]
    matvec, matmat = LinearOperator.matvec, LinearOperator.matmat

    def counted(self: Any, v: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        return matvec(self, v)

    def counted_mat(self: Any, V: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        count[0] += V.shape[0]
        return matmat(self, V, chunk_size)

    monkeypatch.setattr(LinearOperator, "matvec", counted)
    monkeypatch.setattr(LinearOperator, "matmat", counted_mat)
    return count


def to_device(device: torch.device | str, tree: Any) -> Any:
    """Move a tree of tensors (tensor, tuple, list, dict) or a module to ``device``.

    Skips the test on MPS if any of them is float64 (MPS has no float64).
    """
    device = torch.device(device)
    if isinstance(tree, torch.nn.Module):
        tensors = [*tree.parameters(), *tree.buffers()]
        if device.type == "mps" and any(t.dtype == torch.float64 for t in tensors):
            pytest.skip("float64 test model: MPS has no float64")
        return tree.to(device)
    if isinstance(tree, torch.Tensor):
        if device.type == "mps" and tree.dtype == torch.float64:
            pytest.skip("float64 test data: MPS has no float64")
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: to_device(device, v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(to_device(device, v) for v in tree)
    return tree


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread for the whole suite: its problems are tiny, and on a shared
    2-core machine a second thread mostly waits (measured: the model zoo ran many times
    faster single-threaded under load). Subprocesses (examples, benchmarks, gloo ranks) set
    their own."""
    torch.set_num_threads(1)
