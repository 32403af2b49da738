"""The PyTorch backend: diffeqkit's explicit Runge-Kutta methods and rosenbrock23 on
torch, every sensealg through autograd.

`ALGS` (alg -> driver) and `SENSEALGS` (sensealg class -> the function running a
differentiated solve) are the tables the registry's declaration is checked against.
"""

from __future__ import annotations

from ._backend import SENSEALGS, TorchBackend
from ._solve import ALGS

__all__ = ["ALGS", "BACKEND", "SENSEALGS", "TorchBackend"]

BACKEND = TorchBackend()
