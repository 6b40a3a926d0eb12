"""``hypergrad.optimizers`` 0.0.1: ``diff_sgd``, on this package's differentiable SGD."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ...optim import functional as functional_optim
from .utils import Params

__all__ = ["diff_sgd"]


def diff_sgd(
    params: Params,
    grads: Params,
    state: Sequence[Tensor | None] | None,
    weight_decay: float,
    momentum: float,
    lr: float,
    dampening: float = 0,
    nesterov: bool = False,
) -> tuple[Params, tuple[Tensor | None, ...]]:
    """One differentiable step of ``torch.optim.SGD``: ``(params, state) -> (params, state)``.

    ``state`` holds one momentum buffer per parameter (``None`` before its first step, or
    ``state=None``). The update is ``hg.optim.SGD``'s (tested against ``torch.optim``'s);
    nothing is updated in place and nothing is detached, so the step can be differentiated
    with respect to ``params``, ``grads`` and tensor settings. (hypergrad detached the first
    momentum buffer, which cut that step's gradient path.)

    Returns:
        ``(new_params, new_state)``, tuples; ``new_state`` holds ``None`` without momentum.
        The arguments are not modified (as in hypergrad's repository). The release on PyPI
        wrote the new tensors into the ``params`` and ``state`` lists it was given and
        returned those lists; read the returned values instead (``params, state =
        diff_sgd(params, grads, state, ...)``, as hypergrad's examples do).
    """
    params, grads = tuple(params), tuple(grads)
    if len(params) != len(grads):
        raise ValueError(f"{len(params)} params but {len(grads)} grads.")
    buffers = [None] * len(params) if state is None else list(state)
    if len(buffers) != len(params):
        raise ValueError(f"{len(params)} params but {len(buffers)} state entries.")
    opt = functional_optim.sgd(
        lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, dampening=dampening
    )
    new_params, new_state = [], []
    for p, g, buf in zip(params, grads, buffers):
        if not opt.uses_momentum:
            (q,), _ = opt.update([p], [g], [], step=0)
            new_params.append(q)
            new_state.append(buf)
            continue
        step = 0 if buf is None else 1
        (q,), (b,) = opt.update([p], [g], [torch.zeros_like(p) if buf is None else buf], step)
        new_params.append(q)
        new_state.append(b)
    return tuple(new_params), tuple(new_state)
