"""`CheckpointedAdjoint` and `InterpolatingAdjoint` on SciPy: CVODES-style
checkpoints, each segment recomputed with dense output while the adjoint is
integrated backward against it (docs/design.md, "SciPy").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse
from scipy.integrate import OdeSolution

from ..._sensealg import adjoint_atol
from ..._solution import Solution
from ._adjoint import Backward
from ._autodiff import Engine, Job, Pull
from ._solve import (
    _FAILURES,
    Counter,
    Problem,
    RungeKutta,
    newton_jacobian,
    solve,
    sparse,
    stop_list,
    user_rhs,
)

__all__ = ["DEFAULT_CHECKPOINTS", "vjp"]

# The number of segments for checkpoints=None: the forward solve is recomputed
# once in pieces of about a tenth, so the backward pass holds a tenth of the
# steps' dense output.
DEFAULT_CHECKPOINTS = 10


@dataclass(frozen=True)
class _Checkpoint:
    """A solver's state after an accepted step (or at the start)."""

    t: float
    y: Any
    h: float | None  # RK: the next step size; others: the last step's
    t_bound: float
    grid_index: int  # fixed step: the index of t in the step grid


class _Recorder:
    """Keeps the solver's state at the first step ending at or after each cut."""

    def __init__(self, problem: Problem, segments: int) -> None:
        t0, t_last = problem.t0, float(problem.ts[-1])
        self.direction = 1.0 if problem.t1 > t0 else -1.0
        d = self.direction
        span = t_last - t0
        self.cuts = [d * (t0 + j * span / segments) for j in range(1, segments)]
        self.end = d * t_last
        self.next = 0
        self.points: list[_Checkpoint] = []

    def __call__(self, solver: Any) -> None:
        key = self.direction * solver.t
        if self.points:
            if self.next >= len(self.cuts) or key < self.cuts[self.next]:
                return
            while self.next < len(self.cuts) and key >= self.cuts[self.next]:
                self.next += 1
            if key >= self.end:
                return  # past the last save time: the backward pass starts there
        h = solver.h_abs if isinstance(solver, RungeKutta) else solver.step_size
        index = getattr(solver, "_next", 1) - 1
        self.points.append(
            _Checkpoint(float(solver.t), solver.y.copy(), h, solver.t_bound, index)
        )


def _recompute(problem: Problem, cp: _Checkpoint, t_hi: float) -> OdeSolution:
    """The forward solution from checkpoint `cp` to `t_hi`, as dense output."""
    d = 1.0 if problem.t1 > problem.t0 else -1.0
    fun = user_rhs(problem, Counter())
    opts = dict(problem.base_options)
    if problem.grid is not None:
        opts["grid"] = problem.grid[cp.grid_index :]
    elif cp.h is not None:
        opts["first_step"] = min(cp.h, abs(cp.t_bound - cp.t))
    stops = [
        s
        for s in stop_list(problem.stops, problem.t0, problem.t1)
        if d * s > d * cp.t_bound
    ]
    times, pieces = [cp.t], []
    with problem.method.guard():
        solver = problem.method.solver(fun, cp.t, cp.y, cp.t_bound, **opts)
        if isinstance(solver, RungeKutta) and cp.h is not None:
            solver.h_abs = cp.h  # the step the forward solve tried next: same steps
        while d * solver.t < d * t_hi:
            message = solver.step()
            if solver.status == "failed":
                status = _FAILURES.get(message or "", "solver_failed")
                raise RuntimeError(  # the forward solve passed here: a bug
                    f"recomputing the forward solve from t={cp.t!r} failed at "
                    f"t={solver.t!r} with status '{status}'."
                )
            times.append(solver.t)
            pieces.append(solver.dense_output())
            if solver.status == "finished":
                if not stops:
                    break
                solver.t_bound = stops.pop(0)
                solver.status = "running"
    return OdeSolution(np.array(times), pieces)


def _jacobian(
    problem: Problem, engine: Engine, state: Callable[[float], Any]
) -> Callable[[float, Any], Any]:
    """The exact Jacobian of the adjoint system ``[λ, μ]``."""
    n, size = problem.n, engine.size
    right = scipy.sparse.csr_matrix((n + size, size))

    def jac(t: float, z: Any) -> Any:
        Ju, Jp = engine.jacobians(t, state(t))
        # sparse blocks: SciPy reads a list of equal-shape dense blocks as one
        # higher-dimensional array (and refuses it) when P == n
        left = scipy.sparse.vstack([sparse(-Ju.T), sparse(-Jp.T)])
        J = scipy.sparse.hstack([left, right], "csc")
        return newton_jacobian(problem, J)

    return jac


def vjp(job: Job) -> tuple[Solution, Pull]:
    """CheckpointedAdjoint: the plain solve keeping the sensealg's checkpoints,
    and the checkpointed pullback on NumPy cotangents ``(m, n)``."""
    segments = job.problem.req.sensealg.checkpoints or DEFAULT_CHECKPOINTS
    return _vjp(job, segments, type(job.problem.req.sensealg).__name__)


def interpolating(job: Job) -> tuple[Solution, Pull]:
    """InterpolatingAdjoint: one segment, i.e. the forward solution recomputed once
    with dense output and the adjoint integrated backward against it (the state
    is never integrated backward)."""
    return _vjp(job, 1, type(job.problem.req.sensealg).__name__)


def _vjp(job: Job, segments: int, owner: str) -> tuple[Solution, Pull]:
    problem, engine, layout = job.problem, job.engine, job.layout
    hint = f"Raise max_steps or loosen {owner}(rtol=..., atol=...)."
    recorder = _Recorder(problem, segments)
    sol = solve(problem, recorder)
    u = np.asarray(sol.u)
    checkpoints = recorder.points
    n, size = problem.n, engine.size
    ts = problem.ts
    d = 1.0 if problem.t1 > problem.t0 else -1.0
    implicit = problem.autodiff_jacobians

    def pull(cot: Any) -> tuple[Any, Any]:
        z = np.concatenate([cot[-1], np.zeros(size)])
        t_cur, i = float(ts[-1]), ts.size - 2
        backward: Backward | None = None
        for cp in reversed(checkpoints):
            if t_cur == cp.t:  # saveat=[t0]: nothing to integrate
                break
            state = _recompute(problem, cp, t_cur)

            def fun(t: float, z: Any, state: OdeSolution = state) -> Any:
                return engine.adjoint(t, state(t), z)

            jac = _jacobian(problem, engine, state) if implicit else None
            if backward is None:
                atol = float(adjoint_atol(problem.req.atol, cot, u))
                backward = Backward(problem, jac, hint, atol)
            backward.jac = jac
            while i >= 0 and d * ts[i] > d * cp.t:
                z = backward(fun, z, t_cur, float(ts[i]))
                z[:n] += cot[i]
                t_cur, i = float(ts[i]), i - 1
            z = backward(fun, z, t_cur, cp.t)
            t_cur = cp.t
            while i >= 0 and ts[i] == cp.t:
                z[:n] += cot[i]
                i -= 1
        return z[:n].reshape(problem.shape), layout.gradient(z[n:])

    return sol, pull
