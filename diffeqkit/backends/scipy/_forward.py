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
- Implicit algs get the exact Jacobian of the augmented system from the engine,
  ``[[J, 0], [C, J ⊗ I_k]]`` with ``J = df/du`` and the coupling ``C = d vec(J S
  + (df/dp) [0 | I]) / du`` (JAX: forward-over-forward AD; torch and prob.jac:
  differences of the sensitivity system along the ``n`` state directions only).
  The coupling matters: on ROBER, dropping it (block-diagonal Newton matrix, as
  CVODES' staggered corrector does) doubled BDF's steps and made 17x the
  Jacobian evaluations; with it BDF takes the steps it takes with SciPy's
  differences over the whole augmented state, at fewer calls (the Jacobian only
  steers Newton's iteration: results agree either way to the tolerances).
- The pullback contracts the stored ``S(t_i)`` with the cotangent: no further
  integration, and it may be called any number of times.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse

from ..._solution import Solution
from ._autodiff import FINITE_DIFFERENCES, Engine, Job, Pull, engine_label
from ._solve import (
    Counter,
    Problem,
    conclude_outcome,
    counted,
    integrate,
    newton_jacobian,
    options,
    sparse,
)

__all__ = ["vjp"]


def _jacobian(problem: Problem, engine: Engine, k: int) -> Any:
    """The augmented system's Newton Jacobian, for implicit algs."""
    n = problem.n
    eye = scipy.sparse.identity(k, format="csr")

    def jac(t: float, y: Any) -> Any:
        Ju = engine.state_jacobian(t, y[:n])
        C = engine.forward_coupling(t, y)
        J = scipy.sparse.bmat(
            [[sparse(Ju), None], [sparse(C), scipy.sparse.kron(Ju, eye)]],
            format="csc",
        )
        return newton_jacobian(problem, J)

    return jac


def vjp(job: Job) -> tuple[Solution, Pull]:
    """Solve with sensitivities; the pullback (on NumPy cotangents of shape
    ``(m, n)``) contracts them with the cotangent."""
    problem, engine, layout = job.problem, job.engine, job.layout
    n, k = problem.n, problem.n + engine.size
    y0 = np.concatenate([problem.u0.reshape(-1), np.eye(n, k).reshape(-1)])
    jac, label = None, FINITE_DIFFERENCES
    if problem.autodiff_jacobians:
        jac, label = _jacobian(problem, engine, k), engine_label(engine)
    counter = Counter()
    outcome = integrate(
        problem, counted(engine.forward, counter), y0, options(problem, jac=jac)
    )
    sol = conclude_outcome(problem, outcome, counter, outcome.out[:, :n], label)
    sens = outcome.out[:, n:].reshape(problem.ts.size, n, k)

    def pull(cot: Any) -> tuple[Any, Any]:
        g = np.einsum("mi,mik->k", cot, sens)
        return g[:n].reshape(problem.shape), layout.gradient(g[n:])

    return sol, pull
