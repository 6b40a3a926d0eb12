"""Backward passes without ``torch.autograd.grad``'s Python layer: the same results, sooner.

Before the engine starts, ``torch.autograd.grad`` normalizes its arguments, looks for
``__torch_function__`` overrides and checks each ``grad_outputs`` entry against its output
through ``torch.fx``'s symbolic-shape helpers (``_make_grads``): 25-40 us per call on the
CPU, where one Hessian-vector product of a 31-parameter logistic regression takes about
80 us in the engine. :func:`grad` runs the engine as ``torch.autograd.grad`` does
(``torch.autograd.graph._engine_run_backward``: the same gradients bit for bit, and the same
logging and context handling) after the checks that matter for the tensors given, and
hands everything else to ``torch.autograd.grad`` itself: a tensor subclass or a
``__torch_function__`` mode, a ``grad_outputs`` entry whose shape or complexity differs
from its output's (torch's message), an implicit gradient of a non-scalar or
non-floating output, a torch without that function (before 2.3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.overrides import has_torch_function

__all__ = ["DIRECT", "grad"]

_RUN = getattr(torch.autograd.graph, "_engine_run_backward", None)


def _works() -> bool:
    """Whether ``_RUN`` (a private function of torch's) takes the arguments :func:`grad`
    passes and returns the gradient, checked once on a two-entry graph: a torch whose
    function changed falls back to ``torch.autograd.grad`` instead of failing."""
    if _RUN is None:
        return False
    try:
        x = torch.ones(2, requires_grad=True)
        y = (x * x).sum()
        (g,) = _RUN((y,), (torch.ones_like(y),), False, False, (x,), True, accumulate_grad=False)
        return isinstance(g, Tensor) and torch.equal(g, 2 * x.detach()) and x.grad is None
    except Exception:  # any failure: torch.autograd.grad does the work
        return False


#: Whether :func:`grad` can run the engine itself (plain tensors then never go through
#: ``torch.autograd.grad``, whose first call with ``grad_outputs`` imports ``sympy``).
DIRECT = _works()


def _fits(outputs: tuple[Tensor, ...], grads: tuple[Tensor, ...]) -> bool:
    """Whether each gradient has its output's shape and complexity (torch's checks)."""
    for out, g in zip(outputs, grads):
        if out.shape != g.shape or out.dtype.is_complex != g.dtype.is_complex:
            return False
    return True


def _ones(outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
    """The implicit ``grad_outputs`` of scalar floating outputs that require grad (ones, as
    torch makes them); None for any other output (torch decides)."""
    for out in outputs:
        if not (out.requires_grad and out.numel() == 1 and out.dtype.is_floating_point):
            return None
    return tuple(torch.ones_like(out, memory_format=torch.preserve_format) for out in outputs)


def grad(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor] | None = None,
    *,
    retain_graph: bool = True,
    create_graph: bool = False,
) -> tuple[Tensor, ...]:
    """``torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=retain_graph,
    create_graph=create_graph, allow_unused=True)`` for tensors (not GradientEdges); as
    there, an input the outputs do not depend on gets None."""
    outs, ins = tuple(outputs), tuple(inputs)
    run = _RUN
    if DIRECT and run is not None and outs and ins:
        if grad_outputs is None:
            grads = _ones(outs)
        else:
            grads = tuple(grad_outputs)
            grads = grads if len(grads) == len(outs) and _fits(outs, grads) else None
        if grads is not None and not has_torch_function(outs + ins + grads):
            return run(outs, grads, retain_graph, create_graph, ins, True, accumulate_grad=False)
    return torch.autograd.grad(
        outs,
        ins,
        None if grad_outputs is None else tuple(grad_outputs),
        retain_graph=retain_graph,
        create_graph=create_graph,
        allow_unused=True,
    )
