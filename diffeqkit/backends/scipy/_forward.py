"""`ForwardMode` on SciPy: the forward sensitivity equations.

Requirements met here:

- The state is augmented with its sensitivities ``S = d u / d(u0, p)`` of shape
  ``(n, k)``, ``k = n + P`` (``P`` the parameters the engine differentiates):
  ``dS/dt = (df/du) S + (df/dp) [0 | I]``, ``S(t0) = [I | 0]``, one batched JVP
  of the engine per evaluation. The augmented system is integrated with the
  request's alg and tolerances, the error control covering the whole augmented
  state (CVODES' ``errconS = True``): the steps, and so ``sol.u``, can differ a
  little from those of a plain solve.
- Fixed-step algs step on the same grid; differentiating a Runge-Kutta step and
  stepping the sensitivity equations with it are the same computation, so there
  the gradient is that of the computed solution, to rounding.
- Implicit algs get the Jacobian ``blockdiag(df/du, df/du ⊗ I_k)`` of the
  augmented system (the second-derivative coupling dropped: it only serves
  Newton's iteration, as in CVODES' simultaneous corrector).
- The pullback contracts the stored ``S(t_i)`` with the cotangent: no further
  integration, and it may be called any number of times.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse

from ..._solution import Solution
from ._autodiff import Engine, Layout
from ._solve import (
    Counter,
    Problem,
    conclude_outcome,
    counted,
    integrate,
    newton_jacobian,
    options,
)

__all__ = ["vjp"]


def _jacobian(problem: Problem, engine: Engine, k: int) -> Any:
    """The augmented system's Newton Jacobian, for implicit algs."""
    n = problem.n
    eye = scipy.sparse.identity(k, format="csr")

    def jac(t: float, y: Any) -> Any:
        Ju, _ = engine.jacobians(t, y[:n])
        J = scipy.sparse.block_diag([Ju, scipy.sparse.kron(Ju, eye)], format="csc")
        return newton_jacobian(problem, J)

    return jac


def vjp(
    problem: Problem, engine: Engine, layout: Layout
) -> tuple[Solution, Callable[[Any], tuple[Any, Any]]]:
    """Solve with sensitivities; the pullback (on NumPy cotangents of shape
    ``(m, n)``) contracts them with the cotangent."""
    n, k = problem.n, problem.n + engine.size
    y0 = np.concatenate([problem.u0.reshape(-1), np.eye(n, k).reshape(-1)])
    jac = _jacobian(problem, engine, k) if "jac" in problem.base_options else None
    counter = Counter()
    outcome = integrate(
        problem, counted(engine.forward, counter), y0, options(problem, jac=jac)
    )
    sol = conclude_outcome(problem, outcome, counter, outcome.out[:, :n])
    sens = outcome.out[:, n:].reshape(-1, n, k)

    def pull(cot: Any) -> tuple[Any, Any]:
        g = np.einsum("mi,mik->k", cot, sens)
        return g[:n].reshape(problem.shape), layout.gradient(g[n:])

    return sol, pull
