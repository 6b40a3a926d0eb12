"""The inner and outer ``torch.optim`` optimizers: construction checks and checkpoint checks.

``torch.optim.Optimizer.load_state_dict`` checks the number of groups and of parameters,
but not the type of the optimizer that saved the state nor the shapes of its buffers, so a
checkpoint from Adam loads into SGD and one from a model of another width loads and fails
at the next step. :func:`check_state` checks all of that before anything is assigned.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .._vocab import ArgumentTypeError
from .transaction import clone_state

__all__ = ["build_outer", "check_state", "state"]


def build_outer(
    outer: torch.optim.Optimizer | Callable[[list[Tensor]], torch.optim.Optimizer],
    raws: Sequence[Tensor],
) -> torch.optim.Optimizer:
    """The outer optimizer: ``outer`` itself (it must optimize exactly ``raws``) or
    ``outer(raws)`` for a factory."""
    if not isinstance(outer, torch.optim.Optimizer):
        if not callable(outer):
            raise ArgumentTypeError(
                "`outer_optimizer` must be a torch.optim.Optimizer over hopt.raw_hparams() or a "
                f"factory params -> optimizer, got {type(outer).__name__}."
            )
        outer = outer(list(raws))
        if not isinstance(outer, torch.optim.Optimizer):
            raise ArgumentTypeError(
                "The `outer_optimizer` factory must return a torch.optim.Optimizer, got "
                f"{type(outer).__name__}."
            )
    ids = {id(p) for g in outer.param_groups for p in g["params"]}
    if ids != {id(r) for r in raws}:
        raise ValueError(
            "`outer_optimizer` must optimize exactly the raw hyperparameters (the tensors of "
            "hparams, and .raw of each Constraint); pass a factory, e.g. "
            "outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.01)."
        )
    return outer


def state(optimizer: torch.optim.Optimizer, names: Mapping[int, str]) -> dict[str, Any]:
    """``{"type": class name, "state_dict": a copy of optimizer.state_dict(), "params": the
    name of each parameter in its order}`` (``names``: by ``id``). A copy: torch's holds the
    live buffers, which the run's next steps change in place, so a checkpoint kept in
    memory mixed the hyperparameters of its step with later momentum and Adam moments, and
    a hyper-optimizer loaded from it stepped the saver's buffers too."""
    return {
        "type": type(optimizer).__name__,
        "state_dict": clone_state(optimizer.state_dict()),
        "params": order(optimizer, names),
    }


def order(optimizer: torch.optim.Optimizer, names: Mapping[int, str]) -> list[str]:
    """The name of each parameter of ``optimizer``, in its order (torch's state is by
    position); ``#i`` for a tensor ``names`` does not know (a criterion's parameter)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return [names.get(id(p), f"#{i}") for i, p in enumerate(params)]


def _check_groups(optimizer: torch.optim.Optimizer, saved: Any, name: str) -> list[Any]:
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    if not isinstance(groups, list) or not isinstance(saved.get("state"), Mapping):
        raise ValueError(f"The checkpoint's `{name}` state is malformed.")
    sizes = [len(g.get("params", ())) for g in groups]
    mine = [len(g["params"]) for g in optimizer.param_groups]
    if sizes != mine:
        raise ValueError(
            f"The checkpoint's `{name}` has param groups of sizes {sizes}, this one {mine}; it "
            "was saved with another model or hyperparameters."
        )
    for g in groups:
        for key, value in g.items():
            bad = isinstance(value, float) and not math.isfinite(value)
            if bad or (key == "lr" and isinstance(value, (int, float)) and value < 0):
                raise ValueError(f"The checkpoint's `{name}` has the setting {key}={value}.")
    return groups


def _check_order(
    optimizer: torch.optim.Optimizer, saved: Any, name: str, names: Mapping[int, str]
) -> None:
    """Refuse a state saved for the same tensors in another order (None: an older
    checkpoint, which did not record it)."""
    here = order(optimizer, names)
    if saved is not None and list(saved) != here:
        raise ValueError(
            f"The checkpoint's `{name}` holds its state (momentum, Adam's moments) for the "
            f"tensors in the order {list(saved)}, this one's are in the order {here}: loaded "
            "by position, it would go to other tensors. Build the optimizer (and hparams) in "
            "the checkpoint's order."
        )


def check_state(
    optimizer: torch.optim.Optimizer,
    saved: Any,
    name: str,
    names: Mapping[int, str] | None = None,
) -> None:
    """Raise ``ValueError`` if ``saved`` (from :func:`state`) does not fit ``optimizer``.

    Checks the optimizer's type, its groups and parameter counts, and that every buffer
    shaped like a parameter has that parameter's shape. Changes nothing.
    """
    if not isinstance(saved, Mapping) or "type" not in saved or "state_dict" not in saved:
        raise ValueError(f"The checkpoint's `{name}` entry is malformed.")
    if saved["type"] != type(optimizer).__name__:
        raise ValueError(
            f"The checkpoint's `{name}` is a {saved['type']}, this one a "
            f"{type(optimizer).__name__}; resume with the same optimizer."
        )
    sd = saved["state_dict"]
    groups = _check_groups(optimizer, sd, name)
    if names is not None:
        _check_order(optimizer, saved.get("params"), name, names)
    for g, mine in zip(groups, optimizer.param_groups):
        for key, p in zip(g["params"], mine["params"]):
            entry = sd["state"].get(key, {})
            if not isinstance(entry, Mapping):
                raise ValueError(f"The checkpoint's `{name}` state is malformed.")
            for k, v in entry.items():
                if isinstance(v, Tensor) and v.dim() > 0 and v.shape != p.shape:
                    raise ValueError(
                        f"The checkpoint's `{name}` holds {k} of shape {tuple(v.shape)} for a "
                        f"parameter of shape {tuple(p.shape)}; it was saved with another model."
                    )
