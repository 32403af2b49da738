"""`ForwardMode` on SciPy: the forward sensitivity equations, integrated with the
state under one error control (docs/design.md, "SciPy").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np
import scipy.sparse

from ..._solution import Solution
from ._autodiff import FINITE_DIFFERENCES, Engine, Job, Layout, Pull, engine_label
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
    jump = _jump(problem, layout, k) if problem.req.events else None
    outcome = integrate(
        problem,
        counted(engine.forward, counter),
        y0,
        options(problem, jac=jac),
        jump=jump,
    )
    sol = conclude_outcome(problem, outcome, counter, outcome.out[:, :n], label)
    sens = outcome.out[:, n:].reshape(problem.ts.size, n, k)

    def pull(cot: Any) -> tuple[Any, Any]:
        g = np.einsum("mi,mik->k", cot, sens)
        return g[:n].reshape(problem.shape), layout.gradient(g[n:])

    return sol, pull


# Relative step of the central differences that differentiate conditions and
# affects (about the cube root of float64's epsilon: truncation and rounding
# errors balance near 1e-11 relative).
_DIFF_STEP = 6e-6


def _differences(fn: Any, z: Any) -> Any:
    """The Jacobian of ``fn(z)`` (a 1-D array) at `z` by central differences."""
    columns = []
    for j in range(z.size):
        h = _DIFF_STEP * max(1.0, abs(z[j]))
        up, down = z.copy(), z.copy()
        up[j] += h
        down[j] -= h
        columns.append((fn(up) - fn(down)) / (up[j] - down[j]))
    return np.stack(columns, axis=-1)


def _jump(problem: Problem, layout: Layout, k: int) -> Jump:
    """Events on ``[u, S]`` (S = du/d[u0, p], ``(n, k)``): the state jumps by the
    affect, and the sensitivities by the implicit-function theorem.

    With ``dt = -(g_u S + g_p) / (g_u f + g_t)`` (how the event time moves), the
    state at the moving event has ``S + f dt``; the affect maps it to
    ``A_u (S + f dt) + A_p + A_t dt``; the flow restarted at the moving time
    subtracts ``f(u+) dt``. Derivatives of the condition and affect are central
    differences (`_differences`); of f, not needed.
    """
    n, shape, p, f = problem.n, problem.shape, problem.p, problem.req.f
    events = problem.req.events
    q0 = layout.values()
    size = q0.size

    def inputs(z: Any) -> tuple[Any, Any, float]:
        q = layout.unflatten(z[n : n + size], lambda leaf: leaf)
        return z[:n].reshape(shape), q, float(z[-1])

    def state(y: Any) -> Any:
        return y[:n].reshape(shape)

    def rhs(u: Any, t: float) -> Any:
        return np.asarray(f(u.reshape(shape), p, t), dtype=np.float64).reshape(-1)

    def apply(i: int, t: float, y: Any) -> Any:
        event = events[i]
        affect = cast("Callable[..., Any]", event.affect)  # only events with one
        u, S = y[:n], y[n:].reshape(n, k)
        z = np.concatenate([u, q0, [t]])

        def condition(z: Any) -> Any:
            return np.atleast_1d(np.float64(event.condition(*inputs(z))))

        def jumped(z: Any) -> Any:
            return np.asarray(affect(*inputs(z)), dtype=np.float64).reshape(-1)

        dg = _differences(condition, z)[0]
        f_minus = rhs(u, t)
        dt = -(dg[:n] @ S + np.concatenate([np.zeros(n), dg[n : n + size]]))
        dt /= dg[:n] @ f_minus + dg[-1]
        A = _differences(jumped, z)
        u_plus = jumped(z)
        S_plus = A[:, :n] @ (S + np.outer(f_minus, dt))
        S_plus[:, n:] += A[:, n : n + size]
        S_plus += np.outer(A[:, -1] - rhs(u_plus, t), dt)
        return np.concatenate([u_plus, S_plus.reshape(-1)])

    return Jump(state, apply)
