"""``TrajectoryWindow``: the inner steps since the last hyper-step, recorded for a replay.

Trajectory methods (``Unrolled``, ``ForwardMode``, ``DrMAD``) differentiate through the
last ``inner_steps`` training steps. The window holds what a replay needs to reproduce
them exactly: the parameters and the inner optimizer's buffers and step count at the
window's start, a *copy* of every step's batch, and torch's random-number state before
every step (so dropout masks are those of the real run). :meth:`TrajectoryWindow.to_trajectory`
turns it into the :class:`~hypergradient.methods.base.Trajectory` methods consume.

A checkpoint taken mid-window holds that window's batches (as tensors and plain data,
see :mod:`.batches`), so that the first hyper-step after a resume replays the same steps.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..methods import rng_state
from ..methods.base import Trajectory
from ..optim.functional import FunctionalOptimizer, from_torch
from .batches import pack, unpack
from .model import ModelView, mode_switch, parse_modes

__all__ = [
    "TrajectoryWindow",
    "capture_rng",
    "numeric_settings",
    "optimizer_settings",
    "parse_rng_state",
    "restore_rng",
]

RngState = tuple[Tensor, "Tensor | None"]


def capture_rng(device: torch.device) -> RngState:
    """torch's random-number state: the CPU generator's and that of ``device``'s accelerator
    (the format of ``Trajectory.rng_states``, :func:`hypergradient.methods.rng_state`)."""
    return rng_state(device)


def restore_rng(state: RngState, device: torch.device) -> None:
    """Set torch's random-number state to one from :func:`capture_rng`."""
    torch.set_rng_state(state[0])
    if state[1] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)
    elif state[1] is not None and device.type == "mps":
        torch.mps.set_rng_state(state[1])


def _tensors(value: Any, name: str) -> list[Tensor]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, Tensor) for t in value):
        raise ValueError(f"The checkpoint's window `{name}` is not a list of tensors.")
    return list(value)


def parse_rng_state(value: Any) -> RngState:
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    ok = ok and isinstance(value[0], Tensor) and value[0].dtype == torch.uint8
    if ok and (value[1] is None or isinstance(value[1], Tensor)):
        with contextlib.suppress(RuntimeError):  # the size torch.set_rng_state would take
            torch.Generator().set_state(value[0].cpu())
            return value[0].cpu(), None if value[1] is None else value[1].cpu()
    raise ValueError("The checkpoint holds a malformed random-number state.")


@dataclass
class TrajectoryWindow:
    """The recorded inner steps since the last hyper-step.

    Attributes:
        params0: the trained parameters at the window's start (copies).
        optimizer: the inner optimizer's differentiable twin (its settings at the start).
        state0: its buffers at the start (None: fresh).
        step0: its step count at the start (Adam's bias correction).
        batches: a copy of each step's training batch.
        rng_states: torch's random-number state before each step.
        settings0: the inner optimizer's settings at the start (:func:`optimizer_settings`;
            saved in checkpoints; None: read at the next check).
        changed: the first setting that differed from ``settings0`` before a step of the
            window (the replay, which steps with ``settings0``, would not be this run).
        grads: per trained parameter, whether it held an all-zero ``.grad`` after a step of
            the window, as read from a checkpoint (:meth:`held` adds this run's steps):
            ``zero_grad(set_to_none=False)`` keeps zeros for a parameter the step's loss did
            not use, and torch's momentum and Adam still move it, so the replay must step it
            too (None: none seen).
        modes0: each submodule's train/eval flag at the start (None: read at the next step).
    """

    params0: list[Tensor] = field(repr=False)  # (tensors: a repr of thousands of lines)
    optimizer: FunctionalOptimizer
    state0: list[Tensor] | None = field(repr=False)
    step0: int
    batches: list[Any] = field(default_factory=list, repr=False)
    rng_states: list[RngState] = field(default_factory=list, repr=False)
    settings0: list[dict[str, Any]] | None = None
    changed: str | None = None
    grads: list[bool] | None = None
    modes0: dict[str, bool] | None = None
    _refs: list[Any] | None = field(default=None, repr=False)  # the last step's .grad (weak)
    _zero: Tensor | None = field(default=None, repr=False)  # smallest .grad norms so far

    @classmethod
    def start(
        cls, view: ModelView, inner_optimizer: torch.optim.Optimizer, tuned: Sequence[str] = ()
    ) -> TrajectoryWindow:
        """A new, empty window at the model's and the optimizer's current state (``tuned``:
        the optimizer settings linked to hyperparameters, as ``from_torch`` takes them)."""
        fopt, state0, step0 = from_torch(inner_optimizer, view.params, tuned=tuned)
        fopt = numeric_settings(fopt, tuned)
        window = cls([p.detach().clone() for p in view.params], fopt, state0, step0)
        window.settings0 = optimizer_settings(inner_optimizer)
        return window

    def check_settings(
        self,
        inner_optimizer: torch.optim.Optimizer,
        params: Sequence[Tensor] = (),
        modes: Mapping[str, bool] | None = None,
    ) -> None:
        """Before a step of the window: note (``changed``) the first setting of the inner
        optimizer that differs from the window's start (a learning-rate scheduler stepped
        inside the window, a warm-up written into ``param_groups``), or the first of the
        trained ``params`` whose dtype or device is no longer that of the window's start
        (``model.to(...)``: the replay would start from the old copies), or the first
        submodule of ``modes`` (:meth:`ModelView.modes`) whose train/eval flag is not the one
        at the window's start: the replay runs every step in the hyper-step's mode."""
        if self.changed is not None:
            return
        if self.modes0 is None and modes is not None:  # a window from an older checkpoint
            self.modes0 = dict(modes)
        self.changed = mode_switch(self.modes0 or {}, modes or {}, len(self) + 1)
        if self.changed is not None:
            return
        for i, (p0, p) in enumerate(zip(self.params0, params)):
            if p.dtype != p0.dtype or p.device != p0.device:
                self.changed = (
                    f"the trained parameter {i} moved from {p0.dtype} on {p0.device} to "
                    f"{p.dtype} on {p.device} (model.to(...)) before step {len(self) + 1} "
                    "of the window"
                )
                return
        now = optimizer_settings(inner_optimizer)
        if self.settings0 is None or len(now) != len(self.settings0):
            self.settings0 = now
            return
        for i, (old, new) in enumerate(zip(self.settings0, now)):
            for key in sorted(set(old) | set(new)):
                if old.get(key) != new.get(key):
                    self.changed = (
                        f"the inner optimizer's {key!r} (param group {i}) changed from "
                        f"{old.get(key)!r} to {new.get(key)!r} at step {len(self) + 1} of "
                        "the window"
                    )
                    return

    def record(self, batch_copy: Any, rng_state: RngState, params: Sequence[Tensor] = ()) -> None:
        """Append one step (``batch_copy`` must already be a copy: see ``copy_batch``;
        ``params``: the trained parameters after the step, whose ``.grad`` it notes)."""
        self._note_grads(params)
        self.batches.append(batch_copy)
        self.rng_states.append(rng_state)

    def _note_grads(self, params: Sequence[Tensor]) -> None:
        """Keep the smallest magnitude of each parameter's ``.grad`` over the steps (no
        synchronization; read by :meth:`held`). Only where a gradient tensor persists from the
        step before (``set_to_none=False``): with ``set_to_none=True``, the default, an
        unused parameter's ``.grad`` is None and torch skips it, as the replay does."""
        grads = [p.grad for p in params]
        last, self._refs = self._refs, [None if g is None else weakref.ref(g) for g in grads]
        if all(g is None for g in grads):
            return
        if last is not None and not any(r is not None and r() is g for r, g in zip(last, grads)):
            return
        device = params[0].device
        norms = torch.stack(
            [
                torch.tensor(math.inf, device=device)
                if g is None or not g.numel()
                else _largest(g).to(device, torch.float32)
                for g in grads
            ]
        )
        self._zero = norms if self._zero is None else torch.minimum(self._zero, norms)

    def __getstate__(self) -> dict[str, Any]:
        """For ``pickle`` (``torch.save`` of a whole hyper-optimizer) and ``copy.deepcopy``:
        the last step's gradients, held weakly (weak references do not pickle), are left
        out. The copy's next gradients are new tensors (a copied model's parameters have
        none), which :meth:`_note_grads` treats as after ``zero_grad()``."""
        state = dict(self.__dict__)
        refs = state["_refs"]
        state["_refs"] = None if refs is None else [None] * len(refs)
        return state

    def held(self) -> list[bool] | None:
        """Per trained parameter, whether it held an all-zero ``.grad`` after a step (of
        this window, or of the checkpoint it was loaded from): one synchronization."""
        seen = None if self._zero is None else (self._zero == 0).tolist()
        if self.grads is None or seen is None:
            return seen if seen is not None else self.grads
        return [a or b for a, b in zip(self.grads, seen)]

    def __len__(self) -> int:
        return len(self.batches)

    def to_trajectory(
        self,
        view: ModelView,
        step_loss: Callable[[Any, Any, Any], Tensor],
        settings: Mapping[str, Callable[[Any], Tensor]],
        final_params: Any,
        rounding: float = 0.0,
    ) -> Trajectory:
        """The :class:`~hypergradient.methods.base.Trajectory` of the window's steps."""
        return Trajectory(
            step_loss=step_loss,
            params0=view.tree(self.params0),
            optimizer=self.optimizer,
            batches=list(self.batches),
            state0=None if self.state0 is None else tuple(self.state0),
            step0=self.step0,
            settings=dict(settings),
            rng_states=list(self.rng_states),
            final_params=final_params,
            rounding=rounding,
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain data only (``torch.load(weights_only=True)`` reads it)."""
        tensors: list[Tensor] = []
        structure = [pack(b, tensors) for b in self.batches]
        return {
            "params0": [p.clone() for p in self.params0],
            "state0": None if self.state0 is None else [s.clone() for s in self.state0],
            "step0": self.step0,
            "batches": {"tensors": [t.clone() for t in tensors], "structure": structure},
            "rng_states": [
                (s[0].clone(), None if s[1] is None else s[1].clone()) for s in self.rng_states
            ],
            "changed": self.changed,
            "settings0": self.settings0,  # a scheduler stepped before the save is a change
            "offsets": self.optimizer.offsets,  # per-parameter step counts at the start
            "grads": self.held(),
            "modes0": self.modes0,
        }

    @classmethod
    def from_state_dict(
        cls,
        state: Any,
        view: ModelView,
        inner_optimizer: torch.optim.Optimizer,
        steps: int,
        tuned: Sequence[str] = (),
    ) -> TrajectoryWindow:
        """Rebuild a window from :meth:`state_dict`, on the parameters' devices.

        ``steps`` is the number of steps the window must hold (the inner steps since the
        last hyper-step). Validates everything and changes nothing outside the new window.

        Raises:
            ValueError: a malformed window, or one saved from another model or optimizer.
        """
        if not isinstance(state, Mapping):
            raise ValueError("The checkpoint's `window` is malformed.")
        fopt = numeric_settings(from_torch(inner_optimizer, view.params, tuned=tuned)[0], tuned)
        params0 = _tensors(state.get("params0"), "params0")
        _same_shapes(params0, view.params, view.names, "its start parameters")
        devices = [p.device for p in view.params]
        params0 = [p.to(d) for p, d in zip(params0, devices)]
        state0 = _optimizer_state(state.get("state0"), view)
        step0 = state.get("step0")
        if isinstance(step0, bool) or not isinstance(step0, int) or step0 < 0:
            raise ValueError(f"The checkpoint's window step count is {step0!r}.")
        batches = _unpack_batches(state.get("batches"))
        rngs = [parse_rng_state(r) for r in state.get("rng_states") or []]
        if len(batches) != steps or len(rngs) != steps:
            raise ValueError(
                f"The checkpoint's window holds {len(batches)} batches and {len(rngs)} "
                f"random-number states; {steps} were expected (the steps since the last "
                "hyper-step): it was saved with another inner_steps."
            )
        changed = state.get("changed")
        if changed is not None and not isinstance(changed, str):
            raise ValueError(f"The checkpoint's window `changed` is {changed!r}.")
        settings0 = _settings(state.get("settings0"))
        fopt.offsets = _offsets(state.get("offsets"), len(params0))  # the start's counts
        grads = _held(state.get("grads"), len(params0))
        modes0 = parse_modes(state.get("modes0"))
        return cls(params0, fopt, state0, step0, batches, rngs, settings0, changed, grads, modes0)


def numeric_settings(fopt: FunctionalOptimizer, tuned: Sequence[str]) -> FunctionalOptimizer:
    """``fopt`` with its tensor settings that no hyperparameter supplies (an inner optimizer
    built with ``lr=torch.tensor(...)``) read as numbers: constants of the window (a change
    inside it is noted by :meth:`TrajectoryWindow.check_settings`), not leaves the replay
    warned at every hyper-step it could not tune."""
    fopt.settings = {
        k: float(v) if isinstance(v, Tensor) and k not in tuned else v
        for k, v in fopt.settings.items()
    }
    return fopt


def optimizer_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Per param group, the settings a step reads, as plain values (a tensor setting, such
    as ``lr=torch.tensor(...)`` filled in place, as its value: one read per tensor)."""
    return [{k: _plain(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def _plain(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().tolist()
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    return value


def _settings(value: Any) -> list[dict[str, Any]] | None:
    """The window's start settings (None in a checkpoint from before they were saved)."""
    ok = value is None or isinstance(value, list) and all(isinstance(g, dict) for g in value)
    if not ok:
        raise ValueError(f"The checkpoint's window `settings0` is {value!r:.80}.")
    return None if value is None else [dict(g) for g in value]


def _offsets(offsets: Any, n: int) -> list[int] | None:
    """The window's per-parameter step-count offsets (``FunctionalOptimizer.offsets``)."""
    ok = offsets is None or isinstance(offsets, list) and len(offsets) == n
    if not ok or not all(isinstance(o, int) and o <= 0 for o in offsets or ()):
        raise ValueError(f"The checkpoint's window step offsets are {offsets!r}.")
    return offsets


def _held(grads: Any, n: int) -> list[bool] | None:
    """The window's noted gradients (None in a checkpoint from before they were noted)."""
    ok = grads is None or isinstance(grads, list) and len(grads) == n
    if not ok or not all(isinstance(g, bool) for g in grads or ()):
        raise ValueError(f"The checkpoint's window `grads` is {grads!r:.80}.")
    return grads


def _optimizer_state(state0: Any, view: ModelView) -> list[Tensor] | None:
    """The window's optimizer buffers: per parameter, in order (Adam: exp_avg, exp_avg_sq)."""
    if state0 is None:
        return None
    state0 = _tensors(state0, "state0")
    n = len(view.params)
    if not state0 or len(state0) % n:
        raise ValueError(
            f"The checkpoint's window has {len(state0)} optimizer buffers for {n} "
            "parameters; it was saved with another model or inner optimizer."
        )
    like = [view.params[i % n] for i in range(len(state0))]
    names = [view.names[i % n] for i in range(len(state0))]
    _same_shapes(state0, like, names, "the inner optimizer's buffers")
    return [s.to(p.device) for s, p in zip(state0, like)]


def _same_shapes(
    saved: Sequence[Tensor], mine: Sequence[Tensor], names: Sequence[str], what: str
) -> None:
    if len(saved) != len(mine):
        raise ValueError(
            f"The checkpoint's window has {len(saved)} tensors for {what}, {len(mine)} expected;"
            " it was saved with another model or inner optimizer."
        )
    for s, m, n in zip(saved, mine, names):
        if s.shape != m.shape or s.dtype != m.dtype:
            raise ValueError(
                f"The checkpoint's window has {what} for {n} of {tuple(s.shape)} {s.dtype}, "
                f"here {tuple(m.shape)} {m.dtype}; it was saved with another model."
            )


def _unpack_batches(value: Any) -> list[Any]:
    if not isinstance(value, Mapping) or not isinstance(value.get("structure"), list):
        raise ValueError("The checkpoint's window batches are malformed.")
    tensors = _tensors(value.get("tensors"), "batches")
    return [unpack(desc, tensors) for desc in value["structure"]]


def _largest(grad: Tensor) -> Tensor:
    """The largest magnitude in ``grad``; of a sparse one's stored values (0 if none: an
    ``nn.Embedding(sparse=True)``'s, whose replay then refuses it with a clear error)."""
    grad = grad.detach()
    if grad.layout != torch.strided:
        values = grad.coalesce().values()
        return values.abs().amax() if values.numel() else torch.zeros((), device=grad.device)
    return grad.abs().amax()
