"""The vector-Jacobian product of one inner step, in plain ``torch.autograd``.

For the step ``s_{t+1} = Phi_t(s_t, phi)``, ``Phi_t = update(theta, state, g, settings(phi))``
with ``g = mean_r grad_theta f_r(theta, phi; batch_t)``, and the cotangent ``a`` of its
output, :class:`ReverseStep` returns the cotangents of ``theta_t``, ``state_t`` and
``phi``. The step is recomputed from the stored state: one forward pass and one backward
pass with ``create_graph=True`` (the graph of ``g``), the update on top of it, then one
backward pass of the update's outputs against ``a``, which goes through the update and,
by double backward, through ``g`` (``H a``-type and mixed products). Nothing but that
step's graph is alive at any time.

With a process group the two halves are separated: ``g`` is averaged over the ranks
(forward), the update's vector-Jacobian product gives the cotangent ``u`` of ``g``
(identical on every rank), and the products with ``u`` of each rank's gradient graph are
averaged in turn (the transpose of an average is an average). Product modes
(:mod:`~hypergradient.methods.traj_modes`): ``"first_order"`` replaces the double
backward by central differences of gradients; ``"auto"`` falls back to it (through
``"double_math"``) when torch has no double backward for a kernel.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _tree
from .._vocab import HypergradientWarning
from .replay import Run
from .traj_modes import (
    central_difference,
    first_order_step,
    has_error_node,
    is_double_backward_error,
    math_kernels,
)

__all__ = ["ReverseStep", "accumulate"]

Leaves = tuple[Tensor, ...]
_SHAPES = "torch.fx.experimental.symbolic_shapes"  # (imports sympy)

_ONCE = (
    "trying to differentiate twice a function that was marked with @once_differentiable: "
    "a custom autograd.Function in the gradient's graph has no double backward, so the "
    "reverse step would miss its part of the Hessian. Use hvp='first_order' (or 'auto')."
)


def _leaves(xs: Sequence[Tensor]) -> list[Tensor]:
    return [x.detach().requires_grad_(True) for x in xs]


def _zeros_for(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> Leaves:
    return tuple(torch.zeros_like(x) if d is None else d for x, d in zip(like, grads))


def _connected(outs: Sequence[Tensor], cots: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The outputs that depend on the inputs, and their cotangents."""
    pairs = [(o, c) for o, c in zip(outs, cots) if o.requires_grad]
    return [o for o, _ in pairs], [c for _, c in pairs]


def _grad(
    outs: Sequence[Tensor], inputs: Sequence[Tensor], cots: Sequence[Tensor]
) -> Sequence[Tensor | None]:
    """``sum_i cots_i^T d outs_i / d inputs`` (None where an input is unused).

    ``autograd.grad`` with tensor ``grad_outputs`` imports torch's symbolic-shape machinery
    and sympy on its first call (~0.4 s of cold start): until something else has imported
    it, this takes the gradient of the scalar ``sum_i <outs_i, cots_i>`` instead (bit for
    bit the same products: the cotangent reaching ``outs_i`` is ``cots_i`` times 1; 10 more
    ops per step of a 2-leaf model, ~15% of a 31-parameter reverse step's).
    """
    outs, cots = _connected(outs, cots)
    if not outs:
        return (None,) * len(inputs)
    if _SHAPES in sys.modules:  # already imported: no cold start to save
        return torch.autograd.grad(outs, inputs, cots, allow_unused=True)
    total = (outs[0] * cots[0]).sum()
    for o, c in zip(outs[1:], cots[1:]):
        total = total + (o * c).sum()
    return torch.autograd.grad(total, inputs, allow_unused=True)


def accumulate(hyper: list[Tensor], dh: Sequence[Tensor | None], touched: list[bool]) -> None:
    """``hyper[i] += dh[i]`` where ``dh[i]`` is not None (noted in ``touched``): one op when
    every leaf has its term (the same additions)."""
    if all(d is not None for d in dh):
        torch._foreach_add_(hyper, list(dh))  # type: ignore[arg-type]
        touched[:] = [True] * len(touched)
        return
    for i, (acc, d) in enumerate(zip(hyper, dh)):
        if d is not None:
            acc.add_(d)
            touched[i] = True


class ReverseStep:
    """``(a_theta, a_state) -> (cotangents of theta_t, state_t, phi)`` for one step.

    One instance serves one reverse sweep: it holds the hyperparameter leaves the
    cotangents are taken with respect to, the product mode in use and, in ``"auto"`` mode,
    why it left double backward.

    Args:
        run: the validated run.
        mode: ``"auto"``, ``"double"``, ``"double_math"`` or ``"first_order"``.

    Attributes:
        mode: the mode in use; ``fallback``: torch's error that made ``"auto"`` leave
        ``"double"`` (None if it did not).
    """

    def __init__(self, run: Run, mode: str):
        self.run = run
        self.requested = mode
        self.mode = "double" if mode == "auto" else mode
        self.fallback: str | None = None
        self._checked = False
        self.losses: dict[int, Tensor] = {}  # step -> the loss re-evaluated (double modes)
        self.hh = list(run.h) if run.by_reference else _leaves(run.h)
        self.htree = run.htree_of(self.hh)

    def __call__(self, p: Leaves, s: Leaves, t: int, adj: tuple[Leaves, Leaves]) -> tuple:
        """``(d_theta, d_state, d_phi)``; ``d_phi`` entries may be None (no dependence)."""
        if self.mode == "first_order":
            return self._first_order(p, s, t, adj)
        try:
            return self._double(p, s, t, adj)
        except RuntimeError as error:
            if not self._fall_back(error):
                raise
        return self(p, s, t, adj)

    # -- double backward --------------------------------------------------------------
    def _graph(self, pp: list[Tensor], t: int) -> list[Tensor]:
        """This rank's ``grad_theta f`` at ``pp`` with its graph (double mode's kernels)."""
        run = self.run
        kernels = math_kernels() if self.mode == "double_math" else contextlib.nullcontext()
        with run.again(t), kernels, torch.enable_grad():
            loss = run.loss(pp, self.htree, t)
            self.losses[t] = loss.detach()
            g: Sequence[Tensor | None] = (None,) * len(pp)
            if loss.requires_grad:
                with _tree.dense_gradients("inner_loss"):
                    g = torch.autograd.grad(loss, pp, create_graph=True, allow_unused=True)
        if not self._checked:  # once per sweep: the graph's structure does not change
            self._checked = True
            if has_error_node([d for d in g if d is not None and d.requires_grad]):
                raise RuntimeError(_ONCE)
        return list(_zeros_for(g, pp))

    def _double(self, p: Leaves, s: Leaves, t: int, adj: tuple[Leaves, Leaves]) -> tuple:
        run = self.run
        pp, ss = _leaves(p), _leaves(s)
        n, m = len(p), len(s)
        if run.group is None:  # one backward pass through the update and the gradient
            g = self._graph(pp, t)
            with torch.enable_grad():
                new_p, new_s = run.update(pp, ss, g, run.settings_of(self.hh, self.htree), t)
                grads = _grad([*new_p, *new_s], [*pp, *ss, *self.hh], [*adj[0], *adj[1]])
            return _zeros_for(grads[:n], p), _zeros_for(grads[n : n + m], s), grads[n + m :]
        held: dict[str, list[Tensor]] = {}

        def local_grad() -> list[Tensor]:
            held["g"] = self._graph(pp, t)
            return [d.detach() for d in held["g"]]

        g_mean = run.reduce(local_grad, p)
        dp_u, ds, u, dh_u = self._update_vjp(pp, ss, g_mean, t, adj)

        def local_back() -> list[Tensor]:  # this rank's H_r u and mixed product
            got = _grad(held["g"], [*pp, *self.hh], u)
            return [*_zeros_for(got[:n], p), *_zeros_for(got[n:], self.hh)]

        both = run.reduce(local_back, [*p, *run.h])  # the transpose of an average
        return self._combine(dp_u, ds, dh_u, both)

    def _update_vjp(
        self, pp: list[Tensor], ss: list[Tensor], g: Sequence[Tensor], t: int, adj: Any
    ) -> tuple[Leaves, Leaves, Leaves, Sequence[Tensor | None]]:
        """Cotangents of ``theta``, ``state``, ``g`` and ``phi`` through the update alone."""
        run = self.run
        gl = _leaves(g)
        n, m = len(pp), len(ss)
        with torch.enable_grad():
            new_p, new_s = run.update(pp, ss, gl, run.settings_of(self.hh, self.htree), t)
            grads = _grad([*new_p, *new_s], [*pp, *ss, *gl, *self.hh], [*adj[0], *adj[1]])
        return (
            _zeros_for(grads[:n], pp),
            _zeros_for(grads[n : n + m], ss),
            _zeros_for(grads[n + m : 2 * n + m], gl),
            grads[2 * n + m :],
        )

    def _combine(self, dp_u: Leaves, ds: Leaves, dh_u: Sequence[Any], both: Sequence) -> tuple:
        n = len(dp_u)
        dp = tuple(a + b for a, b in zip(dp_u, both[:n]))
        dh = tuple(b if a is None else a + b for a, b in zip(dh_u, both[n:]))
        return tuple(x.detach() for x in dp), tuple(x.detach() for x in ds), dh

    # -- first order ------------------------------------------------------------------
    def _first_order(self, p: Leaves, s: Leaves, t: int, adj: tuple[Leaves, Leaves]) -> tuple:
        """Central differences of gradients for the products; the update by autograd."""
        run = self.run
        with run.again(t):
            g_mean, _ = run.mean_grad(p, t)
        dp_u, ds, u, dh_u = self._update_vjp(_leaves(p), _leaves(s), g_mean, t, adj)
        both = run.reduce(lambda: self._differences(p, u, t), [*p, *run.h])
        return self._combine(dp_u, ds, dh_u, both)

    def _differences(self, p: Leaves, u: Leaves, t: int) -> list[Tensor]:
        """``(grad f(theta + e u) - grad f(theta - e u)) / 2e`` for ``theta`` and ``phi``."""
        wide = _tree.wide_dtype(self.run.device)
        u_norm = math.sqrt(sum(float(x.to(wide).pow(2).sum()) for x in u))
        if u_norm == 0.0:
            return [torch.zeros_like(x) for x in (*p, *self.run.h)]
        theta_norm = math.sqrt(sum(float(x.to(wide).pow(2).sum()) for x in p))
        least = min((x.dtype for x in p), key=lambda d: torch.finfo(d).bits)
        size = sum(x.numel() for x in p)
        e = first_order_step(theta_norm, u_norm, size, least)

        def evaluate(step: float) -> tuple[list[Tensor], list[Tensor]]:
            plus = self._gradients([x + step * d for x, d in zip(p, u)], t)
            return plus, self._gradients([x - step * d for x, d in zip(p, u)], t)

        center = self._gradients(list(p), t)
        out = central_difference(evaluate, center, e, f"inner_loss at step {t} of the window")
        return [d for d in out if d is not None]

    def _gradients(self, q: list[Tensor], t: int) -> list[Tensor]:
        """``grad_theta f`` and ``grad_phi f`` at ``q``, under step ``t``'s draws."""
        run = self.run
        with run.again(t), torch.enable_grad():
            qq = _leaves(q)
            loss = run.loss(qq, self.htree, t)
            inputs = [*qq, *self.hh]
            grads = (
                torch.autograd.grad(loss, inputs, allow_unused=True)
                if loss.requires_grad
                else (None,) * len(inputs)
            )
        return list(_zeros_for(grads, [*q, *self.hh]))

    # -- auto -------------------------------------------------------------------------
    def _fall_back(self, error: RuntimeError) -> bool:
        """Move to the next mode after ``error``; False if there is none (re-raise it)."""
        if self.requested != "auto" or not is_double_backward_error(error):
            return False
        order = ("double", "double_math", "first_order")
        reason = str(error).strip().splitlines()[0][:200]
        if self.fallback is None:
            self.fallback = reason
        if self.mode == "double" and _ONCE not in str(error):
            self.mode = "double_math"  # the math kernels may have a double backward
        else:
            self.mode = order[-1]
        self._checked = False
        if self.mode == "first_order":
            warnings.warn(
                f"Double backward is not available for this inner loss ({self.fallback}); "
                "the reverse steps use hvp='first_order' (central differences of gradients: "
                "4 gradient evaluations per step, relative error ~eps^(2/3) per product; "
                "Adam's reverse step divides by sqrt(v), which can amplify it: measured 52% "
                "off on a float32 transformer under Adam, 9e-5 in float64). Pass "
                "hvp='first_order' to skip the failed attempt.",
                HypergradientWarning,
                stacklevel=6,
            )
        return True

    def finish(self) -> dict[str, Any]:
        """What the sweep reports: the mode in use and why ``"auto"`` left ``"double"``."""
        if self.mode == "double_math" and self.requested == "auto":
            warnings.warn(
                f"Double backward is not available for this inner loss ({self.fallback}); "
                "the reverse steps used hvp='double_math' (the graph rebuilt with the math "
                "attention kernel and without cuDNN). Pass hvp='double_math' to skip the "
                "failed attempt.",
                HypergradientWarning,
                stacklevel=5,
            )
        return {"hvp": self.mode, "hvp_fallback": self.fallback}


def _scalar(x: Tensor) -> Tensor:
    return x if x.dim() == 0 else x.reshape(())


def check_recomputed(
    again: dict[int, Tensor], first: list[Tensor], other_kernels: bool = False
) -> None:
    """Warn if a step's loss re-evaluated in the reverse sweep differs from its forward
    sweep's value beyond rounding (``max(1e-4, 16 eps)`` relative): the reverse sweep then
    differentiated another run, e.g. dropout masks drawn from a ``torch.Generator`` of the
    user's own, which the replay of torch's global random state does not rewind.

    ``other_kernels``: the re-evaluations ran other kernels than the forward sweep (mode
    ``"double_math"``: the math attention kernel, no cuDNN), whose rounding differs by the
    precision the loss computed in, which ``eps`` of the loss's dtype does not show: under
    ``torch.autocast`` to bfloat16 a transformer's loss moved by 3.7e-4 relative. The bound
    is then ``2^-7``, twice bfloat16's unit roundoff."""
    steps = [t for t in sorted(again) if t < len(first)]
    if not steps:
        return
    # (the losses are 0-d: one stack, then one conversion, for all steps)
    a = torch.stack([_scalar(again[t]) for t in steps]).detach().double()
    b = torch.stack([_scalar(first[t]) for t in steps]).detach().to(a)
    eps = max(torch.finfo(again[t].dtype).eps for t in steps)
    gap = ((a - b).abs() / b.abs().clamp_min(torch.finfo(torch.float64).tiny)).tolist()
    worst = max(range(len(steps)), key=lambda i: gap[i])
    bound = max(1e-4, 16 * eps, 2.0**-7 if other_kernels else 0.0)
    if gap[worst] > bound:  # NaN compares False: check_forward's business
        warnings.warn(
            f"inner_loss re-evaluated at step {steps[worst]} gave {float(a[worst]):.6g} where "
            f"the forward sweep gave {float(b[worst]):.6g}: the hypergradient is that of "
            "another run. Random numbers inside inner_loss must come from torch's global "
            "generator (a torch.Generator of your own is not replayed), and the loss must "
            "not depend on state that changes between calls.",
            HypergradientWarning,
            stacklevel=5,
        )
