"""``HyperOptimizer``: gradient-based hyperparameter tuning inside your own training loop.

Shaped like ``torch.optim.Optimizer``: you keep your loop (forward, backward,
``hopt.step(batch)``); every ``inner_steps`` steps the hyper-optimizer draws a fresh
validation mini-batch, asks its method for the hypergradient, writes it to the
hyperparameters' ``.grad`` and steps *your* outer ``torch.optim`` optimizer. It owns no
mathematics: the methods live in :mod:`hypergradient.methods`.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module

from . import _tree
from ._vocab import HypergradientWarning, NonFiniteHypergradientError
from .constraints import Constraint
from .methods import IFT, Method, Problem, Trajectory
from .optim.functional import from_torch

__all__ = ["HyperOptimizer", "HyperStepRecord"]

_OPT_SETTINGS = ("lr", "momentum", "weight_decay", "dampening")


@dataclass
class HyperStepRecord:
    """What happened at one hyper-step (``hopt.history`` keeps them all).

    Attributes:
        step: inner step count at the hyper-step.
        hyper_step: index of the hyper-step.
        val_loss: validation loss on the hyper-step's batch, before the update.
        hypergrad_norm: norm of the hypergradient (raw parametrization).
        seconds: wall time of the hyper-step.
        method: the method's repr.
        diagnostics: the method's diagnostics (solver products, residual, ...).
        hparams: the hyperparameters' values after the update (detached copies).
        hypergrad: the hypergradient applied, with respect to the raw hyperparameters.
    """

    step: int
    hyper_step: int
    val_loss: float
    hypergrad_norm: float
    seconds: float
    method: str
    diagnostics: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, Tensor] = field(default_factory=dict, repr=False)
    hypergrad: dict[str, Tensor] = field(default_factory=dict, repr=False)


class _Sampler:
    """Mini-batches from in-memory tensors (seeded) or from an iterable (cycled)."""

    def __init__(self, data: Any, batch_size: int | None, seed: int, name: str):
        self.name = name
        self.tensors: tuple[Tensor, ...] | None = None
        if isinstance(data, Tensor):
            data = (data,)
        if isinstance(data, (tuple, list)) and data and all(isinstance(t, Tensor) for t in data):
            n = data[0].shape[0]
            if any(t.shape[0] != n for t in data):
                raise ValueError(f"The tensors of `{name}` must have the same first dimension.")
            self.tensors = tuple(data)
            self.batch_size = batch_size
            self.generator = torch.Generator().manual_seed(seed)
        elif isinstance(data, Iterable):
            self.iterable = data
            self._iter: Iterator[Any] | None = None
            self.consumed = 0
        else:
            raise TypeError(
                f"`{name}` must be a tuple of tensors (sampled in mini-batches) or an iterable "
                f"of batches such as a DataLoader, got {type(data).__name__}."
            )

    def next(self) -> Any:
        if self.tensors is not None:
            n = self.tensors[0].shape[0]
            if self.batch_size is None or self.batch_size >= n:
                return self.tensors
            idx = torch.randperm(n, generator=self.generator)[: self.batch_size]
            return tuple(t[idx.to(t.device)] for t in self.tensors)
        for _ in range(2):
            if self._iter is None:
                self._iter = iter(self.iterable)
            try:
                batch = next(self._iter)
                self.consumed += 1
                return batch
            except StopIteration:
                self._iter = None
        raise ValueError(f"`{self.name}` yields no batches.")

    def state_dict(self) -> dict[str, Any]:
        if self.tensors is not None:
            return {"generator": self.generator.get_state()}
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.tensors is not None:
            # a CPU generator's state (torch.load(map_location=...) may have moved it)
            self.generator.set_state(state["generator"].cpu())
            return
        self._iter = iter(self.iterable)
        self.consumed = 0
        for _ in range(int(state["consumed"])):
            self.next()


class HyperOptimizer:
    """Tune hyperparameters by hypergradient descent while the model trains.

    Example::

        decay = hg.Positive(torch.full((n_features,), 1e-3))     # stays > 0
        inner = torch.optim.SGD(model.parameters(), lr=0.1)
        hopt = hg.HyperOptimizer(
            model, {"decay": decay},
            inner_optimizer=inner,
            outer_optimizer=lambda hp: torch.optim.Adam(hp, lr=0.05),
            train_loss=lambda m, h, batch: ce(m(batch[0]), batch[1]) + penalty(m, h["decay"]),
            val_loss=lambda m, h, batch: ce(m(batch[0]), batch[1]),
            val_data=(x_val, y_val), val_batch_size=256,
            method=hg.IFT(hg.Neumann(iters=20, alpha="auto")), inner_steps=50,
        )
        for batch in loader:
            hopt.zero_grad()
            hopt.train_loss(batch).backward()     # or your own loss with hopt.hparams
            hopt.step(batch)

    Args:
        model: an ``nn.Module`` (losses receive the module; during hyper-steps it is
            reparametrized, so the same loss function serves your loop and the hyper-step),
            or a tree of parameter tensors (losses receive the tree).
        hparams: ``{name: tensor or Constraint}``. A tensor must be a floating-point leaf;
            a :class:`~hypergradient.Positive` / :class:`~hypergradient.Interval` keeps
            its value constrained through reparametrization.
        inner_optimizer: any ``torch.optim`` optimizer over the model's parameters (SGD or
            Adam for the trajectory methods, which replay it differentiably).
        outer_optimizer: a ``torch.optim`` optimizer over ``hopt.raw_hparams()`` or a
            factory ``params -> optimizer``.
        train_loss, val_loss: ``loss(model_or_params, hparams, batch) -> scalar``.
        val_data: validation data: a tuple of tensors (sampled in mini-batches of
            ``val_batch_size``; all of it when None) or an iterable of batches (cycled).
        method: a :mod:`hypergradient.methods` method (default ``IFT()``).
        inner_steps: inner steps between hyper-steps.
        train_data: where hyper-steps draw a training batch when ``step()`` got none
            (implicit methods); same forms as ``val_data``.
        optimizer_hparams: ``{setting: hparams name}`` to tune the inner optimizer's
            ``lr``/``momentum``/``weight_decay`` (trajectory methods only); the tuned
            value is written back to its param groups after each hyper-step.
        seed: seed of the mini-batch sampling.
        process_group: a ``torch.distributed`` group for data-parallel training (the model
            may be wrapped in ``DistributedDataParallel``): each rank passes its own shard's
            batches and validation data; hypergradients are those of the averaged objectives
            and identical on every rank, so the hyperparameters stay in sync.
        nonfinite: ``"raise"`` (default alone) rolls the step back and raises;
            ``"skip"`` (default with ``process_group``) warns and skips the hyper-step, on
            every rank together.

    Bad input raises ``TypeError``/``ValueError`` at construction or before a step
    changes anything; a non-finite hypergradient raises
    :class:`~hypergradient.NonFiniteHypergradientError` and rolls the step back (weights,
    inner optimizer state and hyperparameters are as before the call).
    """

    def __init__(
        self,
        model: nn.Module | Any,
        hparams: Mapping[str, Tensor | Constraint],
        *,
        inner_optimizer: torch.optim.Optimizer,
        outer_optimizer: torch.optim.Optimizer | Callable[[list[Tensor]], torch.optim.Optimizer],
        train_loss: Callable[[Any, dict[str, Tensor], Any], Tensor],
        val_loss: Callable[[Any, dict[str, Tensor], Any], Tensor],
        val_data: Any,
        method: Method | None = None,
        inner_steps: int = 10,
        train_data: Any = None,
        val_batch_size: int | None = None,
        train_batch_size: int | None = None,
        optimizer_hparams: Mapping[str, str] | None = None,
        seed: int = 0,
        process_group: Any = None,
        nonfinite: str | None = None,
    ):
        if not isinstance(inner_optimizer, torch.optim.Optimizer):
            raise TypeError("`inner_optimizer` must be a torch.optim.Optimizer.")
        for name, fn in (("train_loss", train_loss), ("val_loss", val_loss)):
            if not callable(fn):
                raise TypeError(f"`{name}` must be callable (model, hparams, batch) -> scalar.")
        if val_data is None:
            raise ValueError("`val_data` is required: hyper-steps need validation batches.")
        self.method = IFT() if method is None else method
        if not isinstance(self.method, Method):
            raise TypeError(
                f"`method` must be a hypergradient method such as hg.IFT(), got {type(method)}."
            )
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"`inner_steps` must be a positive integer, got {inner_steps!r}.")
        self.inner_steps = inner_steps
        self.inner_optimizer = inner_optimizer
        self._train_loss_fn, self._val_loss_fn = train_loss, val_loss

        if nonfinite not in (None, "raise", "skip"):
            raise ValueError(f"`nonfinite` must be 'raise' or 'skip', got {nonfinite!r}.")
        self.process_group = process_group
        if process_group is not None:
            from .distributed import _group_size

            _group_size(process_group)  # raises if torch.distributed is not initialized
        self.nonfinite = nonfinite or ("skip" if process_group is not None else "raise")
        self.skipped = 0

        # --- model and parameters --------------------------------------------------
        self._user_module = model  # what the user's own loop calls (possibly DDP-wrapped)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            # Hyper-steps evaluate the wrapped module functionally; gradient averaging across
            # ranks is done by the hypergradient code, not by DDP's backward hooks.
            model = model.module
        in_opt = {id(p) for g in inner_optimizer.param_groups for p in g["params"]}
        if isinstance(model, nn.Module):
            self.module: nn.Module | None = model
            named = dict(model.named_parameters())
            self._param_names = [k for k, p in named.items() if id(p) in in_opt]
            self._frozen_names = [k for k in named if k not in self._param_names]
            self._param_tensors = [named[k] for k in self._param_names]
            self._pspec = _tree.flatten({k: named[k] for k in self._param_names}, "model")[1]
        else:
            self.module = None
            leaves, self._pspec = _tree.flatten(model, "model")
            _tree.check_leaves(leaves, self._pspec, "model")
            self._param_tensors = leaves
            self._frozen_names = []
        if not self._param_tensors:
            raise ValueError("`inner_optimizer` optimizes none of the model's parameters.")
        missing = [i for i, p in enumerate(self._param_tensors) if id(p) not in in_opt]
        if missing:
            raise ValueError(
                f"{self._pspec.paths[missing[0]]} is not optimized by `inner_optimizer`; pass "
                "the parameters it trains."
            )

        # --- hyperparameters -------------------------------------------------------
        if not isinstance(hparams, Mapping) or not hparams:
            raise TypeError("`hparams` must be a non-empty dict {name: tensor or Constraint}.")
        self._hp: dict[str, Tensor | Constraint] = dict(hparams)
        self._raw: dict[str, Tensor] = {}
        for name, h in self._hp.items():
            raw = h.raw if isinstance(h, Constraint) else h
            if not isinstance(raw, Tensor):
                raise TypeError(
                    f"hparams[{name!r}] must be a tensor or a Constraint, got {type(h).__name__}."
                )
            if not raw.is_floating_point():
                raise TypeError(f"hparams[{name!r}] has dtype {raw.dtype}; it must be floating.")
            if not raw.is_leaf:
                raise ValueError(
                    f"hparams[{name!r}] is not a leaf tensor (it was computed from others); "
                    "pass a leaf, e.g. torch.tensor(...) or x.detach().clone()."
                )
            device = self._param_tensors[0].device
            if raw.device != device:
                raise ValueError(
                    f"hparams[{name!r}] is on {raw.device} but the model's parameters are on "
                    f"{device}; create it there, e.g. torch.full(..., device={str(device)!r}) "
                    "(for a Constraint, pass a tensor on that device)."
                )
            self._raw[name] = raw
        raws = list(self._raw.values())
        if isinstance(outer_optimizer, torch.optim.Optimizer):
            opt_ids = {id(p) for g in outer_optimizer.param_groups for p in g["params"]}
            if opt_ids != {id(r) for r in raws}:
                raise ValueError(
                    "`outer_optimizer` must optimize exactly the raw hyperparameters "
                    "(hopt.raw_hparams(): the tensors, or Constraint.raw); or pass a factory "
                    "such as lambda hp: torch.optim.Adam(hp, lr=1e-2)."
                )
            self.outer_optimizer = outer_optimizer
        elif callable(outer_optimizer):
            self.outer_optimizer = outer_optimizer(raws)
            if not isinstance(self.outer_optimizer, torch.optim.Optimizer):
                raise TypeError(
                    "The `outer_optimizer` factory must return a torch.optim.Optimizer."
                )
        else:
            raise TypeError("`outer_optimizer` must be a torch.optim.Optimizer or a factory.")

        self._opt_hp = dict(optimizer_hparams or {})
        for setting, name in self._opt_hp.items():
            if setting not in _OPT_SETTINGS:
                raise ValueError(
                    f"optimizer_hparams key {setting!r} is not one of {_OPT_SETTINGS}."
                )
            if name not in self._hp:
                raise ValueError(f"optimizer_hparams[{setting!r}] = {name!r} is not in hparams.")
        if self._opt_hp and not self.method.tunes_optimizer:
            raise ValueError(
                f"{type(self.method).__name__} differentiates at the current parameters, where "
                "the optimizer's settings have no effect; tune them with hg.Unrolled(), "
                "hg.ForwardMode() or hg.DrMAD()."
            )
        if self.method.needs_trajectory:
            from_torch(inner_optimizer, self._param_tensors)  # raises for unsupported ones
        self._val = _Sampler(val_data, val_batch_size, seed, "val_data")
        self._train = (
            None
            if train_data is None
            else _Sampler(train_data, train_batch_size, seed + 1, "train_data")
        )
        self._count = 0
        self._hyper_count = 0
        self._window: dict[str, Any] | None = None
        self.history: list[HyperStepRecord] = []
        self._sync_optimizer_settings()

    # ------------------------------------------------------------------ public views
    @property
    def hparams(self) -> dict[str, Tensor]:
        """Current hyperparameter values (constrained), detached: use them in your loss."""
        out = {}
        for k, h in self._hp.items():
            out[k] = h.value if isinstance(h, Constraint) else h.detach()
        return out

    def raw_hparams(self) -> list[Tensor]:
        """The unconstrained leaves the outer optimizer updates."""
        return list(self._raw.values())

    def train_loss(self, batch: Any) -> Tensor:
        """The training loss on ``batch`` with the current hyperparameters (for backward)."""
        return self._train_loss_fn(self._user_model(), self.hparams, batch)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients of the model's parameters (as ``inner_optimizer.zero_grad``)."""
        self.inner_optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ stepping
    def step(self, batch: Any = None, closure: Callable[[], Tensor] | None = None) -> Any:
        """One inner step; every ``inner_steps`` steps, also one hyper-step.

        Args:
            batch: the training batch the gradients were computed on. Trajectory methods
                need it at every step (they replay the steps); implicit methods use the
                last one at the hyper-step (or a fresh one from ``train_data``).
            closure: passed to ``inner_optimizer.step``.

        Returns:
            What ``inner_optimizer.step`` returns.
        """
        if batch is None and (self.method.needs_trajectory or self._train is None):
            raise ValueError(
                "step() needs the training `batch` (or construct with train_data=...): "
                + (
                    "trajectory methods replay the inner steps."
                    if self.method.needs_trajectory
                    else "the hyper-step needs a training batch."
                )
            )
        closing = (self._count + 1) % self.inner_steps == 0
        if self.method.needs_trajectory:
            if self._window is None:
                fopt, state0, step0 = from_torch(self.inner_optimizer, self._param_tensors)
                self._window = {
                    "params": [p.detach().clone() for p in self._param_tensors],
                    "optimizer": fopt,
                    "state0": state0,
                    "step0": step0,
                    "batches": [],
                }
            self._window["batches"].append(batch)
        snapshot = None
        if closing:
            snapshot = (
                [p.detach().clone() for p in self._param_tensors],
                copy.deepcopy(self.inner_optimizer.state_dict()),
            )
        result = self.inner_optimizer.step(closure) if closure else self.inner_optimizer.step()
        self._count += 1
        if closing:
            try:
                self._hyper_step(batch, prev=snapshot[0])
            except NonFiniteHypergradientError as err:
                if self.nonfinite != "skip":
                    self._rollback(snapshot)
                    raise
                # Every rank sees the same non-finite (averaged) values, so every rank skips
                # this hyper-step together and the hyperparameters stay identical.
                warnings.warn(
                    f"Hyper-step at step {self._count} skipped: {err}",
                    HypergradientWarning,
                    stacklevel=2,
                )
                self.skipped += 1
                self._window = None
            except Exception:
                self._rollback(snapshot)
                raise
        return result

    def _rollback(self, snapshot: Any) -> None:
        """Undo the inner step of a failed hyper-step: weights, optimizer state, counters."""
        with torch.no_grad():
            for p, old in zip(self._param_tensors, snapshot[0]):
                p.copy_(old)
        self.inner_optimizer.load_state_dict(snapshot[1])
        self._count -= 1
        if self._window is not None:
            self._window["batches"].pop()

    def _user_model(self) -> Any:
        if self.module is not None:
            return self._user_module
        return _tree.unflatten(self._pspec, self._param_tensors)

    def _constrained(self, raw: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for k, h in self._hp.items():
            out[k] = h.transform(raw[k]) if isinstance(h, Constraint) else raw[k]
        return out

    def _call(
        self, loss_fn: Callable, params: Any, raw: Mapping[str, Tensor], batch: Any
    ) -> Tensor:
        """``loss_fn(model, hparams, batch)`` with the model's parameters set to ``params``.

        For a module, the loss receives the module itself, reparametrized for the call
        (``torch.func.functional_call``'s mechanism): ``model(x)``, ``model.weight`` and
        ``model.parameters()`` all see ``params``, and buffers are copies, so batch-norm
        running statistics are not updated by hyper-steps.
        """
        hparams = self._constrained(raw)
        if self.module is None:
            return loss_fn(params, hparams, batch)
        frozen = {
            k: v.detach() for k, v in self.module.named_parameters() if k in self._frozen_names
        }
        buffers = {k: b.clone() for k, b in self.module.named_buffers()}
        with _reparametrize_module(self.module, {**frozen, **buffers, **params}):
            return loss_fn(self.module, hparams, batch)

    def _functional(self, loss_fn: Callable, batch: Any) -> Callable[[Any, Any], Tensor]:
        def f(params: Any, raw: Mapping[str, Tensor]) -> Tensor:
            return self._call(loss_fn, params, raw, batch)

        return f

    def _hyper_step(self, batch: Any, prev: list[Tensor]) -> HyperStepRecord:
        started = time.perf_counter()
        train_batch = batch if batch is not None else self._train.next()  # type: ignore[union-attr]
        val_batch = self._val.next()
        params = _tree.unflatten(self._pspec, [p.detach() for p in self._param_tensors])
        raw = {k: v.detach() for k, v in self._raw.items()}
        lr = float(self.inner_optimizer.param_groups[0]["lr"])
        trajectory = None
        if self.method.needs_trajectory:
            w = self._window
            assert w is not None

            def batch_loss(p: Any, r: Mapping[str, Tensor], b: Any) -> Tensor:
                return self._call(self._train_loss_fn, p, r, b)

            trajectory = Trajectory(
                step_loss=batch_loss,
                params0=_tree.unflatten(self._pspec, w["params"]),
                optimizer=w["optimizer"],
                batches=list(w["batches"]),
                state0=None if w["state0"] is None else tuple(w["state0"]),
                step0=w["step0"],
                settings={s: self._setting_fn(name) for s, name in self._opt_hp.items()},
                final_params=params,
            )
        problem = Problem(
            inner_loss=self._functional(self._train_loss_fn, train_batch),
            outer_loss=self._functional(self._val_loss_fn, val_batch),
            params=params,
            hparams=raw,
            lr=lr,
            prev_params=_tree.unflatten(self._pspec, prev),
            trajectory=trajectory,
            process_group=self.process_group,
        )
        hyper, info = self.method(problem)
        diag = info.as_dict()
        diag.update(diag.pop("stats", {}))
        flat = {k: hyper[k] for k in self._raw}
        for k, v in flat.items():
            if not bool(torch.isfinite(v).all()):
                raise NonFiniteHypergradientError(
                    f"The hypergradient of hparams[{k!r}] is not finite; the step was rolled "
                    "back. Check the losses, lower the learning rates, or add damping."
                )
        # --- apply: nothing above changed any state ----------------------------------
        norm = sum(float(v.to(_tree.wide_dtype(v.device)).pow(2).sum()) for v in flat.values())
        norm = float(norm**0.5)
        for k, raw_leaf in self._raw.items():
            raw_leaf.grad = flat[k].to(raw_leaf.dtype).clone()
        self.outer_optimizer.step()
        self.outer_optimizer.zero_grad(set_to_none=True)
        self._sync_optimizer_settings()
        self._window = None
        self._hyper_count += 1
        record = HyperStepRecord(
            step=self._count,
            hyper_step=self._hyper_count,
            val_loss=float(diag.get("outer_loss", float("nan"))),
            hypergrad_norm=norm,
            seconds=time.perf_counter() - started,
            method=repr(self.method),
            diagnostics=diag,
            hparams={k: v.clone() for k, v in self.hparams.items()},
            hypergrad={k: v.detach().clone() for k, v in flat.items()},
        )
        self.history.append(record)
        return record

    def _setting_fn(self, name: str) -> Callable[[Mapping[str, Tensor]], Tensor]:
        """Optimizer setting as a function of the raw hyperparameters (a dict)."""
        h = self._hp[name]

        def fn(raw: Mapping[str, Tensor]) -> Tensor:
            return h.transform(raw[name]) if isinstance(h, Constraint) else raw[name]

        return fn

    def _sync_optimizer_settings(self) -> None:
        for setting, name in self._opt_hp.items():
            value = self.hparams[name]
            if value.numel() != 1:
                raise ValueError(f"hparams[{name!r}] tunes `{setting}` and must be a scalar.")
            for g in self.inner_optimizer.param_groups:
                g[setting] = float(value)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (the model's weights are saved separately)."""
        w = self._window
        return {
            "count": self._count,
            "hyper_count": self._hyper_count,
            "raw": {k: v.detach().clone() for k, v in self._raw.items()},
            "inner_optimizer": copy.deepcopy(self.inner_optimizer.state_dict()),
            "outer_optimizer": copy.deepcopy(self.outer_optimizer.state_dict()),
            "method": self.method.state_dict(),
            "val_sampler": self._val.state_dict(),
            "train_sampler": None if self._train is None else self._train.state_dict(),
            "window": None
            if w is None
            else {
                "params": [p.clone() for p in w["params"]],
                "state0": None if w["state0"] is None else [s.clone() for s in w["state0"]],
                "step0": w["step0"],
                "batches": list(w["batches"]),
            },
            # plain dicts, so that torch.load(weights_only=True) can read the checkpoint
            "history": [dataclasses.asdict(r) for r in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the model's weights must be restored by the caller."""
        if set(state["raw"]) != set(self._raw):
            raise ValueError(
                f"The checkpoint's hyperparameters {sorted(state['raw'])} do not match "
                f"{sorted(self._raw)}."
            )
        with torch.no_grad():
            for k, v in state["raw"].items():
                self._raw[k].copy_(v)
        self.inner_optimizer.load_state_dict(state["inner_optimizer"])
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        self.method.load_state_dict(state["method"])
        self._val.load_state_dict(state["val_sampler"])
        if self._train is not None and state["train_sampler"] is not None:
            self._train.load_state_dict(state["train_sampler"])
        self._count = int(state["count"])
        self._hyper_count = int(state["hyper_count"])
        w = state["window"]
        if w is None:
            self._window = None
        else:
            fopt = from_torch(self.inner_optimizer, self._param_tensors)[0]
            # On the parameters' devices, whatever torch.load's map_location was (as
            # torch.optim.Optimizer.load_state_dict does for its state). The buffers are
            # per parameter, in the parameters' order (Adam: exp_avg then exp_avg_sq).
            devices = [p.device for p in self._param_tensors]
            state0 = w["state0"]
            if state0 is not None:
                state0 = [s.to(devices[i % len(devices)]) for i, s in enumerate(state0)]
            self._window = {
                **w,
                "params": [p.to(d) for p, d in zip(w["params"], devices)],
                "state0": state0,
                "optimizer": fopt,
            }
        self.history = [HyperStepRecord(**r) for r in state["history"]]
        self._sync_optimizer_settings()

    def __repr__(self) -> str:
        return (
            f"HyperOptimizer(method={self.method!r}, inner_steps={self.inner_steps}, "
            f"hparams={list(self._hp)})"
        )
