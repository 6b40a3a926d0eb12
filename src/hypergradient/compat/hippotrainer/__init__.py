"""HippoTrainer 1.0.0's API on this package's core, with correct hypergradients.

Replace ``from hippotrainer import HyperOptimizer, T1T2, Neumann, HOAG, DRMAD`` with
``from hypergradient.compat.hippotrainer import ...``. The constructors
``(hyperparams, hyper_lr=1e-3, inner_steps=1, model=None, optimizer=None,
train_loader=None, val_loader=None, criterion=None)`` and the methods' arguments
(``num_terms``; ``epsilon``, ``cg_max_iter``; ``weight_decay``, ``T``) are the same, and so
are the training loop::

    for inputs, targets in train_loader:
        loss = criterion(model(inputs), targets)
        loss.backward()
        hyper_optimizer.step(loss)
        hyper_optimizer.zero_grad()

the hook ``hyper_grad(train_loss, val_loss)`` and the public helpers
(``Neumann.approx_inverse_hvp``, ``HOAG.conjugate_gradient``,
``HOAG.hessian_vector_product``, ``DRMAD.w0``/``wT``, a differentiable ``evaluate()``).

As in HippoTrainer, the hyperparameters enter through ``model`` or ``criterion``, which
hold them by reference. A value derived from a hyperparameter must be computed inside the
criterion's ``forward`` (``self.theta.exp()``); one computed once before training
(``lambd = theta.exp()``, as HippoTrainer's demo does: it is then never tuned) is refused
at construction. The differences, all deliberate, are listed in
``docs/migration-hippotrainer.md``: correct hypergradients (HippoTrainer's Neumann rescales
its partial sum at every term and its DRMAD ignores the hyperparameters' influence on the
training gradient; Neumann and HOAG include the optimizer's L2 ``weight_decay`` in the
Hessian), T1T2 keeps the learning-rate factor, a hyper-step uses one fresh
training and one fresh validation batch (the validation loss in eval mode, as
``evaluate()`` scores it; the model's buffers untouched), T1T2 takes each param group's
learning rate, arguments are validated, and non-finite values raise instead of being
applied.
"""

from .base import HyperOptimizer
from .drmad import DRMAD
from .methods import HOAG, T1T2, Neumann

__all__ = ["DRMAD", "HOAG", "HyperOptimizer", "Neumann", "T1T2"]
