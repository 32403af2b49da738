"""Record a solve's step schedule, then replay the fixed schedule.

`record` runs the plain solve under ``no_grad``, keeping every accepted step's
start time and size (and, if asked, checkpoint states); `Replayer.run` repeats
recorded steps with the same operations and no control flow, so replayed states
equal the recorded ones bit for bit and run under autograd, ``torch.func.jvp``
and ``vmap`` alike (`_forward`, `_checkpoint`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..._saveat import step_grid
from ..._solution import Solution
from .._protocol import SolveRequest
from . import _engine, _engine_adjoint, _engine_rosenbrock
from ._rk import Lift, Rhs, Run, _nan_rows, no_lift
from ._solve import Setup, finish, prepare, run_steps, solve_plain, solver_for


class Recorder:
    """Watches a run: every accepted step's start time and size, and checkpoints.

    Checkpoints are the states at the starts of steps ``0, s, 2s, ...``. With
    `nsteps` known beforehand (fixed-step algs) the stride ``s`` is
    ``ceil(nsteps / K)``: ``K = checkpoints`` segments (a few fewer where
    ``s`` does not divide ``nsteps``), ``K = ceil(sqrt(nsteps))`` for None. An
    adaptive solve does not know its number
    of steps in advance: ``s`` starts at 1 and doubles (every other checkpoint
    dropped) whenever more than ``K`` would be kept (for None: more than ``2 s``),
    so at most ``K`` are kept (at least ``K/2`` once there are ``K`` steps), and
    for None both ``s`` and the number kept stay within a factor 2 of
    ``sqrt(nsteps)``. Memory during the forward pass is bounded by the same
    count.
    """

    def __init__(
        self, *, keep: bool, checkpoints: int | None = None, nsteps: int | None = None
    ) -> None:
        self.t0: list[float] = []
        self.dt: list[float] = []
        self.keep = keep
        self.checkpoints = checkpoints
        self.states: dict[int, torch.Tensor] = {}
        self.stride = 1
        if nsteps is not None and nsteps > 0:
            segments = checkpoints or math.ceil(math.sqrt(nsteps))
            self.stride = math.ceil(nsteps / segments)

    def step(self, t0: torch.Tensor, y0: torch.Tensor, dt: torch.Tensor) -> None:
        n = len(self.t0)
        self.t0.append(float(t0))
        self.dt.append(float(dt))
        if not self.keep or n % self.stride:
            return
        self.states[n] = y0
        limit = 2 * self.stride if self.checkpoints is None else self.checkpoints
        if len(self.states) > limit:
            self.stride *= 2
            self.states = {i: y for i, y in self.states.items() if i % self.stride == 0}


@dataclass(frozen=True)
class Schedule:
    """The accepted steps of a recorded solve and what was read off each."""

    # (3, n) float64 on the solve's device: start time, size and end time of
    # each accepted step, in solver time.
    steps: torch.Tensor
    # reads[n]: the rows of the integration times read off step n.
    reads: tuple[tuple[int, ...], ...]
    # The leading steps the reached rows depend on.
    needed: int
    # Rows reached (the rest are NaN).
    reached: int
    times: torch.Tensor
    # Checkpoints: step index -> state at its start (index 0 always kept).
    states: dict[int, torch.Tensor] = field(default_factory=dict)

    def segments(self) -> list[tuple[int, int]]:
        """``[(start, stop), ...]`` of the checkpoint segments covering the
        needed steps, in order."""
        starts = sorted(i for i in self.states if i < self.needed)
        if not starts:  # nothing to replay (see `_checkpoint._Keeper`)
            return []
        return list(zip(starts, [*starts[1:], self.needed], strict=True))


@dataclass
class Plan:
    """One differentiated solve: the request, its tensors, and (after the forward
    pass) the recorded run, which a `torch.autograd.Function` fills in."""

    req: SolveRequest
    setup: Setup
    run: Run | None = None

    def solution(self, u: torch.Tensor) -> Solution:
        if self.run is None:
            raise RuntimeError("the forward pass did not run")  # pragma: no cover
        return finish(self.req, self.setup, self.run, u)


def make_plan(req: SolveRequest, *, graph: bool = False) -> Plan:
    """`prepare`'s `Setup` of `req`; `graph`: ``f(u0, p, t0)`` with autograd
    recording (for a forward pass that keeps its graph)."""
    return Plan(req, prepare(req, graph=graph))


def record(
    plan: Plan,
    *,
    keep: bool = False,
    checkpoints: int | None = None,
    recorder: Recorder | None = None,
) -> tuple[Run, Schedule]:
    """The plain solve under ``no_grad``, with its `Schedule`; or, given a
    `recorder`, under that recorder, in the caller's grad mode (it may record a
    graph, see `_checkpoint`)."""
    req, setup = plan.req, plan.setup
    if recorder is None:
        nsteps = None
        if req.fixed_step and req.dt0 is not None:
            times = setup.times.cpu().numpy()
            nsteps = step_grid(times[0], times[-1], req.dt0, times).size - 1
        recorder = Recorder(keep=keep, checkpoints=checkpoints, nsteps=nsteps)
        with torch.no_grad():
            run = run_steps(req, setup, recorder)
    else:
        run = run_steps(req, setup, recorder)
    n = len(recorder.t0)
    t0 = np.asarray(recorder.t0, dtype=np.float64)
    t1 = np.append(t0[1:], run.t_end) if n else t0
    times = setup.times.cpu().numpy()
    # A row is read off the first accepted step ending at or after its time
    # (`AdaptiveRK.advance`; fixed-step grids contain every save time).
    which = np.searchsorted(t1, times[1 : run.reached], side="left")
    reads: list[list[int]] = [[] for _ in range(n)]
    for row, step in enumerate(which.tolist(), start=1):
        reads[step].append(row)
    steps = torch.as_tensor(
        np.stack([t0, np.asarray(recorder.dt, dtype=np.float64), t1]),
        dtype=torch.float64,
        device=setup.device,
    )
    schedule = Schedule(
        steps=steps,
        reads=tuple(tuple(r) for r in reads),
        needed=int(which.max()) + 1 if which.size else 0,
        reached=run.reached,
        times=setup.times,
        states=recorder.states,
    )
    plan.run = run
    return run, schedule


class Replayer:
    """Replays the steps of a `Schedule` (see the module docstring).

    `lift` is applied once to every constant the steps use (the tableau, the
    step times and sizes, the save times); `_forward` passes one that keeps
    forward-mode AD on its fast path. Without one, and with the compiled engine
    on (`_engine.enabled`), steps are replayed in compiled blocks
    (`_engine.replay`); ``stats["compile_s"]`` sums their compilation time.
    """

    def __init__(self, plan: Plan, schedule: Schedule, lift: Lift = no_lift) -> None:
        setup = plan.setup
        solver = solver_for(plan.req)
        self.stepper = solver.stepper(setup.dtype, setup.device, lift)
        self.steps = lift(schedule.steps)
        self.times = lift(schedule.times)
        self.reads = schedule.reads
        self.req = plan.req
        self.backward = setup.backward
        self.compiled = lift is no_lift and _engine.enabled(plan.req)
        self.stats: dict[str, float] = {"compile_s": 0.0}

    def run(
        self,
        func: Any,
        y: torch.Tensor,
        start: int,
        stop: int,
        out: dict[int, torch.Tensor],
    ) -> torch.Tensor:
        """Repeat steps ``start..stop-1`` from `y`, the state at the start of step
        `start`; the rows read off them go into `out`; returns the state at the
        end."""
        if self.compiled and isinstance(func, Rhs):
            y_end = self._run_compiled(func, y, start, stop, out)
            if y_end is not None:
                return y_end
        steps, times = self.steps, self.times
        f = None  # recomputed at the first step, as f(t_start, y)
        for n in range(start, stop):
            y, f, read = self.stepper(func, y, f, steps[0, n], steps[1, n], steps[2, n])
            for row in self.reads[n]:
                out[row] = read(times[row])
        return y

    def _run_compiled(
        self, func: Rhs, y: torch.Tensor, start: int, stop: int, out: dict[int, Any]
    ) -> torch.Tensor | None:
        """`run` on the compiled engine; None where it could not compile."""
        if stop <= start:
            return y
        steps = self.steps[:, start:stop]
        found = (
            _engine_rosenbrock.replay(
                self.req, func.f, func.p, y, None, steps, self.backward,
                self.stats, func.jac,
            )
            if self.req.alg.implicit
            else _engine.replay(
                self.req, func.f, func.p, y, None, steps, self.backward,
                self.stats,
            )
        )  # fmt: skip
        if found is None:
            return None
        first, dense = found
        rows = [(row, n) for n in range(start, stop) for row in self.reads[n]]
        if dense is None:  # fixed step: the saved values are step values
            for row, n in rows:
                out[row] = first[n - start]
            return first[-1]
        if rows:
            index = torch.as_tensor([n - start for _, n in rows], device=y.device)
            at = steps[:, index]
            when = self.times[torch.as_tensor([row for row, _ in rows])]
            values = _engine.interpolate_many(dense[index], at[0], at[2], when)
            for k, (row, _) in enumerate(rows):
                out[row] = values[k]
        return first


def solve_through(req: SolveRequest) -> Solution:
    """ReverseThroughSolver: the plain solve, recording its graph; on the compiled
    engine, its adaptive blocks under autograd (`_engine_adjoint.through`), or
    (fixed steps, Rosenbrock algs) the solve under ``no_grad`` then its steps
    replayed in compiled blocks under autograd (the same steps, so the same
    gradient to rounding)."""
    if not _engine.enabled(req):
        return solve_plain(req)
    if _engine.explicit(req) and not req.fixed_step:
        solved = _engine_adjoint.through(req)
        if solved is not None:
            return solved
    plan = make_plan(req)
    run, schedule = record(plan)
    setup = plan.setup
    replayer = Replayer(plan, schedule)
    reads: dict[int, torch.Tensor] = {}
    replayer.run(setup.rhs(first=False), setup.y0, 0, schedule.needed, reads)
    rows = [setup.y0, *(reads[row] for row in range(1, run.reached))]
    u = _nan_rows(rows, setup.y0, setup.times.shape[0])
    compile_s = (run.compile_s or 0.0) + replayer.stats["compile_s"]
    return finish(req, setup, run._replace(compile_s=compile_s), u)
