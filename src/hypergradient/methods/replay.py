"""The replayable inner run: a pure step function and its random-number states.

:class:`Run` validates a :class:`~hypergradient.methods.Problem`'s trajectory once and
exposes the step ``Phi_t`` in the forms the trajectory methods need: without derivatives
(:meth:`Run.step`), with a vector-Jacobian product (:meth:`Run.step_vjp`), and as the two
halves ``grad`` / ``update`` that forward mode pushes tangents through. With a process
group the gradient half is averaged over the ranks (as ``DistributedDataParallel`` does)
through guarded collectives, so a rank whose loss raises stops every rank at once.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _tree
from .._vocab import (
    ArgumentTypeError,
    HypergradientWarning,
    as_callable,
    as_int,
    as_scalar_loss,
)
from ..distributed import guarded
from ..optim.functional import FunctionalOptimizer
from ._checks import (
    check_arity,
    check_inputs,
    check_problem,
    consistent_start,
    fingerprint_config,
)
from .base import Method, Problem, Trajectory

__all__ = ["Run", "optimizer_config", "replay_rng", "rng_state"]


def _accelerator(device: torch.device) -> str | None:
    return device.type if device.type in ("cuda", "mps") else None


def rng_state(device: torch.device | str = "cpu") -> tuple[Tensor, Tensor | None]:
    """The random-number state that random ops on ``device`` draw from.

    The CPU generator's state and, for a CUDA or MPS device, that accelerator's. Capture
    it before each real training step and pass the list as ``Trajectory.rng_states``: the
    replay then draws the same dropout masks. Plain tensors (checkpoint-safe).
    """
    device = torch.device(device)
    accel = _accelerator(device)
    if accel == "cuda":
        return torch.get_rng_state(), torch.cuda.get_rng_state(device)
    if accel == "mps":
        return torch.get_rng_state(), torch.mps.get_rng_state()
    return torch.get_rng_state(), None


@contextlib.contextmanager
def replay_rng(state: tuple[Tensor, Tensor | None], device: torch.device | str) -> Iterator[None]:
    """Run the block under ``state`` (from :func:`rng_state`); the caller's state is restored."""
    device = torch.device(device)
    accel = _accelerator(device)
    with torch.random.fork_rng(devices=[device] if accel == "cuda" else []):
        saved = torch.mps.get_rng_state() if accel == "mps" else None
        torch.set_rng_state(state[0])
        if state[1] is not None and accel == "cuda":
            torch.cuda.set_rng_state(state[1], device)
        elif state[1] is not None and accel == "mps":
            torch.mps.set_rng_state(state[1])
        try:
            yield
        finally:
            if saved is not None:
                torch.mps.set_rng_state(saved)


def optimizer_config(optimizer: FunctionalOptimizer) -> dict[str, Any]:
    """The optimizer's type and settings (tensor settings as their values), plain data."""
    out: dict[str, Any] = {"type": type(optimizer).__name__}
    for k, v in vars(optimizer).items():
        if k == "settings":
            out[k] = {n: float(x.detach()) if isinstance(x, Tensor) else x for n, x in v.items()}
        elif not k.startswith("_"):
            out[k] = v
    return out


class Run:
    """The inner run of ``problem.trajectory``, validated, with its step function ``Phi_t``.

    Construction validates everything (the problem, the trajectory, the hyperparameters,
    a first evaluation of the loss that consumes no random numbers) and, with a process
    group, runs the consistency check of values (``hparams``, ``params0``, ``state0``) and
    configuration (the method's, ``steps``, ``step0``, the optimizer's settings) as the
    call's first collective.

    Attributes:
        steps: ``T``.
        p0, h: the leaves of ``params0`` and ``hparams`` (detached copies).
        pspec, hspec: their tree specs.
        device: where they live.
    """

    def __init__(self, problem: Problem, method: Method):
        problem = check_problem(problem, type(method).__name__)
        self.group = problem.process_group
        traj = problem.trajectory
        consistent_start(
            lambda: self._setup(problem, traj, type(method).__name__),
            self.group,
            lambda _: self._value_checks(),
            lambda: fingerprint_config(
                method,
                steps=self.steps,
                step0=self.step0,
                optimizer=optimizer_config(self.optimizer),
                settings=sorted(self.setting_fns),
                rng_states=self.given,
            ),
        )

    # -- validation -------------------------------------------------------------------
    def _setup(self, problem: Problem, traj: Any, who: str) -> None:
        if not isinstance(traj, Trajectory):
            raise ValueError(
                f"{who} differentiates through the inner steps: the problem needs a "
                "`trajectory` (hg.methods.Trajectory); the functional API (hg.unrolled, "
                "...) builds one."
            )
        if problem.hparams_by_reference:
            raise ValueError(
                f"{who} replays the run with torch.func: the losses must read the "
                "hyperparameters through their `hparams` argument (hparams_by_reference is "
                "for the implicit methods)."
            )
        as_callable(traj.step_loss, "inner_loss", "(params, hparams, batch) -> scalar tensor")
        check_arity(traj.step_loss, 3, "inner_loss", "(params, hparams, batch)", "")
        if not isinstance(traj.optimizer, FunctionalOptimizer):
            raise ArgumentTypeError(
                "`optimizer` must be a differentiable optimizer from hypergradient.optim "
                f"(hg.optim.sgd(...), hg.optim.adam(...)), got {type(traj.optimizer).__name__}."
            )
        self.steps = as_int(len(traj.batches), "steps", min=1)
        inputs = check_inputs(traj.params0, problem.hparams, "params0")
        self.pspec, self.hspec = inputs.param_spec, inputs.hparam_spec
        self.device = inputs.param_leaves[0].device
        self.p0 = tuple(t.detach().clone() for t in inputs.param_leaves)
        self.h = tuple(t.detach().clone() for t in inputs.hparam_leaves)
        self.optimizer = traj.optimizer
        self.step_loss = traj.step_loss
        self.batches = list(traj.batches)
        self.step0 = as_int(traj.step0, "step0", min=0)
        self.state0 = self._check_state0(traj.state0)
        self._settings(traj.settings, inputs.hparam_leaves)
        if traj.final_params is not None:
            spec = _tree.flatten(traj.final_params, "final_params")[1]
            mismatch = _tree.mismatch(spec, "final_params", self.pspec, "params0")
            if mismatch is not None:
                raise ValueError(f"`final_params` does not match `params0`: {mismatch}.")
        self.given = traj.rng_states is not None
        self.rngs: list[Any] = self._check_rngs(traj.rng_states)
        self.loss_like = torch.zeros(1, dtype=_tree.common_dtype(list(self.p0)), device=self.device)
        first = self.rngs[0] if self.given else rng_state(self.device)
        with replay_rng(first, self.device), torch.no_grad():  # a clear message, no draws
            as_scalar_loss(self._call(self.p0, self.h, 0), "inner_loss")

    def _check_state0(self, state0: Sequence[Tensor] | None) -> tuple[Tensor, ...] | None:
        if state0 is None:
            return None
        want = self.optimizer.init(list(self.p0))
        got = tuple(state0)
        if len(got) != len(want) or any(
            not isinstance(a, Tensor) or a.shape != b.shape for a, b in zip(got, want)
        ):
            raise ValueError(
                f"`state0` must hold the optimizer's {len(want)} buffer(s) with the "
                f"parameters' shapes, got {len(got)}; it belongs to another optimizer."
            )
        return tuple(t.detach().to(self.device) for t in got)

    def _settings(self, settings: Mapping[str, Any], leaves: list[Tensor]) -> None:
        """Optimizer settings that depend on ``hparams``: functions, or leaves themselves."""
        self.setting_fns: dict[str, Callable[[Any], Tensor]] = {}
        for name, fn in dict(settings).items():
            self.setting_fns[name] = as_callable(fn, f"settings[{name!r}]", "(hparams) -> tensor")
        self.setting_index: dict[str, int] = {}
        for name, value in self.optimizer.tensor_settings().items():
            if name in self.setting_fns:
                continue
            for i, leaf in enumerate(leaves):
                if value is leaf:
                    self.setting_index[name] = i
            if name not in self.setting_index:
                warnings.warn(
                    f"The optimizer's `{name}` is a tensor that is not one of the leaves of "
                    "`hparams`, so it is treated as a constant. To tune it, pass the very "
                    "tensor that is in `hparams` (not an expression of it).",
                    HypergradientWarning,
                    stacklevel=5,
                )

    def _check_rngs(self, states: Sequence[Any] | None) -> list[Any]:
        if states is None:
            return [None] * self.steps
        states = list(states)
        if len(states) != self.steps:
            raise ValueError(
                f"`rng_states` has {len(states)} entries for {self.steps} steps; record one "
                "with hg.methods.trajectory.rng_state(device) before each step."
            )
        return states

    def _value_checks(self) -> list[tuple[Sequence[Tensor], str]]:
        checks: list[tuple[Sequence[Tensor], str]] = [(self.h, "`hparams`"), (self.p0, "`params0`")]
        if self.state0 is not None:
            checks.append((self.state0, "`state0` (the optimizer's buffers)"))
        return checks

    # -- the step function ------------------------------------------------------------
    def _call(self, p: tuple[Tensor, ...], h: tuple[Tensor, ...], t: int) -> Tensor:
        return self.step_loss(
            _tree.unflatten(self.pspec, p), _tree.unflatten(self.hspec, h), self.batches[t]
        )

    def init_state(self) -> tuple[Tensor, ...]:
        return self.state0 if self.state0 is not None else tuple(self.optimizer.init(list(self.p0)))

    def grad(self, p: tuple[Tensor, ...], h: tuple[Tensor, ...], t: int) -> Any:
        """This rank's ``grad_theta f(theta, phi; batch_t)`` and the loss (composable)."""
        return torch.func.grad_and_value(lambda q: self._call(q, h, t))(p)

    def update(
        self, p: Any, s: Any, g: Any, h: Any, t: int
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """The optimizer's update, with the settings that depend on ``h``."""
        settings = {name: h[i] for name, i in self.setting_index.items()}
        if self.setting_fns:
            tree = _tree.unflatten(self.hspec, h)
            settings.update({name: fn(tree) for name, fn in self.setting_fns.items()})
        new_p, new_s = self.optimizer.update(list(p), list(g), list(s), self.step0 + t, settings)
        return tuple(new_p), tuple(new_s)

    def reduce(self, fn: Callable[[], Sequence[Tensor]], like: Sequence[Tensor]) -> tuple:
        """``fn()`` averaged over the ranks (one guarded all-reduce); ``fn()`` alone."""
        return tuple(guarded(fn, like, self.group, "a step of the inner run"))

    def mean_grad(self, p: tuple[Tensor, ...], t: int) -> tuple[tuple[Tensor, ...], Tensor]:
        """``grad_theta f`` at step ``t`` averaged over the ranks, and the loss."""

        def local() -> list[Tensor]:
            g, loss = self.grad(p, self.h, t)
            return [*g, loss.reshape(1)]

        *g, loss = self.reduce(local, [*p, self.loss_like])
        return tuple(g), loss.reshape(())

    def step(self, p: Any, s: Any, t: int) -> tuple[tuple[Any, Any], Tensor]:
        """``Phi_t`` without derivatives. Returns ``((params, state), loss)``."""
        g, loss = self.mean_grad(p, t)
        return self.update(p, s, g, self.h, t), loss

    def step_vjp(self, p: Any, s: Any, t: int, adj: Any) -> tuple[Any, Any, Any]:
        """Cotangents of ``(theta_t, state_t, phi)`` given the cotangent of step t's output.

        The step is ``update(theta, mean_r grad f_r(theta), state)``: the gradient half is
        local to each rank's shard and the update half identical on every rank, so the
        average sits between their two vector-Jacobian products.
        """
        held: dict[str, Any] = {}

        def local_grad() -> list[Tensor]:
            out: Any = torch.func.vjp(lambda pp, hh: self.grad(pp, hh, t), p, self.h, has_aux=True)
            held["vjp"] = out[1]
            return list(out[0])

        g = self.reduce(local_grad, p)

        def local_back() -> list[Tensor]:
            out: Any = torch.func.vjp(
                lambda pp, ss, gg, hh: self.update(pp, ss, gg, hh, t), p, s, g, self.h
            )
            vjp_update = out[1]
            held["u"] = vjp_update(adj)
            dp_g, dh_g = held["vjp"](held["u"][2])
            return [*dp_g, *dh_g]

        both = self.reduce(local_back, [*p, *self.h])  # the transpose of an average
        dp_u, ds, _, dh_u = held["u"]
        n = len(p)
        return (
            tuple(a + b for a, b in zip(dp_u, both[:n])),
            ds,
            tuple(a + b for a, b in zip(dh_u, both[n:])),
        )

    @contextlib.contextmanager
    def first_pass(self, t: int, record: bool = True) -> Iterator[None]:
        """The first evaluation of step ``t``: under its recorded state, or recording it."""
        if self.given:
            with replay_rng(self.rngs[t], self.device):
                yield
            return
        if record:
            self.rngs[t] = rng_state(self.device)
        yield

    def again(self, t: int) -> Any:
        """A re-evaluation of step ``t`` (reverse pass, recomputation): the same draws."""
        state = self.rngs[t]
        return contextlib.nullcontext() if state is None else replay_rng(state, self.device)
