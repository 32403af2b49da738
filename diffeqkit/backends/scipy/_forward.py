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
    # per event, per firing: its time and [u, S] before its jump
    fired: list[list[tuple[float, Any]]] = [[] for _ in problem.req.events]
    jump = _jump(problem, layout, engine.name, k, fired) if fired else None
    outcome = integrate(
        problem,
        counted(engine.forward, counter),
        y0,
        options(problem, jac=jac),
        jump=jump,
    )
    sol = conclude_outcome(problem, outcome, counter, outcome.out[:, :n], label)
    sens = outcome.out[:, n:].reshape(problem.ts.size, n, k)
    # per event, per firing: d(event time)/dθ (k,) and d(state before it)/dθ
    # (n, k), computed when a pullback first asks for them
    event_sens: list[list[tuple[Any, Any]]] = []

    def pull(cot: Any, events: Any = None) -> tuple[Any, Any]:
        # rows with a zero cotangent add nothing, also the NaN ones after a
        # terminal event
        rows = np.any(cot != 0.0, axis=1)
        g = np.einsum("mi,mik->k", cot[rows], sens[rows])
        if events is not None:
            if not event_sens:
                event_sens.extend(
                    [
                        jump_derivatives(
                            problem, layout, engine.name, i, t, y[:n]
                        ).sensitivities(y[n:].reshape(n, k))
                        for t, y in found
                    ]
                    for i, found in enumerate(fired)
                )
            for t_cot, u_cot, found in zip(*events, event_sens, strict=True):
                for j, (dt, dU) in enumerate(found):
                    g += t_cot[j] * dt + u_cot[j] @ dU
        return g[:n].reshape(problem.shape), layout.gradient(g[n:])

    return sol, pull


def _jump(
    problem: Problem,
    layout: Layout,
    engine: str,
    k: int,
    fired: list[list[tuple[float, Any]]],
) -> Jump:
    """Events on ``[u, S]`` (S = du/d[u0, p], ``(n, k)``): the state jumps by the
    affect, the sensitivities by `jump_derivatives`: ``M_u S + [0 | M_p]``. Each
    event kept appends its time and ``[u, S]`` before its jump to ``fired[i]``
    (from which `EventDerivatives.sensitivities` gives those of the event's
    outputs)."""
    n, shape = problem.n, problem.shape

    def state(y: Any) -> Any:
        return y[:n].reshape(shape)

    def seen(i: int, t: float, y: Any) -> None:
        fired[i].append((t, y.copy()))

    def apply(i: int, t: float, y: Any) -> Any:
        d = jump_derivatives(problem, layout, engine, i, t, y[:n])
        S = d.M_u @ y[n:].reshape(n, k)
        S[:, n:] += d.M_p
        return np.concatenate([d.u_plus, S.reshape(-1)])

    return Jump(state, apply, seen)
