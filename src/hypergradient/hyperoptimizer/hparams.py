"""``HyperParameters``: names, constraints, raw leaves, domain checks, optimizer-setting links.

Every hyperparameter is a :class:`~hypergradient.constraints.Constraint` (a plain tensor
becomes :class:`~hypergradient.constraints.Unconstrained`), so the same code path serves
all of them: the outer optimizer updates the unconstrained ``raw`` leaves, the losses see
``transform(raw)``, and after every outer step :meth:`HyperParameters.check_domain` refuses
a value that left its domain (a :class:`Positive` rounded to 0 or inf, an
:class:`Interval` saturated to a bound, a tuned learning rate below 0, NaN).

Optimizer-setting links (``optimizer_hparams={'lr': 'lr'}``) make a scalar hyperparameter
the value of a setting of the inner ``torch.optim`` optimizer: validated against that
optimizer's type (a setting it has, holding a number) and range, and written into its
param groups only after validation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _vocab
from .._vocab import ArgumentTypeError, require_finite
from ..constraints import Constraint, HyperparameterDomainError, Interval, Positive, Unconstrained
from .links import check_links, write_links
from .links import link_conflict as _link_conflict

__all__ = ["HyperParameters", "SETTING_RANGES", "clear_grads", "link_conflict"]

#: ``setting: (low, high, low_open)``: the values a linked optimizer setting may take.
SETTING_RANGES: dict[str, tuple[float, float, bool]] = {
    "lr": (0.0, float("inf"), False),
    "momentum": (0.0, float("inf"), False),
    "weight_decay": (0.0, float("inf"), False),
    "dampening": (0.0, 1.0, False),
    "eps": (0.0, float("inf"), True),
}


def _as_constraint(name: str, h: Any) -> Constraint:
    if isinstance(h, Constraint):
        return h
    if isinstance(h, Tensor):
        return Unconstrained(h)
    raise ArgumentTypeError(
        f"hparams[{name!r}] must be a tensor or a Constraint (hg.Positive, hg.Interval), got "
        f"{type(h).__name__}."
    )


def _constraints(hparams: Mapping[Any, Any]) -> dict[str, Constraint]:
    """``{name: Constraint}``; the names must be strings (keys ``1`` and ``"1"`` became one
    hyperparameter, silently dropping the other, and a loss reading ``hparams[1]`` failed)."""
    for k in hparams:
        if not isinstance(k, str):
            raise ArgumentTypeError(
                f"`hparams` keys must be strings (names the losses read), got {type(k).__name__} "
                f"{k!r}."
            )
    return {k: _as_constraint(k, h) for k, h in hparams.items()}


#: Constraints whose transform of a detached tensor builds no graph (see ``values``).
_BUILTIN = (Unconstrained, Positive, Interval)


def _setting_error(setting: str, value: float) -> str | None:
    low, high, low_open = SETTING_RANGES.get(setting, (-math.inf, math.inf, False))
    if math.isfinite(value) and low <= value <= high and not (low_open and value == low):
        return None
    bound = f"{'>' if low_open else '>='} {low:g}"
    bound += "" if math.isinf(high) else f" and <= {high:g}"
    return f"must be {bound} as the inner optimizer's `{setting}`, got {value:g}"


def _all_inside(constraints: Mapping[str, Constraint], values: Mapping[str, Tensor]) -> bool:
    """Whether every value is in its constraint's domain, read in one host synchronization
    (False also when a constraint has no such test: then ask each one)."""
    probes = [c.in_domain(values[k]) for k, c in constraints.items()]
    if any(p is None for p in probes):
        return False
    if len(probes) == 1:  # the usual single hyperparameter: its own 0-d test
        return bool(probes[0])
    device = next(iter(values.values())).device
    return bool(torch.stack([p.to(device) for p in probes if p is not None]).all())


def clear_grads(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.zero_grad(set_to_none=True)``; torch's own ``zero_grad`` as its loop
    without the profiler range it opens (36 us a call here, 3% of a training step of the
    31-parameter logistic regression), an override of it called."""
    own = type(optimizer).zero_grad is torch.optim.Optimizer.zero_grad
    if not own or "zero_grad" in vars(optimizer):
        optimizer.zero_grad(set_to_none=True)
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def _overlapping(t: Tensor) -> bool:
    """Whether two elements of a strided tensor may share memory (an ``expand``: a stride
    of 0; conservative for exotic ``as_strided`` layouts): its dimensions by increasing
    stride must each step past the span of the smaller ones."""
    if t.layout != torch.strided:
        return False
    span = 0
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1):
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


class HyperParameters:
    """The hyperparameters of a :class:`~hypergradient.HyperOptimizer`.

    Args:
        hparams: ``{name: tensor or Constraint}``, non-empty; tensors must be floating-point
            leaves (they are updated in place).
        device: the model's device (every hyperparameter must be there).
        forbidden: the model's parameters (a hyperparameter may not be, or share memory
            with, one of them).
        inner_optimizer: the optimizer whose settings ``links`` tune.
        links: ``{setting: name}``, e.g. ``{"lr": "lr"}``.

    Raises:
        ArgumentTypeError, ValueError: at construction, naming the hyperparameter and the fix.
    """

    def __init__(
        self,
        hparams: Mapping[str, Tensor | Constraint],
        *,
        device: torch.device,
        forbidden: Sequence[Tensor] = (),
        inner_optimizer: torch.optim.Optimizer | None = None,
        links: Mapping[str, str] | None = None,
    ):
        if not isinstance(hparams, Mapping):
            raise ArgumentTypeError(
                f"`hparams` must be a dict {{name: tensor or Constraint}}, got "
                f"{type(hparams).__name__}."
            )
        if not hparams:
            raise ValueError("`hparams` is empty; pass at least one hyperparameter.")
        self.constraints = _constraints(hparams)
        self.raw = {k: c.raw for k, c in self.constraints.items()}
        self._builtin = all(type(c) in _BUILTIN for c in self.constraints.values())
        self._check_leaves(device, forbidden)
        self.links = check_links(links or {}, inner_optimizer, self.raw)
        bad = self.domain_error(self.raw)
        if bad is not None:
            raise ValueError(f"Initially, {bad[0]} {bad[1]}; start inside its domain.")

    def _check_leaves(self, device: torch.device, forbidden: Sequence[Tensor]) -> None:
        storages = {p.untyped_storage().data_ptr() for p in forbidden if p.device.type != "meta"}
        seen: dict[int, str] = {}
        for name, raw in self.raw.items():
            if not raw.is_floating_point():
                raise ArgumentTypeError(
                    f"hparams[{name!r}] has dtype {raw.dtype}; it must be floating point."
                )
            if not raw.is_leaf:
                raise ValueError(
                    f"hparams[{name!r}] is not a leaf tensor (it was computed from others); "
                    "pass a leaf, e.g. torch.tensor(...) or x.detach().clone()."
                )
            if _overlapping(raw):
                raise ValueError(
                    f"hparams[{name!r}] has elements sharing memory (an expand()ed or "
                    f"as_strided tensor, strides {raw.stride()}); the outer optimizer updates it "
                    "in place, which torch refuses. Pass a copy, e.g. value.clone()."
                )
            if raw.device != device:
                raise ValueError(
                    f"hparams[{name!r}] is on {raw.device} but the model's parameters are on "
                    f"{device}; create it there, e.g. torch.full(..., device={str(device)!r}) "
                    "(for a Constraint, pass a tensor on that device)."
                )
            if any(raw is p for p in forbidden) or raw.untyped_storage().data_ptr() in storages:
                raise ValueError(
                    f"hparams[{name!r}] is (or shares memory with) a parameter of the model; "
                    "hyperparameters must be separate tensors, e.g. torch.tensor(...)."
                )
            if id(raw) in seen:
                raise ValueError(
                    f"hparams[{name!r}] is the same tensor as hparams[{seen[id(raw)]!r}]."
                )
            seen[id(raw)] = name

    # ------------------------------------------------------------------ values
    def leaves(self) -> list[Tensor]:
        """The raw leaves the outer optimizer updates, in the names' order."""
        return list(self.raw.values())

    def detached_raw(self) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in self.raw.items()}

    def transform(self, raw: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The constrained values of a raw dict (differentiable)."""
        return {k: c.transform(raw[k]) for k, c in self.constraints.items()}

    def values(self) -> dict[str, Tensor]:
        """The current constrained values, detached. The built-in constraints transform the
        detached raw leaf (no graph, and no ``torch.no_grad()`` block at every training
        step); another ``Constraint`` subclass's transform runs under ``torch.no_grad()``."""
        if not self._builtin:
            with torch.no_grad():
                return {k: v.detach() for k, v in self.transform(self.raw).items()}
        return {k: c.transform(self.raw[k].detach()) for k, c in self.constraints.items()}

    def setting_fns(self) -> dict[str, Callable[[Mapping[str, Tensor]], Tensor]]:
        """``{setting: fn(raw) -> value}`` for the linked optimizer settings."""
        return {s: self._setting_fn(name) for s, name in self.links.items()}

    def _setting_fn(self, name: str) -> Callable[[Mapping[str, Tensor]], Tensor]:
        constraint = self.constraints[name]
        return lambda raw: constraint.transform(raw[name])

    # ------------------------------------------------------------------ checks and updates
    def domain_error(self, raw: Mapping[str, Tensor]) -> tuple[str, str] | None:
        """``(quantity, reason)`` for the first value of ``transform(raw)`` outside its
        domain (or outside the range of the optimizer setting it is linked to); None when
        all are valid."""
        return self._checked(raw)[1]

    def _checked(self, raw: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Any]:
        """``(transform(raw) detached, domain_error(raw))``."""
        with torch.no_grad():
            values = self.transform(raw)
            inside = _all_inside(self.constraints, values)
        bad = None if inside else self._first_outside(values)
        if bad is not None:
            return values, bad
        for setting, name in self.links.items():
            why = _setting_error(setting, float(values[name]))
            if why is not None:
                return values, (f"hparams[{name!r}]", why)
        return values, None

    def _first_outside(self, values: Mapping[str, Tensor]) -> tuple[str, str] | None:
        for name, c in self.constraints.items():
            why = c.domain_error(values[name])
            if why is not None:
                return f"hparams[{name!r}]", why
        return None

    def check_domain(self) -> dict[str, Tensor]:
        """Raise :class:`HyperparameterDomainError` if a current value left its domain;
        else the current values (:meth:`values`' numbers, read off the check)."""
        values, bad = self._checked(self.raw)
        if bad is not None:
            raise HyperparameterDomainError(
                f"After the outer step, {bad[0]} {bad[1]}; the hyper-step was rolled back. "
                "Lower the outer learning rate (or clip the hypergradient), or constrain the "
                "hyperparameter (hg.Positive, hg.Interval).",
                bad[0],
            )
        return values

    def apply(
        self, hypergrad: Mapping[str, Tensor], outer_optimizer: torch.optim.Optimizer
    ) -> dict[str, Tensor]:
        """Write ``hypergrad`` to the raw leaves' ``.grad``, step the outer optimizer, check;
        returns the new values (as :meth:`values`).

        Raises:
            NonFiniteHypergradientError: a non-finite hypergradient (nothing changed yet).
            HyperparameterDomainError: the step left the domain (the caller rolls back).
        """
        names = list(self.raw)
        if not isinstance(hypergrad, Mapping) or set(hypergrad) != set(names):
            got = sorted(hypergrad) if isinstance(hypergrad, Mapping) else type(hypergrad)
            raise ValueError(
                f"The method returned a hypergradient for {got}; expected a dict over {names}."
            )
        require_finite(
            [hypergrad[k] for k in names],
            [f"hparams[{k!r}]" for k in names],
            "The hypergradient of",
            "The step was rolled back; check the losses, lower the learning rates, or add damping.",
        )
        for k, leaf in self.raw.items():
            leaf.grad = hypergrad[k].detach().to(dtype=leaf.dtype, device=leaf.device).clone()
        outer_optimizer.step()
        clear_grads(outer_optimizer)
        return self.check_domain()

    def write_settings(self, optimizer: torch.optim.Optimizer) -> None:
        """Write the linked settings into every param group (after checking them); nothing
        to do without links."""
        if not self.links:
            return
        self.check_domain()
        write_links(self.links, self.values(), optimizer)

    # ------------------------------------------------------------------ state
    def snapshot(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.raw.items()}

    def restore(self, snapshot: Mapping[str, Tensor]) -> None:
        with torch.no_grad():
            for k, v in self.raw.items():
                v.copy_(snapshot[k])

    def state_dict(self) -> dict[str, Any]:
        return {"raw": self.snapshot(), "kinds": kinds(self.constraints), "links": dict(self.links)}

    def check_state(self, state: Any) -> None:
        """Raise ``ValueError`` if ``state`` cannot be loaded exactly (nothing is changed)."""
        saved = state.get("raw") if isinstance(state, Mapping) else None
        if not isinstance(saved, Mapping) or set(saved) != set(self.raw):
            got = sorted(saved) if isinstance(saved, Mapping) else saved
            raise ValueError(
                f"The checkpoint's hyperparameters {got} differ from this hyper-optimizer's "
                f"{sorted(self.raw)}."
            )
        _check_meaning(state, self.constraints, self.links)
        for k, leaf in self.raw.items():
            v = saved[k]
            if not isinstance(v, Tensor) or v.shape != leaf.shape or v.dtype != leaf.dtype:
                what = f"{tuple(v.shape)} {v.dtype}" if isinstance(v, Tensor) else repr(v)
                raise ValueError(
                    f"hparams[{k!r}] is {what} in the checkpoint but {tuple(leaf.shape)} "
                    f"{leaf.dtype} here; the checkpoint was saved with other hyperparameters."
                )
            if not _vocab.is_finite(v):
                raise ValueError(f"hparams[{k!r}] in the checkpoint is not finite (NaN or Inf).")
        bad = self.domain_error({k: saved[k].to(v.device) for k, v in self.raw.items()})
        if bad is not None:
            raise ValueError(f"In the checkpoint, {bad[0]} {bad[1]}.")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.check_state(state)
        self.restore({k: v.to(self.raw[k].device) for k, v in state["raw"].items()})


def kinds(constraints: Mapping[str, Constraint]) -> dict[str, str]:
    """What each raw value means: the constraint's type and its transform's settings,
    e.g. ``"Positive('exp')"``, ``"Interval(0.0, 1.0)"``, ``"Unconstrained()"``."""
    out = {}
    for name, c in constraints.items():
        found = [getattr(c, a, None) for a in ("kind", "low", "high")]
        detail = [repr(v) for v in found if isinstance(v, (str, int, float))]  # plain data
        out[name] = f"{type(c).__name__}({', '.join(detail)})"
    return out


def _check_meaning(state: Any, constraints: Mapping[str, Constraint], links: Any) -> None:
    """``ValueError`` if the checkpoint's constraints are not these (``log 0.2`` of a
    ``Positive`` read as an unconstrained -1.6) or its links not ``links`` (a value the
    optimizer no longer reads would be tuned); an entry older checkpoints lack: unchecked."""
    if (saved_links := state.get("links")) is not None and saved_links != links:
        raise ValueError(
            f"The checkpoint links optimizer settings {saved_links} (optimizer_hparams), this "
            f"hyper-optimizer {links}; resume with the same links."
        )
    if (saved := state.get("kinds")) is None:
        return
    here = kinds(constraints)
    if not isinstance(saved, Mapping) or set(saved) != set(here):
        raise ValueError("The checkpoint's `hparams['kinds']` entry is malformed.")
    for name, want in here.items():
        if saved[name] != want:
            raise ValueError(
                f"hparams[{name!r}] is {saved[name]} in the checkpoint but {want} here: its "
                "raw value would mean another value. Resume with the same constraints."
            )


def link_conflict(hp: HyperParameters, optimizer: torch.optim.Optimizer) -> str | None:
    """Why a linked setting of ``hp`` in ``optimizer`` is not the hyperparameter's value (it was
    written after the driver: a learning-rate scheduler, a warm-up), or None."""
    return _link_conflict(hp.links, hp.values(), optimizer) if hp.links else None
