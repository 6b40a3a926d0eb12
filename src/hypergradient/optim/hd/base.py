"""Shared machinery of SGD-HD and Adam-HD: validation, gradient gathering, the lr update."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from ..._tree import wide_dtype
from ..._vocab import ArgumentTypeError, HypergradientWarning, as_float

__all__ = ["DIRECTION", "HypergradientOptimizer", "betas_pair", "flat_dot", "nonneg", "sum_dots"]

DIRECTION = "prev_direction"


def nonneg(group: dict[str, Any], name: str) -> float:
    """``group[name]`` as a finite float >= 0 (numpy scalars accepted, ``bool`` refused)."""
    return as_float(group[name], name, min=0.0)


def betas_pair(value: Any) -> tuple[float, float]:
    """``(beta1, beta2)``, each a float in [0, 1)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ArgumentTypeError(f"`betas` must be a pair (beta1, beta2), got {value!r:.80}.")
    b1, b2 = (
        as_float(b, f"betas[{i}]", min=0.0, max=1.0, open_max=True) for i, b in enumerate(value)
    )
    return b1, b2


def sum_dots(dots: list[Tensor]) -> float:
    """Sum 0-d tensors (possibly on several devices) into a Python float, one sync per device."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for d in dots:
        by_device.setdefault(d.device, []).append(d.to(wide_dtype(d.device)))
    return sum(float(torch.stack(ds).sum()) for ds in by_device.values())


def flat_dot(a: Tensor, b: Tensor) -> Tensor:
    """``a . b`` over all entries, accumulated in at least float32.

    A half-precision dot product is returned in half precision, whose range (65504 for
    float16) a gradient's dot product with the previous direction exceeds as soon as the
    parameter has some ten thousand entries of order 1: the learning rate would never
    adapt. Such tensors are widened to float32 first (a temporary copy of each).
    """
    wide = torch.promote_types(a.dtype, torch.float32)
    if a.dtype != wide:
        a, b = a.to(wide), b.to(wide)
    return torch.dot(a.reshape(-1), b.reshape(-1))


class HypergradientOptimizer(Optimizer):
    """Shared machinery: validation of every group, gradient gathering and the lr update."""

    _name = "HD"

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Adapt each group's learning rate, then take one step of the optimizer.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss
                (run with gradients enabled).

        Returns:
            The closure's loss, or None without closure.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_grads()
        for group in self.param_groups:
            params, grads = self._gather(group)
            self._adapt_lr(group, params, grads)
            self._update_group(group, params, grads)
        return loss

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> None:
        """The optimizer's own step of ``group`` (its ``lr`` already adapted)."""
        raise NotImplementedError

    def _validate_group(self, group: dict[str, Any]) -> dict[str, Any]:
        """The group's hyperparameters, checked through ``_vocab`` and normalized."""
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group after checking its (merged) hyperparameters.

        Raises ``ArgumentTypeError`` (a wrong type, ``bool`` for a number included) or
        ``ValueError`` (out of range) naming the setting; nothing is added then.
        """
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        checked = self._validate_group(merged)
        param_group = dict(param_group)
        param_group.update({k: v for k, v in checked.items() if k in param_group})
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict`` after checking every saved group's
        settings as the constructor does (``ValueError`` / ``ArgumentTypeError`` naming the
        group and setting; nothing is loaded then): a state of another optimizer, or with a
        NaN or negative ``lr``, would otherwise fail at ``step()`` or train silently wrong."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        for i, group in enumerate(groups if isinstance(groups, list) else []):
            optional = {"maximize": False, "nesterov": False}  # older states lack them
            missing = [k for k in self.defaults if k not in group and k not in optional]
            if missing:
                raise ValueError(
                    f"{self._name}.load_state_dict: param group {i} has no {missing}; the "
                    "state_dict was saved by another optimizer."
                )
            try:  # a finite lr of any sign: hypergradient descent may take it below 0
                as_float(group["lr"], "lr")
                self._validate_group({**optional, **group, "lr": 0.0})
            except ValueError as err:  # ArgumentTypeError included
                raise type(err)(f"{self._name}.load_state_dict: param group {i}: {err}") from err
        super().load_state_dict(state_dict)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)

    def _check_grads(self) -> None:
        """Raise before any state is touched if a gradient is sparse or a parameter complex."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{self._name} does not support sparse gradients; use dense gradients "
                        "(e.g. nn.Embedding(sparse=False)) or torch.optim.SparseAdam"
                    )
                if torch.is_complex(p):
                    raise RuntimeError(
                        f"{self._name} does not support complex parameters; optimize "
                        "torch.view_as_real(param) instead"
                    )

    def _gather(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """Params with a gradient and their effective gradients ``±grad + weight_decay * p``.

        A parameter without gradient does not move at this step, so its stored direction
        (which describes an older step) is dropped: it must not enter the next hypergradient.
        """
        params: list[Tensor] = []
        grads: list[Tensor] = []
        for p in group["params"]:
            if p.grad is None:
                if p in self.state:
                    self.state[p].pop(DIRECTION, None)
            else:
                params.append(p)
        for p in params:
            g: Tensor = p.grad  # type: ignore[assignment]  # not None: filtered above
            grad = -g if group["maximize"] else g
            if group["weight_decay"] != 0:
                grad = grad.add(p, alpha=group["weight_decay"])
            grads.append(grad)
        return params, grads

    def _adapt_lr(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """``alpha <- alpha - beta h`` with ``h = -sum_p g_p . u_p`` (previous directions)."""
        if group["hypergrad_lr"] == 0:
            return
        dots = [
            flat_dot(g, self.state[p][DIRECTION])
            for p, g in zip(params, grads)
            if DIRECTION in self.state[p]
        ]
        if not dots:
            return
        h = -sum_dots(dots)
        lr = group["lr"] - group["hypergrad_lr"] * h
        if not math.isfinite(lr):
            warnings.warn(
                f"{self._name}: the hypergradient of the learning rate is not finite (h = {h}, "
                f"giving lr = {lr}): a NaN or Inf gradient, or an overflowing dot product. The "
                f"learning rate keeps its value {group['lr']!r} for this step; check the loss "
                "and gradients (or lower hypergrad_lr).",
                HypergradientWarning,
                stacklevel=5,  # _adapt_lr, step, no_grad, torch's step hooks, caller
            )
            return
        if lr < 0 <= group["lr"]:  # a negative rate ascends the loss: say so once per crossing
            warnings.warn(
                f"{self._name}: hypergradient descent took the learning rate below zero "
                f"({group['lr']!r} -> {lr!r}, h = {h:.3g}): the optimizer now ascends the "
                "loss. Lower hypergrad_lr (the rate oscillates when it is too large).",
                HypergradientWarning,
                stacklevel=5,  # _adapt_lr, step, no_grad, torch's step hooks, caller
            )
        group["lr"] = lr

    @staticmethod
    def _direction_buffer(state: dict[str, Any], p: Tensor) -> Tensor:
        """The per-parameter buffer holding the last applied direction (allocated once)."""
        buf = state.get(DIRECTION)
        if buf is None:
            buf = state[DIRECTION] = torch.empty_like(p, memory_format=torch.preserve_format)
        return buf
