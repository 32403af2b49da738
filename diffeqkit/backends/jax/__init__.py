"""The JAX backend: diffeqkit's algs on diffrax, compiled once per problem structure.

`_solve` holds the alg table, the step-size controllers and the cached compiled
program; `_backend` the `JaxBackend` and the sensealg table, whose entries live in
`_forward`, `_checkpoint`, `_adjoint` and `_interpolating`; `_inputs` the dtype,
device and conversion of the inputs.
"""

from __future__ import annotations

from ._backend import SENSEALGS, JaxBackend
from ._solve import ALGS

__all__ = ["ALGS", "BACKEND", "SENSEALGS", "JaxBackend"]

BACKEND = JaxBackend()
