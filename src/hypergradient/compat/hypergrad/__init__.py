"""Drop-in for ``hypergrad`` 0.0.1's module layout.

Replace ``from hypergrad.approx_hypergrad import nystrom`` with
``from hypergradient.compat.hypergrad.approx_hypergrad import nystrom``.
"""

from .approx_hypergrad import conjugate_gradient, neumann, nystrom

__all__ = ["conjugate_gradient", "neumann", "nystrom"]
