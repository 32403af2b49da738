"""`ContinuousAdjoint` on SciPy (the backsolve), and the backward integration the
adjoints share (docs/design.md, "SciPy").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse

from ..._errors import SolveError, solve_failed
from ..._solution import Solution
from ._autodiff import Engine, Job, Pull
from ._solve import (
    _FAILURES,
    Problem,
    RungeKutta,
    finite_check,
    newton_jacobian,
    options,
    solve,
    sparse,
)

__all__ = ["Backward", "vjp"]


class Backward:
    """Integrates a system backward between two times with the request's alg."""

    def __init__(
        self,
        problem: Problem,
        jac: Callable[[float, Any], Any] | None,
        hint: str,
        atol: float | None = None,
    ) -> None:
        """`atol` is the default when the sensealg gives none (None: the forward
        solve's)."""
        req, sensealg = problem.req, problem.req.sensealg
        self.problem = problem
        self.rtol = req.rtol if sensealg.rtol is None else sensealg.rtol
        default = req.atol if atol is None else atol
        self.atol = default if sensealg.atol is None else sensealg.atol
        self.jac = jac
        self.hint = hint
        self.h: float | None = None  # the step size the last piece ended with
        grid = problem.grid
        self.index = None if grid is None else {float(t): i for i, t in enumerate(grid)}

    def __call__(
        self, fun: Callable[[float, Any], Any], y: Any, t_from: float, t_to: float
    ) -> Any:
        """``y`` at `t_to`, integrating ``y' = fun(t, y)`` from `t_from`."""
        problem = self.problem
        if self.index is not None:  # fixed step: the forward grid, reversed
            i, j = self.index[t_from], self.index[t_to]
            grid = problem.grid[min(i, j) : max(i, j) + 1]
            opts = options(problem, grid=grid[::-1] if i > j else grid)
        else:
            first = self.h if self.h is not None else problem.base_options["first_step"]
            opts = options(
                problem,
                rtol=self.rtol,
                atol=self.atol,
                jac=self.jac,
                first_step=None if first is None else min(first, abs(t_to - t_from)),
            )
        max_steps, finite = problem.req.max_steps, finite_check(y.size)
        with problem.method.guard():
            solver = problem.method.solver(fun, t_from, y, t_to, **opts)
            step = solver.step
            steps = 0
            while solver.status == "running":
                if steps >= max_steps:
                    raise self._failed(solver, t_from, t_to, "max_steps_reached", steps)
                try:
                    message = step()
                except ValueError as err:  # SciPy's LU refuses a NaN Jacobian
                    if finite(solver.y):
                        raise
                    failure = self._failed(solver, t_from, t_to, "nonfinite", steps)
                    raise failure from err
                if solver.status == "failed":
                    status = _FAILURES.get(message or "", "solver_failed")
                    if not finite(solver.y):
                        status = "nonfinite"
                    raise self._failed(solver, t_from, t_to, status, steps)
                steps += 1
                if not finite(solver.y):
                    raise self._failed(solver, t_from, t_to, "nonfinite", steps)
        self.h = solver.h_abs if isinstance(solver, RungeKutta) else solver.step_size
        return solver.y.copy()

    def _failed(
        self, solver: Any, t_from: float, t_to: float, status: str, steps: int
    ) -> SolveError:
        name = type(self.problem.req.sensealg).__name__
        span = (float(t_from), float(t_to))
        text = solve_failed(float(solver.t), span, status, steps, self.hint)
        return SolveError(f"the backward solve of sensealg=dk.{name}(): {text}")


def _jacobian(problem: Problem, engine: Engine) -> Callable[[float, Any], Any]:
    """The Newton Jacobian of the backsolve system ``[u, λ, μ]``."""
    n, size = problem.n, engine.size
    zero = scipy.sparse.csr_matrix((size, size))

    def jac(t: float, y: Any) -> Any:
        Ju, Jp = engine.jacobians(t, y[:n])
        C = engine.backsolve_coupling(t, y)
        blocks = [[Ju, None, None], [C[:n], -Ju.T, None], [C[n:], -Jp.T, zero]]
        J = scipy.sparse.bmat(
            [[None if b is None else sparse(b) for b in row] for row in blocks],
            format="csc",
        )
        return newton_jacobian(problem, J)

    return jac


_HINT = (
    "The state integrated backward may have left the forward trajectory (unstable "
    "backward dynamics, as on stiff or chaotic problems): use "
    "sensealg=dk.CheckpointedAdjoint(), or raise max_steps or loosen "
    "ContinuousAdjoint(rtol=..., atol=...)."
)


def vjp(job: Job) -> tuple[Solution, Pull]:
    """The plain solve, and the backsolve pullback on NumPy cotangents ``(m, n)``."""
    problem, engine, layout = job.problem, job.engine, job.layout
    sol = solve(problem)
    n, size = problem.n, engine.size
    u = np.asarray(sol.u).reshape(problem.ts.size, n)
    ts, t0 = problem.ts.tolist(), problem.t0
    jac = _jacobian(problem, engine) if problem.autodiff_jacobians else None

    def pull(cot: Any) -> tuple[Any, Any]:
        backward = Backward(problem, jac, _HINT)
        y = np.concatenate([u[-1], cot[-1], np.zeros(size)])
        for i in range(len(ts) - 1, 0, -1):
            y = backward(engine.backsolve, y, ts[i], ts[i - 1])
            y[:n] = u[i - 1]
            y[n : 2 * n] += cot[i - 1]
        if ts[0] != t0:
            y = backward(engine.backsolve, y, ts[0], t0)
        return y[n : 2 * n].reshape(problem.shape), layout.gradient(y[2 * n :])

    return sol, pull
