"""``hypergrad.approx_hypergrad`` 0.0.1's functions, with its signatures, on this package's core.

The functions take ``(inner_obj, outer_obj, in_params, out_params, ...)`` where the
objectives are ``f(in_params, out_params) -> scalar`` and both parameter sets are tuples of
tensors, and return a tuple of tensors shaped like ``out_params``: the hypergradient
``d_phi g - (d_phi grad_theta f)^T x`` with ``x ~ H^{-1} grad_theta g`` (``hg.implicit``
with the matching solver). Differences, all deliberate:

- ``conjugate_gradient`` is textbook conjugate gradient on ``H x = grad_theta g``
  (``hg.CG``). hypergrad builds each new direction from the previous residual and divides
  the step by ``lr`` (then rescales by ``lr``): that is not conjugate gradient, and it
  returns hypergradients 5-22x too large on its own logistic-regression example (see
  ``docs/migration-hypergrad.md``). ``lr`` is accepted and does not change the solution.
- ``neumann`` is the same series as hypergrad's, ``lr * sum_{j=0}^{k} (I - lr H)^j b`` with
  ``k = num_iters`` products (``hg.Neumann``), each one backward pass through a retained
  graph instead of a fresh forward-over-reverse pass.
- ``nystrom`` samples ``rank`` Hessian columns with ``torch.randperm`` from torch's global
  generator's stream as hypergrad does (the same columns after the same seed, and the
  global stream moves on by the same draw), and solves ``(H_nys + rho I) x = b`` in a
  numerically stable eigen form instead of the subtractive Woodbury formula
  (``hg.Nystrom``).
- Arguments are validated (``num_iters``, ``rank`` >= 1; ``lr``, ``rho`` > 0).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ... import CG, HessianOperator, HypergradientWarning, Neumann, Nystrom, Solver, implicit
from ..._tree import accumulator_dtype, cat
from ..._tree import flatten as flatten_tree
from ..._vocab import ArgumentTypeError, as_callable, as_float, as_int
from ...methods.replay import rng_state
from .utils import Objective, Params

__all__ = ["conjugate_gradient", "implicit_grad", "neumann", "nystrom"]


def as_params(value: Any, name: str) -> Params:
    """``value`` (a tuple, list or generator of tensors) as hypergrad's ``Params`` tuple.

    Raises:
        ArgumentTypeError: a bare tensor (``tuple()`` would split it into rows), or
            anything else than a non-empty sequence of tensors.
    """
    fix = f"pass a tuple of tensors, e.g. `{name}=(w,)` or `tuple(model.parameters())`"
    if isinstance(value, Tensor):
        raise ArgumentTypeError(f"`{name}` must be a tuple of tensors, got one Tensor; {fix}.")
    try:
        params = tuple(value)
    except TypeError:
        raise ArgumentTypeError(
            f"`{name}` must be a tuple of tensors, got {type(value).__name__}; {fix}."
        ) from None
    if not params or not all(isinstance(p, Tensor) for p in params):
        got = "nothing" if not params else [type(p).__name__ for p in params]
        raise ArgumentTypeError(f"`{name}` must be a non-empty tuple of tensors, got {got}.")
    return params


def _run(
    inner_obj: Objective,
    outer_obj: Objective,
    in_params: Params,
    out_params: Params,
    s: Solver,
    residual: bool = False,
) -> Params:
    as_callable(inner_obj, "inner_obj", "(in_params, out_params) -> scalar tensor")
    as_callable(outer_obj, "outer_obj", "(in_params, out_params) -> scalar tensor")
    in_params, out_params = as_params(in_params, "in_params"), as_params(out_params, "out_params")
    # hypergrad differentiates mid-training by design: no stationarity warning. CG reports
    # its residual and Neumann stops at a growing term, so their answers are never worse
    # than x = 0 unnoticed; Nystrom's one-shot inverse has no such test: `residual` spends
    # one product on ||b - H x||, which warns when the answer is worse than x = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HypergradientWarning)
        hyper = implicit(
            inner_obj,
            outer_obj,
            in_params,
            out_params,
            s,
            stationarity=None,
            residual=residual,
        )
    for w in caught:  # in hypergrad's names, at the caller's line (stacklevel: user -> fn -> _run)
        text = str(w.message)
        if issubclass(w.category, HypergradientWarning):
            text = text.replace("hparams[", "out_params[").replace(
                "inner_loss or outer_loss", "inner_obj or outer_obj"
            )
        warnings.warn(text, w.category, stacklevel=3)
    return tuple(hyper)


def conjugate_gradient(
    inner_obj: Objective,
    outer_obj: Objective,
    in_params: Params,
    out_params: Params,
    num_iters: int,
    lr: float = 1.0,
) -> Params:
    """Implicit hypergradient with ``num_iters`` conjugate-gradient iterations (``hg.CG``).

    Args:
        inner_obj, outer_obj: ``f(in_params, out_params) -> scalar tensor``.
        in_params: inner parameters (tuple of tensors) at the inner optimum.
        out_params: hyperparameters (tuple of tensors).
        num_iters: CG iterations (Hessian-vector products), >= 1.
        lr: accepted for hypergrad's call shape; the solution of ``H x = grad_theta g``
            does not depend on a step size.

    Returns:
        The hypergradient, a tuple shaped like ``out_params``. Cost: ``num_iters`` products
        plus about three gradients (Pedregosa, 2016).
    """
    as_float(lr, "lr", min=0.0, open_min=True)
    num_iters = as_int(num_iters, "num_iters", min=1)
    return _run(inner_obj, outer_obj, in_params, out_params, CG(num_iters, tol=0.0))


def neumann(
    inner_obj: Objective,
    outer_obj: Objective,
    in_params: Params,
    out_params: Params,
    num_iters: int,
    lr: float,
) -> Params:
    """Implicit hypergradient with the series ``lr * sum_{j<=num_iters} (I - lr H)^j``.

    Lorraine et al. (2020). Converges when ``0 < lr < 2 / lambda_max(H)``. Cost:
    ``num_iters`` Hessian-vector products plus about three gradients.
    """
    lr = as_float(lr, "lr", min=0.0, open_min=True)
    num_iters = as_int(num_iters, "num_iters", min=1)
    return _run(inner_obj, outer_obj, in_params, out_params, Neumann(num_iters, alpha=lr))


def nystrom(
    inner_obj: Objective,
    outer_obj: Objective,
    in_params: Params,
    out_params: Params,
    rank: int,
    rho: float,
) -> Params:
    """Implicit hypergradient with a rank-``rank`` column-sampling Nystrom approximation.

    Hataya & Yamada (2023): ``H^{-1} ~ (H_nys + rho I)^{-1}``; ``rank`` products, memory
    ``rank`` vectors of the parameters' size, and one more product for the residual
    ``||b - H x||``: an answer worse than ``x = 0`` (``rho`` or the rank wrong for the
    spectrum) comes with a ``HypergradientWarning``, where hypergrad says nothing.
    """
    rank = as_int(rank, "rank", min=1)
    rho = as_float(rho, "rho", min=0.0, open_min=True)
    in_params, out_params = as_params(in_params, "in_params"), as_params(out_params, "out_params")
    device = in_params[0].device
    columns = _global_stream(device)
    torch.randperm(sum(p.numel() for p in in_params), device=device)  # moves on as hypergrad's
    solver = Nystrom(rank, rho, generator=columns)
    return _run(inner_obj, outer_obj, in_params, out_params, solver, residual=True)


def _global_stream(device: torch.device) -> torch.Generator:
    """A generator in the state of torch's global one for ``device``: the columns the solver
    samples with it (one ``torch.randperm``) are those hypergrad's
    ``torch.randperm(n, device=device)`` draws after the same ``torch.manual_seed``."""
    cpu, accelerator = rng_state(device)
    g = torch.Generator(device=device)
    g.set_state(cpu if accelerator is None else accelerator)
    return g


def implicit_grad(f: Callable[..., tuple[Params, Params]]) -> Callable[..., Params]:
    """hypergrad's decorator: turn ``(ihvp, d_phi g)`` into the implicit hypergradient.

    ``f`` takes ``(inner_obj, outer_obj, in_params, out_params, ...)`` and returns
    ``x ~ H^{-1} grad_theta g`` (a tuple like ``in_params``) and ``d_phi g`` (like
    ``out_params``); the decorated function returns ``d_phi g - (d_phi grad_theta f)^T x``,
    the mixed product taken by one backward pass (``hg.HessianOperator.mixed``).
    """

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Params:
        names = ("inner_obj", "outer_obj", "in_params", "out_params")
        bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        missing = [n for n in names if n not in bound]
        if missing:
            raise TypeError(f"{f.__name__}() is missing {missing}.")
        for key in ("in_params", "out_params"):  # once: a generator is read by f too
            bound[key] = as_params(bound[key], key)
        args = tuple(bound[n] for n in names[: len(args)]) + args[len(names) :]
        kwargs = {k: bound[k] if k in names else v for k, v in kwargs.items()}
        ihvp, direct = f(*args, **kwargs)
        inner, in_params, out_params = bound["inner_obj"], bound["in_params"], bound["out_params"]
        op = HessianOperator(inner, in_params, out_params)
        leaves, spec = flatten_tree(in_params, "in_params")
        x = cat(list(ihvp), spec, accumulator_dtype(leaves), leaves[0].device)
        mixed = op.mixed(x)
        op.release()
        return tuple(d - (0 if m is None else m.to(d.dtype)) for d, m in zip(direct, mixed))

    return wrapper
