"""The SciPy backend: `scipy.integrate` solvers, driven step by step, with three
gradient methods.

Requirements met here:

- `_solve`: the plain solve. The explicit algs run the shared tableaux as SciPy
  ``RungeKutta`` subclasses (fixed-step ones on `diffeqkit._saveat.step_grid`),
  the implicit ones are SciPy's ``BDF``, ``Radau`` and ``LSODA``; our own step
  loop gives ``max_steps``, statuses and real stats. float64 on the CPU only.
- The implicit algs' Jacobian ``df/du`` comes from ``prob.jac`` when given, else
  from automatic differentiation of the Array-API ``f`` by the gradients' engine
  rule (JAX with x64 on, else PyTorch; the sensealg's ``autodiff`` when it names
  one), compiled once per problem structure; only with SciPy alone installed
  does SciPy difference ``f``. ``sol.stats["jacobian"]`` says which
  (``"prob.jac"``, ``"jax"``, ``"torch"``, ``"finite differences"``), with
  ``njev`` (Jacobian evaluations) and ``nlu`` (LU factorisations).
  `finite_difference_jacobians` (a context manager, not public API) forces
  SciPy's differences, for benchmarks and tests.
- Gradients (`dk.vjp`, `dk.value_and_grad`) by the request's sensealg, dispatched
  by the table `_backend._SENSEALGS`: `ForwardMode` (`_forward`: forward
  sensitivity equations), `ContinuousAdjoint` (`_adjoint`: the backsolve adjoint)
  and `CheckpointedAdjoint` (`_checkpoint`: CVODES-style checkpoints with the
  forward solution recomputed per segment). SciPy's solvers are not
  differentiable, so there is no `ReverseThroughSolver` (the registry says so).
  These methods solve sensitivity or adjoint ODEs: their gradients converge to
  that of the computed solution as the tolerances shrink (exactly equal for
  `ForwardMode` with fixed steps).
- The Jacobian products of ``f`` come from an engine (`_autodiff`), the
  sensealg's ``autodiff`` option: JAX (jitted, cached per problem structure),
  PyTorch (``torch.func``), or the user's ``prob.jac`` (gradients with respect to
  ``u0`` only). The frameworks are imported only when an engine is built:
  importing this backend imports neither. With an implicit alg the systems the
  gradient methods integrate get their exact (block-triangular) Jacobians from
  the same engine, never SciPy's differences over the whole augmented state.
- `solve` with any sensealg is the plain solve; gradients are NumPy float64,
  ``du0`` of u0's shape and ``dp`` with p's structure.
"""

from __future__ import annotations

from ._autodiff import finite_difference_jacobians
from ._backend import ScipyBackend
from ._solve import ALGS

__all__ = ["BACKEND", "ScipyBackend", "finite_difference_jacobians"]

BACKEND = ScipyBackend()

# The alg table (a test checks it against the registry's declaration).
_ALGS = ALGS
