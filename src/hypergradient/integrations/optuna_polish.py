"""Polishing an incumbent by hypergradient steps that are kept only when they improve it.

A black-box search (Optuna's TPE) finds good points; hypergradient descent from a good point
finds a better one nearby when the validation loss is smooth there. :class:`Polisher` is the
local half of such a hybrid, driven ask/tell so that any loop can interleave it with the
search: it proposes a projected quasi-Newton step from the incumbent along its
hypergradient, the caller evaluates the exact validation loss there, and the step is kept
only if that loss is lower (a backtracking line search otherwise). Its incumbent never gets
worse, so polishing can only cost time, not quality. :func:`add_refined_trial` tells the
study each polished point as a trial of its own.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import optuna
import torch
from torch import Tensor

from .._vocab import ArgumentTypeError, as_float, as_int, as_real, require_finite

__all__ = ["REFINED_FROM", "Polisher", "add_refined_trial"]

#: User attribute of a trial added by :func:`add_refined_trial`: the source trial's number.
REFINED_FROM = "refined_from"


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


class Polisher:
    r"""Ask/tell local refinement of an incumbent ``x`` by hypergradient line searches.

    The math: with ``x`` confined to the box ``[lower, upper]``, loss ``f(x)`` (evaluated
    exactly by the caller) and hypergradient ``g = ∇f(x)``, the coordinates at a bound whose
    gradient pushes outward are held; on the others the direction is the L-BFGS two-loop
    product ``d = -H g`` (``H``: the inverse-Hessian estimate from the last ``memory``
    accepted steps ``s = Δx``, ``y = Δg`` with ``s·y > 0``; ``d = -g`` scaled to a largest
    coordinate of ``radius`` before any). The candidate is ``clamp(x + t d)``, ``t = 1`` at
    the start; it is accepted iff ``f(candidate) < f(x) - tol``. Each rejection multiplies
    ``t`` by ``shrink``, each acceptance divides it by ``shrink`` (up to 1), and after
    ``max_rejects`` rejections in a row the polish is done (:attr:`done`). References:
    Nocedal & Wright, *Numerical Optimization* (2006), Alg. 7.4 (two-loop recursion) and
    Alg. 3.1 (backtracking); Byrd, Lu, Nocedal & Zhu (1995), SIAM J. Sci. Comput. 16(5)
    (bounds by projection, L-BFGS-B). The incumbent's loss never increases.

    Use::

        polisher = Polisher(lower, upper)
        polisher.start(x0, f(x0), grad(x0))
        while (x := polisher.ask()) is not None:
            params = train(x)
            polisher.tell(val_loss(params), lambda: hypergradient(params, x))

    The hypergradient is asked for (the callable is called) only when the step is accepted,
    so a rejected candidate costs one training and no hypergradient.

    Cost: one evaluation of ``f`` per :meth:`ask`, one hypergradient per accepted step,
    ``O(memory · n)`` arithmetic; memory ``2 · memory · n`` numbers for ``n`` hyperparameters.

    Args:
        lower, upper: the box (tensors of ``x``'s shape, or floats), ``lower < upper``.
        memory: accepted steps kept for the quasi-Newton estimate (0: steepest descent).
        radius: the largest coordinate change of a steepest-descent step (the first one,
            and whenever the quasi-Newton direction is unavailable or not a descent one).
        shrink: step factor after a rejection, in (0, 1).
        max_rejects: rejections in a row that end the polish.
        tol: required decrease for acceptance (0: any strict decrease).
    """

    def __init__(
        self,
        lower: Tensor | float,
        upper: Tensor | float,
        *,
        memory: int = 5,
        radius: float = 1.0,
        shrink: float = 0.25,
        max_rejects: int = 8,
        tol: float = 0.0,
    ):
        for name, b in (("lower", lower), ("upper", upper)):
            if not isinstance(b, (Tensor, float, int)) or isinstance(b, bool):
                raise ArgumentTypeError(f"`{name}` must be a tensor or a float, got {b!r}.")
        self.lower, self.upper = lower, upper
        self.memory = as_int(memory, "memory", min=0)
        self.radius = as_float(radius, "radius", min=0.0, open_min=True)
        self.shrink = as_float(shrink, "shrink", min=0.0, max=1.0, open_min=True, open_max=True)
        self.max_rejects = as_int(max_rejects, "max_rejects", min=1)
        self.tol = as_float(tol, "tol", min=0.0)
        self.x = self.g = self.lo = self.hi = torch.empty(0)  # set by start()
        self.candidate: Tensor | None = None
        self.value, self.done = math.inf, True
        self.accepted = self.rejected = 0

    def start(self, x: Tensor, value: float, grad: Tensor) -> None:
        """Polish from ``x`` (inside the box; a rounding error beyond it is clamped), whose
        loss is ``value`` and hypergradient ``grad``; forgets the previous incumbent and its
        curvature pairs.

        Raises:
            ValueError: ``x`` is not finite or lies outside the box (its ``value`` is not
                the clamped point's), ``value`` is not finite, or the box is empty;
                nothing changes.
        """
        if not isinstance(x, Tensor) or not isinstance(grad, Tensor) or x.shape != grad.shape:
            raise ArgumentTypeError("`x` and `grad` must be tensors of the same shape.")
        if not x.is_floating_point():  # the box and the steps would be rounded to integers
            raise ArgumentTypeError(f"`x` must be a floating-point tensor, got {x.dtype}.")
        require_finite([grad], ["grad"], "The hypergradient", "Start where it is finite.")
        value = as_real(value, "value", " Start from a trained point.")
        if not math.isfinite(value):
            raise ValueError(f"`value` must be finite, got {value}; start from a trained point.")
        lo, hi = self._bound(self.lower, "lower", x), self._bound(self.upper, "upper", x)
        if not bool((lo < hi).all()):
            raise ValueError("`lower` must be below `upper` everywhere (an empty box).")
        x = x.detach()
        moved = (torch.clamp(x, lo, hi) - x).abs()  # rounding (a log of a bound): clamped
        slack = 1e-9 * (hi - lo + lo.abs() + hi.abs())
        if not bool(torch.isfinite(x).all()) or bool((moved > slack).any()):
            raise ValueError(
                f"`x` must be a finite point inside the box [lower, upper] (off by up to "
                f"{float(moved.max()):.3g}): `value` and `grad` would be attributed to "
                f"the clamped point. Start inside the box."
            )
        self.lo, self.hi = lo, hi
        self.x = torch.clamp(x, self.lo, self.hi).clone()
        # x's dtype: a float32 hypergradient of a float64 x (Optuna's floats) is common
        self.g, self.value = grad.detach().to(x.dtype).clone(), value
        self.pairs: list[tuple[Tensor, Tensor]] = []
        self.t, self.rejects, self.done, self.candidate = 1.0, 0, False, None

    @staticmethod
    def _bound(b: Tensor | float, name: str, x: Tensor) -> Tensor:
        """``b`` as a tensor of ``x``'s shape (broadcast), or a ``ValueError`` naming it."""
        t = torch.as_tensor(b, dtype=x.dtype, device=x.device)
        try:
            return t.expand_as(x)
        except RuntimeError:
            raise ValueError(
                f"`{name}` has shape {tuple(t.shape)}, which does not broadcast to x's "
                f"{tuple(x.shape)}; pass a float or a tensor shaped like x."
            ) from None

    def _free(self) -> Tensor:
        x, g = self.x, self.g
        held = ((x <= self.lo) & (g > 0)) | ((x >= self.hi) & (g < 0))
        return ~held

    def _direction(self) -> Tensor:
        free = self._free().to(self.g.dtype)
        pairs = [(s * free, y * free) for s, y in self.pairs]  # on the free coordinates
        pairs = [(s, y) for s, y in pairs if _dot(s, y) > 1e-12 * float(s.norm() * y.norm())]
        q, alphas = self.g * free, []
        for s, y in reversed(pairs):
            alphas.append(_dot(s, q) / _dot(s, y))
            q = q - alphas[-1] * y
        if pairs:  # the initial inverse Hessian: (s·y / y·y) I
            q = q * (_dot(*pairs[-1]) / _dot(pairs[-1][1], pairs[-1][1]))
        for (s, y), a in zip(pairs, reversed(alphas)):
            q = q + (a - _dot(y, q) / _dot(s, y)) * s
        if not pairs or _dot(q, self.g) <= 0:  # no curvature yet, or not a descent direction
            q = self.g * free
            q = q * (self.radius / float(q.abs().max().clamp_min(1e-300)))
        return -q

    def ask(self) -> Tensor | None:
        """The next candidate (a new tensor), or ``None`` when the polish is done."""
        if self.done:
            return None
        candidate = torch.clamp(self.x + self.t * self._direction(), self.lo, self.hi)
        if torch.equal(candidate, self.x):  # no move left inside the box
            self.done = True
            return None
        self.candidate = candidate
        return candidate.clone()

    def tell(self, value: float, grad: Callable[[], Tensor] | Tensor) -> bool:
        """The loss at the last candidate; ``grad`` (its hypergradient, or a callable
        returning it, called only if the step is accepted). Returns whether it was accepted
        (the candidate is then the incumbent).

        Raises:
            ArgumentTypeError: ``value`` is not a number, or the hypergradient is not a tensor
                of ``x``'s shape (the candidate stays pending: tell again).
            NonFiniteHypergradientError: the hypergradient is not finite (pending too).
        """
        if self.candidate is None:
            raise ValueError("tell() without a pending candidate: call ask() first.")
        value = as_real(value, "value", " Tell the loss at the candidate.")
        if not value < self.value - self.tol:  # NaN is rejected too
            self.candidate = None
            self.rejected, self.rejects = self.rejected + 1, self.rejects + 1
            self.t *= self.shrink
            self.done = self.rejects >= self.max_rejects
            return False
        g = grad() if callable(grad) else grad
        if not isinstance(g, Tensor) or g.shape != self.x.shape:
            got = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            raise ArgumentTypeError(
                f"`grad` must be the hypergradient at the candidate, a tensor of shape "
                f"{tuple(self.x.shape)}; got {got}. The candidate is still pending."
            )
        g = g.detach().to(self.x.dtype)
        require_finite([g], ["grad"], "The hypergradient", "Check the training at the candidate.")
        candidate, self.candidate = self.candidate, None
        s, y = candidate - self.x, g - self.g
        if self.memory and _dot(s, y) > 1e-12 * float(s.norm() * y.norm()):
            self.pairs = [*self.pairs, (s, y)][-self.memory :]
        self.x, self.g, self.value = candidate, g.clone(), value
        self.accepted, self.rejects, self.t = self.accepted + 1, 0, min(1.0, self.t / self.shrink)
        return True


def add_refined_trial(
    study: optuna.study.Study,
    params: Mapping[str, float],
    value: float,
    source: optuna.trial.Trial | optuna.trial.FrozenTrial,
) -> None:
    """Tell ``study`` a refined point as a completed trial of its own, with its exact value.

    A refinement (hypergradient steps from a trial's sampled start) evaluates points the
    sampler never proposed. Added as trials, those exact ``(params, value)`` pairs inform
    the sampler's model (TPE's densities) like its own trials, and the best refined point
    becomes ``study.best_trial`` with its refined ``best_params``. Parameters not in
    ``params`` (structural choices) are copied from ``source``; float and int values
    (Python, numpy or 0-d tensors) are clipped into ``source``'s distributions (a step in
    ``log`` space may round past a bound) and rounded to their grid (an integer, a
    ``step``).

    Args:
        study: the study.
        params: the refined values by parameter name (a subset of ``source``'s).
        value: the loss measured at them (finite).
        source: the trial whose start was refined (its distributions define the space);
            its number is stored as the user attribute ``refined_from``.

    Cost: one ``study.add_trial`` (no training, no product); the sampler's later
    suggestions cost what one more trial costs it (TPE: Bergstra, Bardenet, Bengio & Kégl,
    *Algorithms for Hyper-Parameter Optimization*, NeurIPS 2011).

    Raises:
        ValueError: a name ``source`` did not suggest, or a non-finite value (or
            numeric parameter); raised before the study changes.
        ArgumentTypeError: ``value`` is not a real number (a bool, a string, a tensor of
            several elements), or a numeric parameter is not one; raised before too.
    """
    if not isinstance(params, Mapping):
        raise ArgumentTypeError(f"`params` must map names to values, got {type(params).__name__}.")
    dists = dict(source.distributions)
    unknown = sorted(set(params) - set(dists))
    if unknown:
        raise ValueError(f"`params` names {unknown} that trial {source.number} did not suggest.")
    value = as_real(value, "value", " Pass the loss measured at `params` (a float).")
    if not math.isfinite(value):
        raise ValueError(f"`value` must be finite, got {value}.")
    values = dict(source.params)
    for name, v in params.items():
        values[name] = _into(dists[name], v, name)
    trial = optuna.trial.create_trial(
        params=values, distributions=dists, value=value, user_attrs={REFINED_FROM: source.number}
    )
    study.add_trial(trial)


def _into(dist: Any, value: Any, name: str) -> Any:
    """``value`` as a number inside a float or int distribution (clipped, on its grid)."""
    numeric = (optuna.distributions.FloatDistribution, optuna.distributions.IntDistribution)
    if not isinstance(dist, numeric):
        return value  # categorical: Optuna checks the choice
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"params[{name!r}] must be a number, got {value!r}.")
    v = float(value)
    if not math.isfinite(v):  # clipping would turn a diverged value into a bound
        raise ValueError(f"params[{name!r}] must be finite, got {v}.")
    step = getattr(dist, "step", None)
    if step is not None:  # int distributions have step 1
        v = dist.low + round((v - dist.low) / step) * step
    v = min(max(v, dist.low), dist.high)
    return int(round(v)) if isinstance(dist, numeric[1]) else v
