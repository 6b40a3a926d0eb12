"""hypergrad 0.0.1's module layout on this package's core.

Replace ``hypergrad.`` by ``hypergradient.compat.hypergrad.`` in the imports:

- ``approx_hypergrad``: ``conjugate_gradient``, ``neumann``, ``nystrom`` (hypergradients
  with hypergrad's signatures; textbook CG) and the ``implicit_grad`` decorator;
- ``solver``: ``BaseSolver``, ``BaseImplicitSolver``, ``ForwardOutput``, ``Recorder``;
- ``optimizers``: ``diff_sgd``;
- ``utils``: ``Params``, ``Objective``, ``hvp``, ``foreach``, ``vector_to_params``;
- ``functorch``: the part of ``functorch`` hypergrad's code uses, on ``torch.func``
  (``import functorch`` -> ``from hypergradient.compat.hypergrad import functorch``).

Nothing here imports ``functorch`` or ``torchvision``. The differences are listed in
``docs/migration-hypergrad.md``.
"""

from . import approx_hypergrad, functorch, optimizers, solver, utils
from .approx_hypergrad import conjugate_gradient, implicit_grad, neumann, nystrom

__all__ = [
    "approx_hypergrad",
    "conjugate_gradient",
    "functorch",
    "implicit_grad",
    "neumann",
    "nystrom",
    "optimizers",
    "solver",
    "utils",
]
