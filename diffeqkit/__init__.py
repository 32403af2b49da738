"""diffeqkit: write an ODE once, solve and differentiate it on JAX, PyTorch or SciPy.

Importing diffeqkit imports no backend framework; each backend loads on first use.
"""

from __future__ import annotations

from . import problems as problems
from ._arrays import array_namespace as array_namespace
from ._ensemble import EnsembleProblem as EnsembleProblem
from ._errors import BackendNotInstalledError as BackendNotInstalledError
from ._errors import DiffEqKitError as DiffEqKitError
from ._errors import InvalidProblemError as InvalidProblemError
from ._errors import SolveError as SolveError
from ._errors import UnsupportedError as UnsupportedError
from ._events import Event as Event
from ._gradients import Grads as Grads
from ._gradients import value_and_grad as value_and_grad
from ._gradients import vjp as vjp
from ._info import support_matrix as support_matrix
from ._problem import ODEProblem as ODEProblem
from ._sensealg import CheckpointedAdjoint as CheckpointedAdjoint
from ._sensealg import ContinuousAdjoint as ContinuousAdjoint
from ._sensealg import ForwardMode as ForwardMode
from ._sensealg import InterpolatingAdjoint as InterpolatingAdjoint
from ._sensealg import ReverseThroughSolver as ReverseThroughSolver
from ._sensealg import SensitivityAlgorithm as SensitivityAlgorithm
from ._sensealg import default_sensealg as default_sensealg
from ._solution import Solution as Solution
from ._solve import solve as solve

__version__ = "0.1.0"

__all__ = [
    "BackendNotInstalledError",
    "CheckpointedAdjoint",
    "ContinuousAdjoint",
    "DiffEqKitError",
    "EnsembleProblem",
    "Event",
    "ForwardMode",
    "Grads",
    "InterpolatingAdjoint",
    "InvalidProblemError",
    "ODEProblem",
    "ReverseThroughSolver",
    "SensitivityAlgorithm",
    "Solution",
    "SolveError",
    "UnsupportedError",
    "__version__",
    "array_namespace",
    "default_sensealg",
    "problems",
    "solve",
    "support_matrix",
    "value_and_grad",
    "vjp",
]
