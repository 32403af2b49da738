"""`ForwardMode` on SciPy: the forward sensitivity equations, integrated with the
state under one error control (docs/design.md, "SciPy").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse

from ..._solution import Solution
from ._autodiff import FINITE_DIFFERENCES, Engine, Job, Layout, Pull, engine_label
from ._events import jump_derivatives
from ._solve import (
    Counter,
    Jump,
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
    jump = _jump(problem, layout, engine.name, k) if problem.req.events else None
    outcome = integrate(
        problem,
        counted(engine.forward, counter),
        y0,
        options(problem, jac=jac),
        jump=jump,
    )
    sol = conclude_outcome(problem, outcome, counter, outcome.out[:, :n], label)
    sens = outcome.out[:, n:].reshape(problem.ts.size, n, k)
    # Rows not reached (after a terminal event) are NaN and carry no derivative,
    # as with the adjoints: their cotangent must not turn the gradient into NaN.
    # (A failed solve's gradient is NaN in the backend's pullback.)
    sens = np.where(np.isnan(sens), 0.0, sens)

    def pull(cot: Any) -> tuple[Any, Any]:
        g = np.einsum("mi,mik->k", cot, sens)
        return g[:n].reshape(problem.shape), layout.gradient(g[n:])

    return sol, pull


def _jump(problem: Problem, layout: Layout, engine: str, k: int) -> Jump:
    """Events on ``[u, S]`` (S = du/d[u0, p], ``(n, k)``): the state jumps by the
    affect, the sensitivities by `jump_derivatives`: ``M_u S + [0 | M_p]``."""
    n, shape = problem.n, problem.shape

    def state(y: Any) -> Any:
        return y[:n].reshape(shape)

    def apply(i: int, t: float, y: Any) -> Any:
        u_plus, M_u, M_p = jump_derivatives(problem, layout, engine, i, t, y[:n])
        S = M_u @ y[n:].reshape(n, k)
        S[:, n:] += M_p
        return np.concatenate([u_plus, S.reshape(-1)])

    return Jump(state, apply)
