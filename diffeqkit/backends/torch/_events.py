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
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..._errors import UnsupportedError
from ..._events import Fired, Tracker, check_affect_output, check_condition_output
from ..._solution import Solution
from .._protocol import SolveRequest, conclude
from ._params import bind, has_modules
from ._rk import AdaptiveRK, State, StoppedError, interpolate, tensor
from ._solve import Setup, prepare, solve_plain, solver_for

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


def _functions(req: SolveRequest) -> tuple[list[Any], list[Any]]:
    """The conditions and affects as functions of p's view (modules bound)."""
    conditions = [e.condition for e in req.events]
    affects = [e.affect for e in req.events]
    if has_modules(req.p):
        conditions = [bind(c, req.p) for c in conditions]
        affects = [None if a is None else bind(a, req.p) for a in affects]
    return conditions, affects


def _check(req: SolveRequest) -> None:
    if req.t1 < req.t0:
        raise UnsupportedError(
            "events=[...] on backend='torch' integrate forward in time only "
            f"(t0={req.t0} < t1); got tspan=({req.t0}, {req.t1}). Use "
            "backend='scipy' for events backward in time."
        )
    if req.fixed_step:
        raise UnsupportedError(
            f"events=[...] on backend='torch' need an adaptive alg (tsit5, dopri5, "
            f"bosh3, dopri8, rosenbrock23) to locate crossings on its dense output; "
            f"alg='{req.alg.name}' steps on a fixed grid. Pass one of those, or use "
            "backend='scipy', which offers events with every alg."
        )


def _locate(req: SolveRequest, setup: Setup, through: bool = False) -> _Located:
    """Run the solve with events (see the module docstring); `through`: with
    autograd recording the steps (ReverseThroughSolver), the jumps corrected so
    that this run is also the differentiable one."""
    conditions, affects = _functions(req)
    p, f, dtype, device = setup.p, setup.f, setup.dtype, setup.device

    def value(i: int, u: Any, t: float) -> float:
        with torch.no_grad():
            return float(conditions[i](u, p, tensor(t, dtype, device)))

    def rhs_at(u: Any, t: float) -> Any:
        with torch.no_grad():
            return f(u, p, tensor(t, dtype, device))

    y0 = setup.y0.detach()
    t0 = float(req.t0)
    for i, condition in enumerate(conditions):
        check_condition_output(i, condition(y0, p, tensor(t0, dtype, device)))
        if affects[i] is not None:
            check_affect_output(i, affects[i](y0, p, tensor(t0, dtype, device)), y0)
    tracker = Tracker(req.events, value, rhs_at, req.max_events)
    ts = [float(t) for t in np.asarray(req.saveat, dtype=np.float64)]
    t1 = float(req.t1)
    rows: list[Any] = [None] * len(ts)
    starts = [t0]
    stats: dict[str, Any] = {"nfev": 0, "naccept": 0, "nreject": 0}
    driver = solver_for(req)
    assert issubclass(driver, AdaptiveRK)  # noqa: S101 - `_check` refused the others
    t_s, y_s, first = t0, setup.y0 if through else y0, req.dt0
    taus: list[list[Any]] = [[] for _ in req.events]
    states: list[list[Any]] = [[] for _ in req.events]
    tracker.start(y_s, t_s)
    status, reached = "success", None
    while True:
        rhs = setup.rhs(first=t_s == t0)
        later = [t for t in ts if t > t_s]
        landings = later if req.land_on_saves else []
        solver = driver(
            rhs,
            y_s,
            req.rtol,
            req.atol,
            first_step=first,
            max_steps=req.max_steps - stats["naccept"] - stats["nreject"],
            step_t=torch.as_tensor([*landings, t1], dtype=torch.float64, device=device),
        )

        def on_accept(state: State) -> None:
            def state_at(time: float) -> Any:
                return interpolate(state.coeffs, state.t0, state.t1, time)

            fired = tracker.check(float(state.t0), float(state.t1), state.y, state_at)
            if fired is not None:
                raise _Found(fired, state)

        solver.on_accept = on_accept
        found: _Found | None = None
        try:
            solver.begin(tensor(t_s, torch.float64, device))
            for j, t in enumerate(ts):
                if t == t_s:
                    rows[j] = y_s
                elif t > t_s:
                    rows[j] = solver.advance(tensor(t, torch.float64, device))
            solver.advance(tensor(t1, torch.float64, device))
        except _Found as stop:
            found = stop
        except StoppedError as stop:
            status, reached = stop.status, stop.t
        _add_stats(stats, run_stats_of(solver, rhs))
        if found is None:
            break
        state, t = found.state, found.fired.t
        for j, s in enumerate(ts):  # the rows of the event's step before it
            if rows[j] is None and t_s < s < t:
                rows[j] = interpolate(state.coeffs, state.t0, state.t1, s)
        u = (
            state.y
            if t == float(state.t1)
            else interpolate(state.coeffs, state.t0, state.t1, t)
        )
        if not tracker.record(found.fired, u):
            status, reached = "too_many_events", t
            break
        index = found.fired.index
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
        first = min(float(state.t1 - state.t0), t1 - t)
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
    nan = torch.full_like(setup.y0, torch.nan)
    u = torch.stack([nan if r is None else r for r in rows])
    return conclude(
        req,
        t=tensor(req.saveat, setup.dtype, setup.device),
        u=u,
        stats=located.stats,
        status=located.status,
        t_reached=req.t1 if located.t_reached is None else located.t_reached,
        t_events=t_events,
        u_events=u_events,
    )


def _stacked(values: list[Any], like: torch.Tensor) -> torch.Tensor:
    if values:
        return torch.stack(values)
    return like.new_zeros((0, *like.shape[1:]) if like.dim() else (0,))


def solve(
    req: SolveRequest, segment: Callable[[SolveRequest], Solution] | None
) -> Solution:
    """The solve with events; `segment` solves one segment differentiably (the
    sensealg's solve), or is None for a solve autograd does not record."""
    _check(req)
    through = segment is solve_plain  # ReverseThroughSolver: one differentiable run
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
    conditions, affects = _functions(req)
    p, f, dtype, device = setup.p, setup.f, setup.dtype, setup.device
    tracker = located.tracker
    fired = sorted((t, i) for i, times in enumerate(tracker.times) for t in times)
    ts = [float(t) for t in np.asarray(req.saveat, dtype=np.float64)]
    rows: list[Any] = [None] * len(ts)
    t_events: list[list[Any]] = [[] for _ in req.events]
    u_events: list[list[Any]] = [[] for _ in req.events]
    u_start: Any = setup.y0
    t1 = float(req.t1)
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
                    t0=start,
                    t1=end,
                    saveat=np.array([*times, end]),
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
