"""``hypergrad.approx_hypergrad`` 0.0.1's functions, with its signatures, on our core.

The seed library's functions take ``(inner_obj, outer_obj, in_params, out_params, ...)``
where the objectives are ``f(in_params, out_params) -> scalar`` and both parameter sets
are tuples of tensors, and return a tuple of tensors shaped like ``out_params``. These
replacements keep all of that. Differences, all deliberate:

- ``conjugate_gradient`` is textbook conjugate gradient on ``H x = grad_theta g``. The
  seed divides CG's step by ``lr`` and rescales the result by ``lr``, which is not CG for
  ``lr != 1`` and points the wrong way after a few iterations. ``lr`` is accepted for
  compatibility and does not change the solution.
- ``neumann`` is the same series as the seed's, ``lr * sum_{j=0}^{k} (I - lr H)^j b`` with
  ``k = num_iters`` products, where each product is one backward pass through a retained
  graph instead of a fresh forward-over-reverse pass.
- ``nystrom`` samples ``rank`` Hessian columns with ``torch.randperm`` on torch's global
  generator as the seed does, and solves ``(H_nys + rho I) x = b`` in a numerically
  stable eigen form instead of the subtractive Woodbury formula.
- Non-positive ``num_iters`` / ``rank`` / ``rho`` raise ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ...methods import implicit
from ...solvers import CG, Neumann, Nystrom, Solver

Params = tuple[Tensor, ...]
Objective = Callable[[Params, Params], Tensor]

__all__ = ["conjugate_gradient", "neumann", "nystrom"]


def _run(
    inner_obj: Objective, outer_obj: Objective, in_params: Params, out_params: Params, s: Solver
) -> Params:
    result = implicit(inner_obj, outer_obj, tuple(in_params), tuple(out_params), s)
    return tuple(result)


def conjugate_gradient(
    inner_obj: Objective,
    outer_obj: Objective,
    in_params: Params,
    out_params: Params,
    num_iters: int,
    lr: float = 1.0,
) -> Params:
    """Implicit hypergradient with ``num_iters`` conjugate-gradient iterations.

    Args:
        inner_obj, outer_obj: ``f(in_params, out_params) -> scalar tensor``.
        in_params: inner parameters (tuple of tensors) at the inner optimum.
        out_params: hyperparameters (tuple of tensors).
        num_iters: CG iterations (Hessian-vector products), > 0.
        lr: accepted for compatibility; textbook CG has no step size, and the solution of
            ``H x = grad_theta g`` does not depend on it.

    Returns:
        The hypergradient, a tuple shaped like ``out_params``.
    """
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"`lr` must be a number, got {type(lr).__name__}.")
    return _run(inner_obj, outer_obj, in_params, out_params, CG(maxiter=num_iters, tol=0.0))


def neumann(
    inner_obj: Objective,
    outer_obj: Objective,
    in_params: Params,
    out_params: Params,
    num_iters: int,
    lr: float,
) -> Params:
    """Implicit hypergradient with the Neumann series ``lr * sum_{j<=num_iters} (I - lr H)^j``.

    Lorraine et al. (2020). Converges when ``0 < lr < 2 / lambda_max(H)``.
    """
    return _run(inner_obj, outer_obj, in_params, out_params, Neumann(iters=num_iters, alpha=lr))


def nystrom(
    inner_obj: Objective,
    outer_obj: Objective,
    in_params: Params,
    out_params: Params,
    rank: int,
    rho: float,
) -> Params:
    """Implicit hypergradient with a rank-``rank`` column-sampling Nystrom approximation.

    Hataya & Yamada (2023): ``H^{-1} ~ (H_nys + rho I)^{-1}``, ``rank`` products.
    """
    return _run(inner_obj, outer_obj, in_params, out_params, Nystrom(rank=rank, rho=rho))
