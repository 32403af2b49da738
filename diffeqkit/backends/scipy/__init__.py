"""The SciPy backend: `scipy.integrate` solvers driven step by step (`_solve`), and
gradients by sensitivity and adjoint ODEs whose Jacobian products of f come from
JAX, PyTorch or ``prob.jac`` (`_autodiff`). The sensealg table is
`_backend.SENSEALGS`; importing this package imports neither JAX nor PyTorch.
"""

from __future__ import annotations

from ._autodiff import finite_difference_jacobians
from ._backend import SENSEALGS, ScipyBackend
from ._solve import ALGS

__all__ = [
    "ALGS",
    "BACKEND",
    "SENSEALGS",
    "ScipyBackend",
    "finite_difference_jacobians",
]

BACKEND = ScipyBackend()
