"""Meta-learning: MAML and iMAML meta-gradients from the library's hypergradient machinery.

Gradient-based meta-learning learns an initialization ``theta`` (the *meta-parameters*)
from which a few steps of training on a new task's small *support* set give a model that
does well on the task's *query* set. Each task is a bilevel problem whose inner problem is
the adaptation and whose outer loss is the query loss; the meta-gradient is its
hypergradient with respect to ``theta``, averaged over a meta-batch of tasks.

Two meta-gradients are provided, each as a small class and a one-call function:

- :class:`MAML` / :func:`maml_step` (Finn, Abbeel & Levine, 2017): ``phi_0 = theta``,
  ``phi_{k+1} = phi_k - alpha grad L_S(phi_k)``, meta-loss ``L_Q(phi_K)``, differentiated
  exactly (second order) through the ``K`` steps with :func:`hypergradient.unrolled`, or
  to first order (``first_order=True``: ``grad L_Q(phi_K)``).
- :class:`IMAML` / :func:`imaml_step` (Rajeswaran, Finn, Kakade & Levine, 2019):
  ``phi* = argmin L_S(phi) + lam/2 ||phi - theta||^2`` and the meta-gradient
  ``(I + H / lam)^{-1} grad L_Q(phi*)`` from :func:`hypergradient.implicit`.

Tasks and losses
----------------
A task is a pair ``(support, query)`` of batches. The loss is either a callable
``loss_fn(params, batch) -> scalar tensor`` on a tree of tensors ``params`` (a tensor, a
tuple/list or a dict of tensors), or an ``nn.Module``: then ``batch = (inputs, targets)``
and the loss is ``criterion(torch.func.functional_call(model, params, (inputs,)), targets)``
(``criterion`` defaults to the mean squared error; :func:`module_loss`). Meta-gradients
have the structure, shapes and dtypes of ``meta_params`` and are detached; nothing passed
in is modified.

Task batches
------------
Both algorithms are written once, against :class:`TaskBatch`: ``n`` tasks posed as one
block-separable problem (support loss summed over the tasks, query loss averaged), whose
meta-gradient is the mean of the per-task ones. :class:`SingleTask` holds one task;
:class:`StackedTasks` stacks ``B`` tasks along a leading dimension and evaluates the loss
under ``torch.func.vmap``. ``vectorize=False`` runs a meta-batch as ``B`` single tasks,
``vectorize=True`` as one stack (batches of equal shapes, a ``vmap``-compatible loss): one
inner loop and one reverse pass (MAML) or one linear solve (iMAML) for the whole batch,
several times faster for small models. For MAML both give the same mean; for iMAML too
when the solver converges (with a fixed budget, a joint solve is a different
approximation).

Cost per task, in gradient evaluations of the loss on one batch (P parameters):

==================  =======================================  ================================
method              time                                      memory
==================  =======================================  ================================
MAML (2nd order)    K forward + K reverse steps (~3-4 each)   K stored states (K x P numbers)
first-order MAML    K + 1                                     O(P)
iMAML               inner_steps + k (solver products) + 4     O(P) + one double-backward graph
==================  =======================================  ================================

A typical meta-training loop (it trains the module's own parameters:
:func:`parameters_of` returns them, detached; ``parameters_of(model, copy=True)`` returns
an independent copy instead)::

    theta = hg.meta.parameters_of(model)
    opt = torch.optim.Adam(theta.values(), lr=1e-3)
    imaml = hg.meta.IMAML(model, lam=1.0, inner_steps=20, inner_lr=0.01,
                          solver=hg.CG(maxiter=5), vectorize=True)
    for tasks in meta_batches:                  # lists of ((x_s, y_s), (x_q, y_q))
        grad, info = imaml.step(theta, tasks)
        for k in theta:
            theta[k].grad = grad[k]
        opt.step()                              # model.parameters() move
"""

from ._common import adapt
from .base import MetaLearner
from .imaml import IMAML, imaml_step
from .info import MetaInfo, TaskInfo
from .maml import MAML, maml_step
from .modules import module_loss, parameters_of
from .tasks import SingleTask, StackedTasks, TaskBatch, task_batches

__all__ = [
    "IMAML",
    "MAML",
    "MetaInfo",
    "MetaLearner",
    "SingleTask",
    "StackedTasks",
    "TaskBatch",
    "TaskInfo",
    "adapt",
    "imaml_step",
    "maml_step",
    "module_loss",
    "parameters_of",
    "task_batches",
]
