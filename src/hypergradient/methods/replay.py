"""The replayable inner run: a pure step function and its random-number states.

:class:`Run` validates a :class:`~hypergradient.methods.Problem`'s trajectory once and
exposes the step ``Phi_t`` in the forms the trajectory methods need: without derivatives
(:meth:`Run.step`, plain ``torch.autograd``), its pieces for the reverse step
(:meth:`Run.loss`, :meth:`Run.update`, :meth:`Run.settings_of`; the vector-Jacobian
product itself is :class:`~hypergradient.methods.traj_step.ReverseStep`), and the
``torch.func``-composable halves ``grad`` / ``update_h`` that forward mode pushes tangents
through (``torch.func`` is used there only: its transforms import ``torch._dynamo``,
~2 s). With a process group the gradient half is averaged over the ranks (as
``DistributedDataParallel`` does) through guarded collectives, so a rank whose loss raises
stops every rank at once.
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
from ..operators import recompute
from ..operators.buffers import keep_buffers
from ..optim.functional import FunctionalOptimizer
from ..optim.twins import check_setting_names
from ._checks import (
    check_arity,
    check_inputs,
    check_problem,
    check_state0,
    consistent_start,
    fingerprint_config,
)
from .base import Method, Problem, Trajectory
from .rng import replay_rng, rng_state, same_state, set_rng_state
from .skips import Skips

__all__ = [
    "Run",
    "optimizer_config",
    "replay_rng",
    "rng_state",
    "same_state",
    "set_rng_state",
]

_NO_BLOCK = contextlib.nullcontext()  # reusable


@contextlib.contextmanager
def _both(first: Any, second: Any) -> Iterator[None]:
    with first, second:
        yield


def step_value(fn: Callable[..., Any], params: Any, htree: Any, batch: Any, t: int) -> Tensor:
    """``fn(params, htree, batch)``, step ``t``'s loss, as a scalar; refused (``ValueError``)
    if it ran activation checkpointing, whose backward pass would recompute the segments at
    the module's own weights instead of ``params`` (:mod:`~..operators.recompute`)."""
    with recompute.watch() as seen:
        value = fn(params, htree, batch)
    if seen.found:
        recompute.refuse(True, f"inner_loss (step {t} of the trajectory)")
    return as_scalar_loss(value, "inner_loss")


def tree_builder(spec: _tree.TreeSpec) -> Callable[[Sequence[Tensor]], Any]:
    """``leaves -> tree`` for ``spec``: :func:`~hypergradient._tree.unflatten`, with direct
    builders for a tensor and flat containers of tensors (the common cases, per step)."""
    if spec.kind == "leaf":
        return lambda leaves: leaves[0]
    if all(c.kind == "leaf" for c in spec.children):
        if spec.kind == "dict":
            keys = spec.keys
            return lambda leaves: dict(zip(keys, leaves))
        return tuple if spec.kind == "tuple" else list
    return lambda leaves: _tree.unflatten(spec, leaves)


def _check_by_reference(leaves: Sequence[Tensor], spec: _tree.TreeSpec) -> list[Tensor]:
    """The caller's own hyperparameter tensors: they must require grad."""
    for leaf, path in zip(leaves, spec.paths):
        if not leaf.requires_grad:
            raise ValueError(
                f"{path} does not require grad, but hparams_by_reference=True differentiates "
                "with respect to the caller's own tensors; call .requires_grad_(True) on it "
                "(its .grad is left untouched)."
            )
    return list(leaves)


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

    Construction validates everything but the loss, which the first step evaluates (a
    BatchNorm's running statistics see the batches training sees) and, with a process
    group, runs the consistency check of values (``hparams``, ``params0``, ``state0``) and
    configuration (the method's, ``steps``, ``step0``, the optimizer's settings) as the
    call's first collective.

    Attributes: ``steps`` (``T``); ``p0``, ``h``: the leaves of ``params0`` and ``hparams``
    (detached copies); ``pspec``, ``hspec``: their tree specs; ``device``: where they live;
    ``skips``: the leaves each step does not train (:mod:`~hypergradient.methods.skips`).
    """

    def __init__(self, problem: Problem, method: Method):
        problem = check_problem(problem, type(method).__name__, inner=False)
        self.group = problem.process_group
        self.in_first_pass = False
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
        self.by_reference = bool(problem.hparams_by_reference)
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
        self.forward_loss: Callable[[Any, Any, Any], Tensor] | None = None  # compile=True
        self.p0 = tuple(t.detach().clone() for t in inputs.param_leaves)
        if self.by_reference:
            self.h = tuple(_check_by_reference(inputs.hparam_leaves, self.hspec))
        else:
            self.h = tuple(t.detach().clone() for t in inputs.hparam_leaves)
        self.ptree = tree_builder(self.pspec)
        self.htree_of = tree_builder(self.hspec)
        self.htree = self.htree_of(self.h)
        self.optimizer = traj.optimizer
        self.step_loss = traj.step_loss
        self.batches = list(traj.batches)
        self.step0 = as_int(traj.step0, "step0", min=0)
        self.state0 = check_state0(traj.state0, self.optimizer, self.p0, self.step0)
        self.skips = Skips(self.steps, self.step0, self.optimizer.offsets)  # .grad None
        self._settings(traj.settings, inputs.hparam_leaves)
        self.final_leaves: list[Tensor] | None = None
        if traj.final_params is not None:
            self.final_leaves, spec = _tree.flatten(traj.final_params, "final_params")
            mismatch = _tree.mismatch(spec, "final_params", self.pspec, "params0")
            if mismatch is not None:
                raise ValueError(f"`final_params` does not match `params0`: {mismatch}.")
        self.given = traj.rng_states is not None
        self._after: tuple[int, Any] | None = None
        self.rngs: list[Any] = self._check_rngs(traj.rng_states)
        self.loss_like = torch.zeros(1, dtype=_tree.common_dtype(list(self.p0)), device=self.device)
        # No evaluation of the loss here (state it updates would see one batch too many);
        # the first step names a bad loss (Run.loss, local_grad).
        with torch.no_grad():
            # Constants of the run (numbers: the optimizer's cheapest path, no conversions).
            self.settings = {
                k: float(v) if isinstance(v, Tensor) and v.numel() == 1 else v
                for k, v in self.settings_of(self.h, self.htree).items()
            }

    def _settings(self, settings: Mapping[str, Any], leaves: list[Tensor]) -> None:
        """Optimizer settings that depend on ``hparams``: functions, or leaves themselves."""
        check_setting_names(self.optimizer, settings)
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
    def loss(self, p: Sequence[Tensor], htree: Any, t: int) -> Tensor:
        """``f(theta, phi; batch_t)`` with ``theta``'s leaves ``p`` and the tree ``htree``."""
        return step_value(self.step_loss, self.ptree(p), htree, self.batches[t], t)

    def init_state(self) -> tuple[Tensor, ...]:
        return self.state0 if self.state0 is not None else tuple(self.optimizer.init(list(self.p0)))

    def settings_of(self, h: Sequence[Tensor], htree: Any) -> dict[str, Any]:
        """The optimizer settings that depend on the hyperparameters ``h`` (tree ``htree``)."""
        settings: dict[str, Any] = {name: h[i] for name, i in self.setting_index.items()}
        for name, fn in self.setting_fns.items():
            settings[name] = fn(htree)
        return settings

    def update(
        self, p: Sequence[Tensor], s: Sequence[Tensor], g: Sequence[Tensor], settings: Any, t: int
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """The optimizer's update with the given settings (see :meth:`settings_of`)."""
        grads, step = self.skips.step_inputs(t, g)  # torch.optim skips .grad None
        new_p, new_s = self.optimizer.update(p, grads, s, step, settings)
        return tuple(new_p), tuple(new_s)

    def local_grad(self, p: Sequence[Tensor], t: int) -> tuple[list[Tensor], Tensor]:
        """This rank's ``grad_theta f(theta, phi; batch_t)`` and the loss (no graph kept)."""
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(True) for x in p]
            fn = self.step_loss if self.forward_loss is None else self.forward_loss
            loss = as_scalar_loss(fn(self.ptree(leaves), self.htree, self.batches[t]), "inner_loss")
            grads: Sequence[Tensor | None] = (None,) * len(leaves)
            if loss.requires_grad:
                grads = _tree.dense_grad(loss, leaves, "inner_loss", self.pspec.paths)
        self.used = [d is not None for d in grads]  # (mean_grad notes it for step t)
        return [torch.zeros_like(x) if d is None else d for x, d in zip(p, grads)], loss.detach()

    def reduce(self, fn: Callable[[], Sequence[Tensor]], like: Sequence[Tensor]) -> tuple:
        """``fn()`` averaged over the ranks (one guarded all-reduce); ``fn()`` alone."""
        if self.group is None:
            return tuple(fn())
        return tuple(guarded(fn, like, self.group, "a step of the inner run"))

    def mean_grad(self, p: Sequence[Tensor], t: int) -> tuple[tuple[Tensor, ...], Tensor]:
        """``grad_theta f`` at step ``t`` averaged over the ranks, and the loss."""
        if self.group is None:
            g, loss = self.local_grad(p, t)
            self.skips.note(t, self.used)
            return tuple(g), loss

        def local() -> list[Tensor]:
            g, loss = self.local_grad(p, t)
            return [*g, loss.reshape(1), self.loss_like.new_tensor(self.used)]

        *g, loss, used = self.reduce(local, [*p, self.loss_like, self.loss_like.new_ones(len(p))])
        self.skips.note(t, (used > 0).tolist())  # skipped: no gradient on any rank
        return tuple(g), loss.reshape(())

    def step(self, p: Any, s: Any, t: int) -> tuple[tuple[Any, Any], Tensor]:
        """``Phi_t`` without derivatives. Returns ``((params, state), loss)``."""
        g, loss = self.mean_grad(p, t)
        with torch.no_grad():
            return self.update(p, s, g, self.settings, t), loss

    # -- composable forms (torch.func, forward mode) ----------------------------------
    def grad(self, p: tuple[Tensor, ...], h: tuple[Tensor, ...], t: int) -> Any:
        """This rank's ``grad_theta f`` and the loss, composable with ``torch.func`` (whose
        transforms import ``torch._dynamo``: forward mode only)."""
        return torch.func.grad_and_value(lambda q: self.loss(q, self.htree_of(h), t))(p)

    def update_h(
        self, p: Any, s: Any, g: Any, h: Any, t: int
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """The optimizer's update with the settings computed from ``h`` (composable)."""
        return self.update(list(p), list(s), list(g), self.settings_of(h, self.htree_of(h)), t)

    def first_step(self, p: Any, s: Any, t: int, record: bool) -> tuple[tuple[Any, Any], Tensor]:
        """The first evaluation of step ``t`` (:meth:`step`): under its recorded random-number
        state, or recording the state it starts from (when ``record``)."""
        if self.given:
            with replay_rng(self.rngs[t], self.device):
                return self.step(p, s, t)
        if not record:
            return self.step(p, s, t)
        before = self.draws_from(t)
        out = self.step(p, s, t)
        self.record(t, before)
        return out

    @contextlib.contextmanager
    def first_pass(self, t: int, record: bool = True) -> Iterator[None]:
        """The block as the first evaluation of step ``t`` (see :meth:`first_step`)."""
        self.in_first_pass = True  # an again() inside is this first evaluation
        try:
            if self.given:
                with replay_rng(self.rngs[t], self.device):
                    yield
                return
            before = self.draws_from(t) if record else None
            yield
            if before is not None:
                self.record(t, before)
        finally:
            self.in_first_pass = False

    def draws_from(self, t: int) -> tuple[Tensor, Tensor | None]:
        """The state step ``t`` starts from: the end of step ``t - 1`` when just recorded."""
        last = self._after
        return last[1] if last is not None and last[0] == t - 1 else rng_state(self.device)

    def record(self, t: int, before: tuple[Tensor, Tensor | None]) -> None:
        """Keep ``before`` as step ``t``'s state, unless the step drew nothing (5 KB saved)."""
        after = rng_state(self.device)
        self._after = (t, after)  # the next step starts from it (nothing draws in between)
        self.rngs[t] = None if same_state(before, after) else before

    def again(self, t: int) -> contextlib.AbstractContextManager[Any]:
        """A re-evaluation of step ``t`` (reverse pass, recomputation, first-order
        differences): the same draws, the modules' buffers left as the real steps made them
        (``operators.buffers``); inside :meth:`first_pass`, the step's first evaluation."""
        state = self.rngs[t]
        keep = _NO_BLOCK if self.in_first_pass else keep_buffers()
        if state is None:
            return keep
        return _both(replay_rng(state, self.device), keep)
