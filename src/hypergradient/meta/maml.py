"""MAML (Finn, Abbeel & Levine, 2017): meta-gradients through the adaptation steps."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import _tree
from .._tree import Tree, TreeSpec
from .._vocab import NonFiniteHypergradientError, as_bool, as_optional_int, require_finite
from ..methods.growth import quiet
from ..methods.unrolled import unrolled
from ..optim.functional import FunctionalOptimizer
from ._common import (
    LossFn,
    Task,
    adapt,
    constant_settings,
    descend,
    gradient,
    require_finite_phi,
)
from .base import MetaLearner
from .info import BatchResult, MetaInfo, info_value
from .modules import relay_warnings
from .tasks import TaskBatch

__all__ = ["MAML", "in_meta_terms", "maml_step"]


class MAML(MetaLearner):
    """MAML (Finn et al., 2017): meta-gradient through ``inner_steps`` adaptation steps.

    For a task ``(support, query)``: ``phi_0 = theta``, ``inner_steps`` steps of gradient
    descent (``inner_lr``) or of ``inner_optimizer`` on the support loss give ``phi_K``, and
    the meta-gradient is ``d L_Q(phi_K) / d theta``:

    - ``first_order=False`` (default): exact, second order, by reverse mode through the
      ``K`` steps with :func:`hypergradient.unrolled`. ``unrolled`` differentiates with
      respect to its hyperparameters only (its starting point is a constant), so the
      initialization becomes one by the change of variables ``phi = theta + delta``: the
      run trains ``delta`` from ``delta_0 = 0`` on ``L_S(theta + delta)``, whose gradient in
      ``delta`` is ``grad L_S(phi)``, so ``theta + delta_k`` is exactly the trajectory above
      (for SGD, momentum and Adam alike). For plain gradient descent the meta-gradient is
      ``prod_{k=K-1..0} (I - alpha H_k) grad L_Q(phi_K)``, ``H_k`` the support Hessian at
      ``phi_k``. Cost: ``K`` forward steps and ``K`` reverse steps (a ``torch.func.vjp`` of
      one step each, about 3-4 gradients); memory ``K`` states (``checkpoint_every=c``:
      about ``K/c + c``).
    - ``first_order=True``: first-order MAML, ``grad L_Q(phi_K)`` (the Hessians are
      dropped). Cost ``K + 1`` gradients; memory O(P).

    Args:
        model_or_loss: ``loss_fn(params, batch) -> scalar`` or an ``nn.Module``. For the
            second-order meta-gradient it must work under ``torch.func`` transforms (no
            in-place updates of its inputs; ``functional_call`` is fine).
        inner_steps: ``K`` (>= 1).
        inner_lr / inner_optimizer: plain gradient descent of step ``inner_lr``, or
            ``hg.optim.sgd(...)`` / ``hg.optim.adam(...)`` (without weight decay); exactly one.
        first_order: first-order MAML.
        checkpoint_every: passed to :func:`hypergradient.unrolled` (>= 1, or None).
        vectorize: in :meth:`step`, run the meta-batch as one
            :class:`~hypergradient.meta.StackedTasks` problem (equal batch shapes, a
            ``vmap``-compatible loss): ``phi_b = theta + delta_b``, inner loss
            ``sum_b L_S(phi_b)``, outer loss ``mean_b L_Q(phi_b)``, one ``unrolled`` call.
            Each ``delta_b`` sees only its own task's gradient and the optimizers are
            elementwise, so this is exactly the mean of the per-task meta-gradients, with
            ``B`` times fewer Python-level calls.
        criterion: loss on the module's outputs (``nn.Module`` only; default MSE).

    Reference: C. Finn, P. Abbeel, S. Levine, "Model-Agnostic Meta-Learning for Fast
    Adaptation of Deep Networks", ICML 2017.
    """

    def __init__(
        self,
        model_or_loss: nn.Module | LossFn,
        *,
        inner_steps: int,
        inner_lr: float | None = None,
        inner_optimizer: FunctionalOptimizer | None = None,
        first_order: bool = False,
        checkpoint_every: int | None = None,
        vectorize: bool = False,
        criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
    ):
        super().__init__(
            model_or_loss,
            inner_steps=inner_steps,
            inner_lr=inner_lr,
            inner_optimizer=inner_optimizer,
            vectorize=vectorize,
            criterion=criterion,
        )
        self.first_order = as_bool(first_order, "first_order")
        self.checkpoint_every = as_optional_int(checkpoint_every, "checkpoint_every", min=1)

    @property
    def method(self) -> str:
        return "fomaml" if self.first_order else "maml"

    def config(self) -> dict[str, Any]:
        return {
            "inner_steps": self.inner_steps,
            "inner_optimizer": self.inner_optimizer,
            "first_order": self.first_order,
            "checkpoint_every": self.checkpoint_every,
            "vectorize": self.vectorize,
        }

    def adapt(self, meta_params: Tree, support: Any) -> Tree:
        """``phi_K``: ``inner_steps`` optimizer steps on the support loss from ``theta``."""
        return adapt(
            self.loss_fn,
            meta_params,
            support,
            steps=self.inner_steps,
            optimizer=self.inner_optimizer,
        )

    def batch_gradient(self, theta: list[Tensor], spec: TreeSpec, batch: TaskBatch) -> BatchResult:
        """Mean MAML meta-gradient of ``batch``'s tasks, and their adapted parameters."""
        start = batch.start(theta)
        if not self.first_order:
            grad, phi = self._through_the_steps(theta, spec, batch, start)
            return BatchResult(grad, phi, "unrolled")
        phi = descend(batch.support_loss, start, spec, self.inner_steps, self.inner_optimizer)
        require_finite_phi(phi, spec)
        g, value = gradient(batch.query_loss, phi, spec)
        require_finite(
            g,
            spec.paths,
            "The gradient of the query loss with respect to the adapted",
            "Check the query batches and loss_fn.",
        )
        if not math.isfinite(float(value)):  # finite phi and gradient, overflowed loss
            raise NonFiniteHypergradientError(
                f"The query loss at the adapted parameters is not finite ({float(value)}): "
                "the adaptation on the support batches diverged. Lower inner_lr (or the "
                "inner optimizer's lr) or inner_steps, or check the support batches.",
                "the query loss at the adapted parameters",
            )
        return BatchResult(batch.reduce(g), phi, "first_order")

    def _through_the_steps(
        self, theta: list[Tensor], spec: TreeSpec, batch: TaskBatch, start: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """``d query_loss(theta + delta_K) / d theta`` by ``hg.unrolled``, and ``phi_K``."""

        def shifted(delta: Tree, h: Tree) -> Tree:
            d, _ = _tree.flatten(delta, "delta")
            t, _ = _tree.flatten(h, "theta")
            return _tree.unflatten(spec, [a + b for a, b in zip(t, d)])

        def inner(delta: Tree, h: Tree) -> Tensor:
            return batch.support_loss(shifted(delta, h))

        def outer(delta: Tree, h: Tree) -> Tensor:
            return batch.query_loss(shifted(delta, h))

        delta0 = _tree.unflatten(spec, [torch.zeros_like(t) for t in start])
        with quiet():  # a diverged adaptation is reported per task by the driver
            grad, info = relay_warnings(
                lambda: unrolled(
                    inner,
                    outer,
                    delta0,
                    _tree.unflatten(spec, theta),
                    self.inner_steps,
                    constant_settings(self.inner_optimizer),
                    checkpoint_every=self.checkpoint_every,
                    return_info=True,
                ),
                in_meta_terms,
            )
        delta_K, _ = _tree.flatten(info_value(info, "params"), "delta")
        phi = [t + d.detach() for t, d in zip(theta, delta_K)]
        return [g.detach() for g in _tree.flatten(grad, "grad")[0]], phi


_UNUSED = re.compile(r"hparams(\S*) influences the outer loss neither directly nor through")


def in_meta_terms(message: str) -> str:
    """``hg.unrolled``'s warning that a hyperparameter is unused, in ``hg.meta``'s words
    (its fix named ``hparams`` and ``hparams_by_reference``, arguments MAML does not have)."""
    match = _UNUSED.match(message)
    if match is None:
        return message
    return (
        f"meta_params{match.group(1)} is read by loss_fn on neither the support nor the "
        "query batches: its meta-gradient is zero and it is never meta-trained. Check "
        "that loss_fn uses it, or leave it out of meta_params."
    )


def maml_step(
    model_or_loss: nn.Module | LossFn,
    meta_params: Tree,
    tasks: Sequence[Task],
    *,
    inner_steps: int,
    inner_lr: float | None = None,
    inner_optimizer: FunctionalOptimizer | None = None,
    first_order: bool = False,
    checkpoint_every: int | None = None,
    vectorize: bool = False,
    criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> tuple[Tree, MetaInfo]:
    """Mean MAML meta-gradient over ``tasks`` (pairs ``(support, query)``).

    ``MAML(model_or_loss, inner_steps=..., ...).step(meta_params, tasks)``; see
    :class:`MAML` for the mathematics, the arguments and the cost. Returns
    ``(meta_gradient, info)``: the gradient has the structure of ``meta_params``.
    """
    return MAML(
        model_or_loss,
        inner_steps=inner_steps,
        inner_lr=inner_lr,
        inner_optimizer=inner_optimizer,
        first_order=first_order,
        checkpoint_every=checkpoint_every,
        vectorize=vectorize,
        criterion=criterion,
    ).step(meta_params, tasks)
