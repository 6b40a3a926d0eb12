"""Drop-in replacements for the APIs of the two libraries this project grew from.

- :mod:`hypergradient.compat.hypergrad`: the functional API of ``hypergrad`` 0.0.1
  (``from hypergrad.approx_hypergrad import conjugate_gradient, neumann, nystrom``).
- :mod:`hypergradient.compat.hippotrainer`: HippoTrainer 1.0.0's ``HyperOptimizer`` and its
  ``T1T2``, ``Neumann``, ``HOAG`` and ``DRMAD``.

Each keeps the original call shapes and return types and runs on the core of this
package, with correct mathematics.
"""
