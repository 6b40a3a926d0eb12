"""torch's random-number state on a device: capture, restore, replay a block under it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["forked_rng", "replay_rng", "rng_state", "same_state", "set_rng_state"]


_CPU = torch.device("cpu")


def _accelerator(device: torch.device) -> str | None:
    return device.type if device.type in ("cuda", "mps") else None


def rng_state(device: torch.device | str = "cpu") -> tuple[Tensor, Tensor | None]:
    """The random-number state that random ops on ``device`` draw from.

    The CPU generator's state and, for a CUDA or MPS device, that accelerator's. Capture
    it before each real training step and pass the list as ``Trajectory.rng_states``: the
    replay then draws the same dropout masks. Plain tensors (checkpoint-safe).
    """
    if device == _CPU:  # the usual case: no device built, torch.get_rng_state's one call
        return torch.default_generator.get_state(), None
    device = torch.device(device)
    accel = _accelerator(device)
    if accel == "cuda":
        return torch.get_rng_state(), torch.cuda.get_rng_state(device)
    if accel == "mps":
        return torch.get_rng_state(), torch.mps.get_rng_state()
    return torch.get_rng_state(), None


def set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device | str) -> None:
    """Make ``state`` (from :func:`rng_state`) the current random-number state."""
    device = torch.device(device)
    accel = _accelerator(device)
    torch.set_rng_state(state[0])
    if state[1] is not None and accel == "cuda":
        torch.cuda.set_rng_state(state[1], device)
    elif state[1] is not None and accel == "mps":
        torch.mps.set_rng_state(state[1])


@contextlib.contextmanager
def replay_rng(state: tuple[Tensor, Tensor | None], device: torch.device | str) -> Iterator[None]:
    """Run the block under ``state`` (from :func:`rng_state`); the caller's state is restored."""
    device = torch.device(device)
    accel = _accelerator(device)
    with torch.random.fork_rng(devices=[device] if accel == "cuda" else []):
        saved = torch.mps.get_rng_state() if accel == "mps" else None
        set_rng_state(state, device)
        try:
            yield
        finally:
            if saved is not None:
                torch.mps.set_rng_state(saved)


def same_state(a: tuple[Tensor, Tensor | None], b: tuple[Tensor, Tensor | None]) -> bool:
    """Whether two states from :func:`rng_state` are equal (host byte tensors: compared as
    bytes, a few times cheaper than ``torch.equal``)."""
    if a[0].numpy().tobytes() != b[0].numpy().tobytes():
        return False
    return a[1] is None or b[1] is None or a[1].numpy().tobytes() == b[1].numpy().tobytes()


def forked_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.random.fork_rng`` over the CPU generator and ``device``'s (if not the CPU)."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    index = device.index
    if index is None:  # the current device (MPS has one, without ``current_device``)
        current = getattr(getattr(torch, device.type, None), "current_device", None)
        index = current() if current is not None else 0
    return torch.random.fork_rng(devices=[index], device_type=device.type)
