"""Drop-in replacements for the APIs of the two libraries this project grew from.

- :mod:`hypergradient.compat.hypergrad`: hypergrad 0.0.1's modules ``approx_hypergrad``
  (``conjugate_gradient``, ``neumann``, ``nystrom``, ``implicit_grad``), ``solver``
  (``BaseSolver``, ``BaseImplicitSolver``), ``optimizers`` (``diff_sgd``) and ``utils``, plus
  the part of ``functorch`` its code uses; no ``functorch`` or ``torchvision`` needed.
- :mod:`hypergradient.compat.hippotrainer`: HippoTrainer 1.0.0's ``HyperOptimizer`` and its
  ``T1T2``, ``Neumann``, ``HOAG`` and ``DRMAD``, with the ``hyper_grad(train_loss,
  val_loss)`` hook and the public helpers.

Each keeps the original call shapes and return types and runs on this package's methods
and solvers, with correct mathematics. Every difference, and what to change, is in
``docs/migration-hypergrad.md`` and ``docs/migration-hippotrainer.md``.
"""
