"""Buffers that the user's training forward passes update, other than normalization layers'
running statistics.

A hyper-step evaluates the training loss with copies of the buffers as they are at the
hyper-step (:meth:`~.model.ModelView.call`). That is exact for BatchNorm in train mode, whose
output does not read its running statistics, but not for a buffer that a forward pass both
updates and reads, such as ``spectral_norm``'s power-iteration vectors or a running input
normalizer: ``T1T2``'s look-ahead and the trajectory methods' replays then evaluate past
steps with values those steps did not see (``docs/guide/modes.md``: 2 % and 28 % off central
differences). :class:`BufferWatch` notes, at each training step, which of those buffers
changed since the previous step, and warns once when such a method takes a hyper-step.

A hyperparameter held as a buffer and read by the forward pass, not through the losses'
``hparams`` argument, gets a zero hypergradient: :class:`Advice` makes the methods' warning
say so in the hyper-optimizer's terms.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from .._vocab import HypergradientWarning
from ..methods import T1T2
from ..methods._checks import UNUSED_ADVICE

if TYPE_CHECKING:  # pragma: no cover
    from .driver import HyperOptimizer

__all__ = ["Advice", "BufferWatch"]

#: The running statistics of these layers are updated in train mode without being read.
_NORM = getattr(nn.modules.batchnorm, "_NormBase", nn.modules.batchnorm._BatchNorm)
_STATS = ("running_mean", "running_var", "num_batches_tracked")


class BufferWatch:
    """Which buffers of ``module`` (running statistics of normalization layers aside) the
    training steps change. Cost per step: one dictionary read and a version check per
    watched buffer (none for a model without such buffers)."""

    def __init__(self, module: nn.Module | None):
        self.slots: list[tuple[str, nn.Module, str]] = []
        for prefix, sub in () if module is None else module.named_modules():
            for name in sub._buffers:
                if not (isinstance(sub, _NORM) and name in _STATS):
                    self.slots.append((f"{prefix}.{name}" if prefix else name, sub, name))
        self._marks: list[tuple[int, int]] | None = None
        self.moved: list[str] = []  # the buffers seen changing, in the module's order
        self.warned = False

    def note(self) -> None:
        """A training step ended: note the watched buffers changed since the last one."""
        if not self.slots:
            return
        marks = [_mark(sub._buffers.get(name)) for _, sub, name in self.slots]
        if self._marks is not None and marks != self._marks:
            changed = {k for (k, _, _), a, b in zip(self.slots, self._marks, marks) if a != b}
            self.moved = [k for k, _, _ in self.slots if k in changed or k in self.moved]
        self._marks = marks

    def restart(self) -> None:
        """Forget the last marks (the buffers were written other than by a step)."""
        self._marks = None

    def warn(self, method: Any, hparams: Iterable[Tensor] = ()) -> None:
        """Warn once if ``method`` re-evaluates past steps and a watched buffer changed
        (other than one holding a hyperparameter in ``hparams``: the outer optimizer moves
        those, at hyper-steps only, so every step of a window saw the same value)."""
        if self.warned or not self.moved:
            return
        if not (getattr(method, "needs_trajectory", False) or isinstance(method, T1T2)):
            return
        held = {h.untyped_storage().data_ptr() for h in hparams}
        slots = {k: sub._buffers.get(name) for k, sub, name in self.slots}
        moved = [k for k in self.moved if _storage(slots.get(k)) not in held]
        if not moved:
            return
        self.warned = True
        shown = ", ".join(repr(k) for k in moved[:5]) + (", ..." * (len(moved) > 5))
        warnings.warn(
            f"The training forward passes update the buffer(s) {shown} (not running "
            f"statistics of a normalization layer). {type(method).__name__} re-evaluates past "
            "training steps with the buffers as they are at the hyper-step, not as each step "
            "saw them: if the forward pass reads these buffers (spectral_norm's power-"
            "iteration vectors, a running input normalizer), the hypergradient is approximate "
            "(docs/guide/modes.md measured 2% and 28% off). Put such layers in eval mode for "
            "training or fold the buffer into the parameters; if the forward pass never reads "
            "them (a counter), this warning can be ignored.",
            HypergradientWarning,
            stacklevel=5,
        )


def _mark(buffer: Tensor | None) -> tuple[int, int]:
    """The buffer's identity and in-place version (both change when a step updates it)."""
    return (0, 0) if buffer is None else (id(buffer), buffer._version)


def _storage(buffer: Tensor | None) -> int | None:
    return None if buffer is None else buffer.untyped_storage().data_ptr()


class Advice:
    """While a method runs: its warning that a hyperparameter has a zero hypergradient
    advises in the hyper-optimizer's terms (``train_loss``/``val_loss`` and their
    ``hparams`` argument, ``optimizer_hparams``; ``HyperOptimizer`` has no
    ``hparams_by_reference``), and names the model's buffer that holds the hyperparameter.
    ``with Advice(hopt):`` (a class, not a generator: entered at every hyper-step)."""

    __slots__ = ("hopt", "token")

    def __init__(self, hopt: HyperOptimizer):
        self.hopt = hopt

    def __enter__(self) -> None:
        self.token = UNUSED_ADVICE.set(self)

    def __exit__(self, *exc: object) -> None:
        UNUSED_ADVICE.reset(self.token)

    def __call__(self, path: str, through: str) -> str:
        hopt = self.hopt
        return _advice(hopt.view.module, hopt.hyperparameters.raw, path, through)


def _advice(module: nn.Module | None, raw: Mapping[str, Tensor], path: str, through: str) -> str:
    name = next((k for k in raw if path == f"hparams[{k!r}]"), None)
    read = f"h[{name!r}]" if name is not None else "h[name]"
    held = None if name is None or module is None else _buffer_of(module, raw[name])
    if held is not None:
        return (
            f"It is the model's buffer {held!r}, which the forward pass reads itself; a "
            "hyper-step differentiates what train_loss and val_loss read through their "
            f"`hparams` argument, not the model's buffers: read {read} in the losses and pass "
            "it to the model (an argument of forward()) instead of reading the buffer"
        )
    links = ", or that optimizer_hparams links it to a setting" if through == "run" else ""
    return (
        f"Check that train_loss or val_loss reads it through their `hparams` argument "
        f"({read}){links}; a tensor read elsewhere (a module's buffer or attribute read in "
        f"forward()) is not differentiated: pass {read} to it from the losses"
    )


def _buffer_of(module: nn.Module, leaf: Tensor) -> str | None:
    """The name of a buffer of ``module`` sharing ``leaf``'s memory, if any."""
    where = _storage(leaf)
    return next((k for k, b in module.named_buffers() if _storage(b) == where), None)
