"""The order of T1T2's mixed product: parameters first or hyperparameters first.

The mixed product ``(d_phi grad_theta f)^T x`` is one second derivative, so it can be taken
in either order (the mixed partials of a twice-differentiable ``f`` commute):

* **parameters first** (``"params"``): ``grad_theta f`` with its graph (a backward pass over
  all of ``f``'s graph, recorded), then the gradient of ``<grad_theta f, x>`` with respect
  to ``phi`` (autograd only runs the nodes on a path to ``phi``);
* **hyperparameters first** (``"hparams"``): ``grad_phi f`` with its graph (autograd only
  runs the nodes on a path from ``f`` to ``phi``), then its derivative along ``x``,
  ``d/de grad_phi f(theta + e x)``, by the double-backward identity
  ``d/du <grad_theta <grad_phi f, u>, x> = (d grad_phi f / d theta) x`` (two backward
  passes over ``grad_phi f``'s graph, linear in the dummy ``u``).

When ``phi`` enters ``f`` through a term of its own (a weight-decay penalty, per weight or
per layer, whatever the network), ``grad_phi f`` and its graph are a few elementwise
operations: the hyperparameters-first order skips the recorded backward pass over the
network, and the look-ahead costs ``f``'s forward pass plus the outer gradient (on the
MNIST-sized MLP of ``benchmarks/hyperstep_cost.py``, equal batches: a hand-written floor of
1.42-1.44 training steps, a ``HyperOptimizer`` hyper-step of 1.89-1.97, 2.28 parameters
first).
When ``phi`` enters next to the loss (per-example weights) both orders run one recorded
backward and one double backward over the network: a tie. When ``phi`` enters at the input
(augmentation), the hyperparameters-first order runs one double backward more.
:func:`on_path_share` measures which case a problem is: the share of ``f``'s autograd nodes
on a path to ``phi``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..operators.graph import SYMBOLIC_SHAPES
from ..operators.modes import delayed_error_in

__all__ = ["HPARAMS_FIRST_SHARE", "MIXED_ORDERS", "grad_along", "hparams_first", "on_path_share"]

#: The orders :class:`~hypergradient.T1T2` accepts for ``mixed=``.
MIXED_ORDERS = ("auto", "params", "hparams")

#: ``"auto"`` takes the hyperparameters first when at most this share of ``f``'s autograd
#: nodes lies on a path to the hyperparameters (a penalty term: a few nodes out of the
#: network's; per-example weights: the loss's reduction; input augmentation: nearly all).
HPARAMS_FIRST_SHARE = 0.5


def on_path_share(root: Any, targets: Sequence[Tensor]) -> float:
    """The share of the autograd nodes reachable from ``root`` (a ``grad_fn``) from which
    one of the leaves ``targets`` is reachable: the part of the graph a backward pass to
    ``targets`` runs. 1.0 when ``root`` is None (no graph to share).

    Cost: one walk over the graph's nodes in Python (no tensor operation)."""
    if root is None:
        return 1.0
    wanted = {id(t) for t in targets}
    reaches: dict[Any, bool] = {}
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if node in reaches and not expanded:
            continue
        children = [c for c, _ in getattr(node, "next_functions", ()) if c is not None]
        if expanded:
            leaf = getattr(node, "variable", None)
            hit = leaf is not None and id(leaf) in wanted
            reaches[node] = hit or any(reaches.get(c, False) for c in children)
            continue
        reaches.setdefault(node, False)  # visited (a cycle-free graph: set again below)
        stack.append((node, True))
        stack.extend((c, False) for c in children if c not in reaches)
    return sum(reaches.values()) / len(reaches)


def _dot(outputs: Sequence[Tensor], vectors: Sequence[Tensor]) -> Tensor:
    """``sum_i <outputs_i, vectors_i>`` as one scalar (no ``grad_outputs``: they import
    sympy on a cold start)."""
    dot = (outputs[0] * vectors[0]).sum()
    for o, v in zip(outputs[1:], vectors[1:]):
        dot = dot + (o * v).sum()
    return dot


def grad_along(
    outputs: Sequence[Tensor], wrt: Sequence[Tensor], vectors: Sequence[Tensor], **kw: Any
) -> tuple[Tensor | None, ...]:
    """``d/d wrt sum_i <outputs_i, vectors_i>`` (None for a leaf with no path): one
    backward pass, with ``grad_outputs`` only once sympy is imported anyway."""
    if SYMBOLIC_SHAPES in sys.modules:
        return torch.autograd.grad(outputs, wrt, grad_outputs=vectors, allow_unused=True, **kw)
    return torch.autograd.grad(_dot(outputs, vectors), wrt, allow_unused=True, **kw)


def _along(
    outs: list[Tensor], params: Sequence[Tensor], x: Sequence[Tensor]
) -> list[Tensor | None] | None:
    """``(d outs / d theta) x`` per output by the double-backward identity (None: a
    once-differentiable function on the way)."""
    u = [torch.zeros_like(o, requires_grad=True) for o in outs]
    s = grad_along(outs, list(params), u, create_graph=True)
    pairs = [(t, v) for t, v in zip(s, x) if t is not None and t.requires_grad]
    if delayed_error_in([t for t, _ in pairs]):
        return None
    if not pairs:
        return [None] * len(outs)
    return list(grad_along([t for t, _ in pairs], u, [v for _, v in pairs]))


def hparams_first(
    f: Tensor, params: Sequence[Tensor], hparams: Sequence[Tensor], x: Sequence[Tensor]
) -> list[Tensor | None] | None:
    """``(d_phi grad_theta f)^T x`` per hyperparameter leaf, hyperparameters first.

    Args:
        f: the scalar inner loss at ``params`` and ``hparams`` (with its graph).
        params: the parameter leaves ``theta``.
        hparams: the hyperparameter leaves ``phi``.
        x: the vector, one tensor per parameter leaf (its dtype).

    Returns:
        The products (None for a leaf ``grad_theta f`` does not depend on: no path, as the
        parameters-first order says); None when a once-differentiable function is on the
        way (the caller falls back, as for the parameters-first order).
    """
    gh = torch.autograd.grad(f, list(hparams), create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(gh) if g is not None and g.requires_grad]
    outs = [gh[i] for i in live]
    if delayed_error_in(outs):
        return None
    mixed: list[Tensor | None] = [None] * len(hparams)
    made = _along(outs, params, x) if live else []
    if made is None:
        return None
    for i, m in zip(live, made):
        mixed[i] = m
    return mixed
