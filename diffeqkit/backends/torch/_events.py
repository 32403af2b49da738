"""Events on torch: located on the adaptive drivers' dense output, and made
differentiable by composing segment solves (docs/design.md, "Events").

The locating run drives the alg's `AdaptiveRK` segment by segment with the
shared `diffeqkit._events.Tracker` watching every accepted step; at an event it
saves the rows before it from that step's dense output, applies the affect and
restarts there. Without gradients that run is the solve.

With gradients, each segment between events is solved again by the request's
sensealg (an ordinary differentiable solve from the segment's start to the
located time), and the event time and jump are glued on with value-preserving
corrections whose derivatives are the implicit-function theorem's: with ``g``
the condition and ``sg`` a detach, ``tau = t* + (sg(g) - g) / sg(dg/dt)`` (value
``t*``), the state at the event ``u- + sg(f(u-)) (tau - sg(tau))``, after the
affect ``u+``, and the next segment starts from
``u+ - sg(f(u+)) (tau - sg(tau))``. So every sensealg differentiates events.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..._events import Fired, Tracker, check_affect_output, check_condition_output
from ..._saveat import step_grid
from ..._solution import Solution
from .._protocol import SolveRequest, conclude
from ._params import bind, has_modules
from ._rk import (
    AdaptiveRK,
    State,
    StoppedError,
    fixed_step,
    fixed_tableau,
    interpolate,
    tensor,
)
from ._solve import Setup, prepare, solver_for

__all__ = ["solve"]


class _Found(Exception):  # noqa: N818 - control flow, never seen by users
    """Raised from a step's `on_accept` to stop the driver at an event."""

    def __init__(self, fired: Fired, state: State) -> None:
        super().__init__()
        self.fired = fired
        self.state = state


@dataclasses.dataclass
class _Located:
    """The locating run: rows at the save times, events, segments, outcome."""

    rows: list[Any]
    tracker: Tracker
    starts: list[float]  # each segment's start: t0, then every event time
    status: str
    t_reached: float | None
    stats: dict[str, Any]
    t_events: list[Any]  # per event, its times (differentiable when `through`)
    u_events: list[Any]  # per event, the states there before its jump


def _functions(req: SolveRequest, setup: Setup) -> tuple[list[Any], list[Any]]:
    """The conditions and affects as functions of p's view (modules bound), in
    the solver's time (``-t`` for ``t1 < t0``)."""
    conditions: list[Any] = [e.condition for e in req.events]
    affects: list[Any] = [e.affect for e in req.events]
    if has_modules(req.p):
        conditions = [bind(c, req.p) for c in conditions]
        affects = [None if a is None else bind(a, req.p) for a in affects]
    if setup.backward:
        conditions = [_negated_time(c) for c in conditions]
        affects = [None if a is None else _negated_time(a) for a in affects]
    return conditions, affects


def _negated_time(fn: Callable[..., Any]) -> Callable[..., Any]:
    def in_solver_time(u: Any, p: Any, s: Any) -> Any:
        return fn(u, p, -s)

    return in_solver_time


def _times_of(req: SolveRequest, setup: Setup) -> tuple[float, float, list[float]]:
    """``(t0, t1, save times)`` in the solver's time (negated for ``t1 < t0``)."""
    sign = -1.0 if setup.backward else 1.0
    saves = np.asarray(req.saveat, dtype=np.float64)
    return sign * float(req.t0), sign * float(req.t1), (sign * saves).tolist()


def _locate(req: SolveRequest, setup: Setup, through: bool = False) -> _Located:
    """Run the solve with events (see the module docstring); `through`: with
    autograd recording the steps (ReverseThroughSolver), the jumps corrected so
    that this run is also the differentiable one."""
    conditions, affects = _functions(req, setup)
    p, f, dtype, device = setup.p, setup.f, setup.dtype, setup.device

    def value(i: int, u: Any, t: float) -> float:
        with torch.no_grad():
            return float(conditions[i](u, p, tensor(t, dtype, device)))

    def rhs_at(u: Any, t: float) -> Any:
        with torch.no_grad():
            return f(u, p, tensor(t, dtype, device))

    y0 = setup.y0.detach()
    t0, t1, ts = _times_of(req, setup)
    for i, condition in enumerate(conditions):
        check_condition_output(i, condition(y0, p, tensor(t0, dtype, device)))
        if affects[i] is not None:
            check_affect_output(i, affects[i](y0, p, tensor(t0, dtype, device)), y0)
    tracker = Tracker(req.events, value, rhs_at, req.max_events)
    rows: list[Any] = [None] * len(ts)
    starts = [t0]
    stats: dict[str, Any] = {"nfev": 0, "naccept": 0, "nreject": 0}
    t_s, y_s, first = t0, setup.y0 if through else y0, req.dt0
    taus: list[list[Any]] = [[] for _ in req.events]
    states: list[list[Any]] = [[] for _ in req.events]
    tracker.start(y_s, t_s)
    status, reached = "success", None
    segment = _fixed_segment if req.fixed_step else _adaptive_segment
    while True:
        for j, s in enumerate(ts):
            if s == t_s:
                rows[j] = y_s
        run = _Run(req, setup, tracker, rows, ts, t_s, y_s, first, stats, t0, t1)
        stop = segment(run)
        if stop.fired is None:
            status, reached = stop.status, stop.reached
            break
        fired, u = stop.fired, stop.u
        t = fired.t
        if not tracker.record(fired, u):
            status, reached = "too_many_events", t
            break
        index = fired.index
        affect = affects[index]
        if through:
            tau, u_event, u = _jump(
                conditions[index], affect, f, p, u, t, dtype, device
            )
        else:
            tau, u_event = tensor(t, dtype, device), u
            if affect is not None:
                u = affect(u, p, tau)
        taus[index].append(tau)
        states[index].append(u_event)
        if req.events[index].terminal or t == t1:
            for j, s in enumerate(ts):
                if s == t:
                    rows[j] = u  # a save time at the event: after its jump
            status = "terminated" if req.events[index].terminal else "success"
            reached = t
            break
        starts.append(t)
        t_s, y_s = t, u
        first = min(stop.step, t1 - t)
        tracker.start(y_s, t_s, index)
    stats["nevents"] = tracker.count
    like = setup.y0.unsqueeze(0)
    return _Located(
        rows,
        tracker,
        starts,
        status,
        reached,
        stats,
        [_times(x, dtype, device) for x in taus],
        [_stacked(x, like) for x in states],
    )


@dataclasses.dataclass
class _Run:
    """One segment of the locating run: from `y` at `t` towards t1, filling
    `rows` at the save times `ts` it passes and adding to `stats`."""

    req: SolveRequest
    setup: Setup
    tracker: Tracker
    rows: list[Any]
    ts: list[float]
    t: float
    y: Any
    first: float | None
    stats: dict[str, Any]
    t0: float  # the solve's t0 and t1 in solver time
    t1: float


@dataclasses.dataclass
class _Stop:
    """How a segment ended: at an event (`fired`, the state `u` there before its
    jump, the size of the step it ended) or at t1 or a failure (`status`)."""

    fired: Fired | None = None
    u: Any = None
    step: float = 0.0
    status: str = "success"
    reached: float | None = None


def _adaptive_segment(run: _Run) -> _Stop:
    """A segment with the alg's `AdaptiveRK`, the tracker in its ``on_accept``;
    rows before an event come from the dense output of the step that found it."""
    req, setup, tracker, rows, ts = run.req, run.setup, run.tracker, run.rows, run.ts
    device, t_s, t1 = setup.device, run.t, run.t1
    driver = solver_for(req)
    assert issubclass(driver, AdaptiveRK)  # noqa: S101 - fixed-step: `_fixed_segment`
    rhs = setup.rhs(first=t_s == run.t0)
    landings = [t for t in ts if t > t_s] if req.land_on_saves else []
    used = run.stats["naccept"] + run.stats["nreject"]
    solver = driver(
        rhs,
        run.y,
        req.rtol,
        req.atol,
        first_step=run.first,
        max_steps=req.max_steps - used,
        step_t=torch.as_tensor([*landings, t1], dtype=torch.float64, device=device),
    )

    def on_accept(state: State) -> None:
        def state_at(time: float) -> Any:
            return interpolate(state.coeffs, state.t0, state.t1, time)

        fired = tracker.check(float(state.t0), float(state.t1), state.y, state_at)
        if fired is not None:
            raise _Found(fired, state)

    solver.on_accept = on_accept
    try:
        solver.begin(tensor(t_s, torch.float64, device))
        for j, t in enumerate(ts):
            if t > t_s:
                rows[j] = solver.advance(tensor(t, torch.float64, device))
        solver.advance(tensor(t1, torch.float64, device))
    except _Found as found:
        state, t = found.state, found.fired.t
        for j, s in enumerate(ts):  # the rows of the event's step before it
            if rows[j] is None and t_s < s < t:
                rows[j] = interpolate(state.coeffs, state.t0, state.t1, s)
        at_end = t == float(state.t1)
        u = state.y if at_end else interpolate(state.coeffs, state.t0, state.t1, t)
        _add_stats(run.stats, run_stats_of(solver, rhs))
        return _Stop(found.fired, u, float(state.t1 - state.t0))
    except StoppedError as stopped:
        _add_stats(run.stats, run_stats_of(solver, rhs))
        return _Stop(status=stopped.status, reached=stopped.t)
    _add_stats(run.stats, run_stats_of(solver, rhs))
    return _Stop()


def _fixed_segment(run: _Run) -> _Stop:
    """A segment on the fixed grid ``t + k*dt0`` (merged with the save times), as
    a fixed-step solve from `t` would step. A crossing is located on the step's
    cubic Hermite interpolant (f at its end is evaluated only then); the state
    at the event is a step of the alg to it, as the solve of the segment that
    ends there takes."""
    req, setup, tracker, rows, ts = run.req, run.setup, run.tracker, run.rows, run.ts
    device, t_s, t1 = setup.device, run.t, run.t1
    assert req.dt0 is not None  # noqa: S101 - the core requires it
    later = [t for t in ts if t > t_s]
    grid = step_grid(t_s, t1, req.dt0, np.array([t_s, *later, t1]))
    tableau = fixed_tableau(req.alg.name)
    rhs = setup.rhs(first=t_s == run.t0)
    row_of = {t: j for j, t in enumerate(ts)}
    y, naccept = run.y, 0

    def time(x: float) -> torch.Tensor:
        return tensor(x, torch.float64, device)

    def done(stop: _Stop) -> _Stop:
        _add_stats(run.stats, {"nfev": rhs.nfev, "naccept": naccept, "nreject": 0})
        return stop

    for a, b in itertools.pairwise(grid.tolist()):
        ta, tb = time(a), time(b)
        dy, f_a = fixed_step(tableau, rhs, ta, tb - ta, tb, y)
        y_b = y + dy
        naccept += 1
        if not bool(torch.isfinite(y_b).all()):
            return done(_Stop(status="nonfinite", reached=a))
        f_b: list[Any] = []

        def state_at(s: float, y=y, f_a=f_a, y_b=y_b, a=a, b=b, f_b=f_b) -> Any:
            if not f_b:
                with torch.no_grad():
                    f_b.append(rhs(time(b), y_b))
            return _hermite(y, f_a, y_b, f_b[0], a, b, s)

        fired = tracker.check(a, b, y_b, state_at)
        if fired is not None:
            u = y_b
            if fired.t != b:
                tt = time(fired.t)
                u = y + fixed_step(tableau, rhs, ta, tt - ta, tt, y)[0]
            return done(_Stop(fired, u, req.dt0))
        if b in row_of:
            rows[row_of[b]] = y_b
        y = y_b
    return done(_Stop())


def _hermite(y0: Any, f0: Any, y1: Any, f1: Any, a: float, b: float, t: float) -> Any:
    """The cubic Hermite interpolant of a step from `a` to `b` at `t`."""
    h = b - a
    x = (t - a) / h
    return (
        (2 * x**3 - 3 * x**2 + 1) * y0
        + (x**3 - 2 * x**2 + x) * h * f0
        + (-2 * x**3 + 3 * x**2) * y1
        + (x**3 - x**2) * h * f1
    )


def run_stats_of(solver: AdaptiveRK, rhs: Any) -> dict[str, Any]:
    stats = {
        "nfev": rhs.nfev,
        "naccept": solver.naccept,
        "nreject": solver.nsteps - solver.naccept,
    }
    if hasattr(solver, "njev"):
        stats["njev"] = solver.njev  # pyright: ignore[reportAttributeAccessIssue]
        stats["nlu"] = solver.nlu  # pyright: ignore[reportAttributeAccessIssue]
    return stats


def _add_stats(total: dict[str, Any], more: dict[str, Any]) -> None:
    for key, value in more.items():
        total[key] = total.get(key, 0) + value


def _finish(
    req: SolveRequest,
    setup: Setup,
    rows: list[Any],
    located: _Located,
    t_events: list[Any],
    u_events: list[Any],
) -> Solution:
    """The `Solution`, its times back in the user's time (`t_events` and
    ``t_reached`` come in the solver's)."""
    nan = torch.full_like(setup.y0, torch.nan)
    u = torch.stack([nan if r is None else r for r in rows])
    sign = -1.0 if setup.backward else 1.0
    reached = located.t_reached
    return conclude(
        req,
        t=tensor(req.saveat, setup.dtype, setup.device),
        u=u,
        stats=located.stats,
        status=located.status,
        t_reached=req.t1 if reached is None else sign * reached,
        t_events=[sign * times for times in t_events],
        u_events=u_events,
    )


def _stacked(values: list[Any], like: torch.Tensor) -> torch.Tensor:
    if values:
        return torch.stack(values)
    return like.new_zeros((0, *like.shape[1:]) if like.dim() else (0,))


def solve(
    req: SolveRequest,
    segment: Callable[[SolveRequest], Solution] | None,
    *,
    through: bool = False,
) -> Solution:
    """The solve with events; `segment` solves one segment differentiably (the
    sensealg's solve), or is None for a solve autograd does not record;
    `through` (ReverseThroughSolver): one run with autograd recording it all."""
    setup = prepare(req, graph=through)
    with torch.set_grad_enabled(through and torch.is_grad_enabled()):
        located = _locate(req, setup, through)
    if through or segment is None or located.status not in ("success", "terminated"):
        # one run: no derivative wanted, none (a failed solve), or its own
        return _finish(
            req, setup, located.rows, located, located.t_events, located.u_events
        )
    return _differentiable(req, setup, located, segment)


def _differentiable(
    req: SolveRequest,
    setup: Setup,
    located: _Located,
    segment: Callable[[SolveRequest], Solution],
) -> Solution:
    """The located solve again, segment by segment, differentiably."""
    conditions, affects = _functions(req, setup)
    p, f, dtype, device = setup.p, setup.f, setup.dtype, setup.device
    tracker = located.tracker
    fired = sorted((t, i) for i, times in enumerate(tracker.times) for t in times)
    _, t1, ts = _times_of(req, setup)  # solver time
    sign = -1.0 if setup.backward else 1.0
    rows: list[Any] = [None] * len(ts)
    t_events: list[list[Any]] = [[] for _ in req.events]
    u_events: list[list[Any]] = [[] for _ in req.events]
    u_start: Any = setup.y0
    # (a solve that failed never comes here: it has no derivative)
    ends = [*(t for t, _ in fired), t1]
    for k, start in enumerate(located.starts):
        end = ends[k]
        inside = [j for j, t in enumerate(ts) if start <= t < end]
        times = [ts[j] for j in inside]
        if end > start:
            sol = segment(
                dataclasses.replace(
                    req,
                    u0=u_start,
                    p=req.p,
                    t0=sign * start,
                    t1=sign * end,
                    saveat=sign * np.array([*times, end]),
                    events=(),
                    throw=False,
                )
            )
            seg_u = sol.u
        else:  # an event at the very start of the segment
            seg_u = torch.stack([u_start] * (len(times) + 1))
        for row, j in enumerate(inside):
            rows[j] = seg_u[row]
        u_minus = seg_u[-1]
        if k >= len(fired):  # the last segment, to t1
            for j, t in enumerate(ts):
                if t == t1:
                    rows[j] = u_minus
            break
        t_star, index = fired[k]
        tau, u_event, u_after = _jump(
            conditions[index], affects[index], f, p, u_minus, t_star, dtype, device
        )
        t_events[index].append(tau)
        u_events[index].append(u_event)
        u_start = u_after
        event = req.events[index]
        if event.terminal or t_star == t1:
            for j, t in enumerate(ts):
                if t == t_star:
                    rows[j] = u_after
            break
    return _finish(
        req,
        setup,
        rows,
        located,
        [_times(times, dtype, device) for times in t_events],
        [_stacked(states, setup.y0.unsqueeze(0)) for states in u_events],
    )


def _times(taus: list[Any], dtype: torch.dtype, device: torch.device) -> Any:
    if taus:
        return torch.stack(taus)
    return torch.zeros(0, dtype=dtype, device=device)


def _jump(
    condition: Callable[..., Any],
    affect: Callable[..., Any] | None,
    f: Callable[..., Any],
    p: Any,
    u_minus: torch.Tensor,
    t_star: float,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tau, u at the event, the next segment's start)``: values ``t*``, ``u-``
    and ``u+``, derivatives those of a moving event (module docstring)."""
    t = tensor(t_star, dtype, device)
    # sg(dg/dt) along the flow: one backward pass of g on detached inputs
    with torch.enable_grad():
        u_d = u_minus.detach().requires_grad_()
        t_d = t.clone().requires_grad_()
        g_d = condition(u_d, _detached(p), t_d)
        du, dt = torch.autograd.grad(g_d, [u_d, t_d], allow_unused=True)
    f_minus = f(u_minus.detach(), _detached(p), t).detach()
    rate = t.new_zeros(())
    if du is not None:
        rate = rate + (du * f_minus).sum()
    if dt is not None:
        rate = rate + dt
    g = condition(u_minus, p, t)
    tau = t + (g.detach() - g) / rate.detach()
    moved = tau - tau.detach()
    u_event = u_minus + f_minus * moved
    u_plus = u_event if affect is None else affect(u_event, p, tau)
    if affect is None:
        return tau, u_event, u_minus  # the flow goes on: no correction
    f_plus = f(u_plus.detach(), _detached(p), t).detach()
    return tau, u_event, u_plus - f_plus * moved


def _detached(p: Any) -> Any:
    from ..._pytree import tree_map

    return tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, p)
