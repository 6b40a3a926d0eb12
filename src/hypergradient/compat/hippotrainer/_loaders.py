"""The batches of a HippoTrainer loader, drawn one at a time by the hyper-steps."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["Cycle", "LoaderCycles"]


class Cycle:
    """Batches of a loader, restarting it when exhausted."""

    def __init__(self, loader: Iterable[Any], name: str):
        self.loader, self.name = loader, name
        self._it: Iterator[Any] | None = None
        self.served = False  # whether a batch was ever drawn

    def next(self) -> Any:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
                self.served = True
                return batch
            except StopIteration:
                self._it = None
        if self.served:
            raise ValueError(
                f"`{self.name}` yields no batches on its second pass: it is a one-pass "
                "iterator (a generator?); pass a re-iterable such as a list or a DataLoader."
            )
        raise ValueError(f"`{self.name}` yields no batches.")


class LoaderCycles:
    """``_train`` / ``_val``: cycles over the *current* ``train_loader`` / ``val_loader``.

    HippoTrainer reads ``self.train_loader`` and ``self.val_loader`` at every hyper-step
    (``evaluate()``), so a loader assigned later (a new validation split) is used from the
    next hyper-step on; a cycle is restarted when its attribute holds another object.
    """

    train_loader: Iterable[Any]
    val_loader: Iterable[Any]
    _cycles: dict[str, Cycle]

    def _cycle(self, name: str) -> Cycle:
        loader = getattr(self, name)
        cycles = self.__dict__.setdefault("_cycles", {})
        if name not in cycles or cycles[name].loader is not loader:
            cycles[name] = Cycle(loader, name)
        return cycles[name]

    @property
    def _train(self) -> Cycle:
        return self._cycle("train_loader")

    @_train.setter
    def _train(self, cycle: Cycle) -> None:  # e.g. restart the cycle of a list changed in place
        self.__dict__.setdefault("_cycles", {})["train_loader"] = cycle

    @property
    def _val(self) -> Cycle:
        return self._cycle("val_loader")

    @_val.setter
    def _val(self, cycle: Cycle) -> None:
        self.__dict__.setdefault("_cycles", {})["val_loader"] = cycle
