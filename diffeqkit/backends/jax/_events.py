"""Events on JAX: a solve cut into segments at the zero crossings of the events'
conditions, inside one compiled program (under ``jax.jit``, ``jax.grad`` and
``jax.vmap``).

Each segment is located by diffrax's own `diffrax.Event`: the solve from the
segment's start towards ``t1`` stops at the first step where a condition crosses
zero in its direction, and a Newton iteration on that step's interpolant finds
the crossing to a few ulps of t. The located time carries no gradient; the
segment's differentiable state at it comes from an ordinary solve over
``[t_start, t*]`` run by the request's sensealg entry (the same as without
events), and the event time and the jump are glued on with the value-preserving
corrections of the implicit-function theorem (docs/events.md):

    tau = t* + (sg(g) - g) / sg(dg/dt)       value t*, derivative dt*/dtheta
    u_ev = u- + sg(f(u-)) (tau - sg(tau))     the state at a moving time
    u_start = affect(u_ev) - sg(f(u+)) (tau - sg(tau))

A solve first runs as the plain solve of ``[t0, t1]`` with a step-size
controller (`_Watch`) that only tests the conditions' signs at the end of each
accepted step and stops at the first step where one crossed: when none does
(events that never fire), that is the solve, at the cost of the sign tests.
Only after a crossing do the segments run, from t0, in a ``lax.while_loop``
(at most ``max_events + 1`` of them, under a ``lax.cond``); forward-mode AD
goes through both, which is how `ForwardMode` differentiates any events (a
custom VJP computing the Jacobian by forward mode, as without events).
Reverse-mode AD cannot go through `lax.while_loop`: with only terminal events the
loop locates without gradients and one differentiable solve of ``[t0, t*]``
follows; with events that continue, the reverse sensealgs run equinox's
checkpointed while loop over the segments (its backward pass recomputes them
from a few checkpoints, one segment's residuals at a time, so its cost follows
the events that fired, not `max_events`). Either way the reverse path is a
custom VJP whose primal is the plain loop, so a jitted solve that is not
differentiated costs no more than that.

Fixed steps (a fixed-step alg, or ``adaptive=False``) follow SciPy's and torch's
grid: ``t_s + k*dt0`` merged with the save times, restarting at each event
time. Its length is data, so a step-size controller (`_grid.Grid`) builds it one
step at a time instead of `diffrax.StepTo`; segments are located on the steps'
cubic Hermite interpolant (`_grid.hermite_solver`) and the state at an event is
the segment solved again on its grid (its last step one of the alg to t*), also
without gradients. The adjoints step backward on an array grid and are refused.

Under ``jax.jit`` the event outputs have static shapes: ``t_events[i]`` is
``(max_events,)`` and ``u_events[i]`` ``(max_events, *u0.shape)``, padded with
NaN after the events that fired; an eager solve trims them to exact length.

Conventions: a save time equal to an event time holds the state after the jump
(the next segment's); a terminal event applies its affect, if any, and stops
(as on SciPy and torch: a save time there holds the state after it); when
several events cross in one step diffrax locates the first listed,
so a segment in which another enabled event also changed sign before that time
is solved again up to there with only those events (the earliest fires first);
two events crossing at the same time fire once (the other is "at zero" at the
restart). The padded buffers ride in the loop's carry: with large states a
smaller `max_events` is faster (benchmarks/results/events_overhead_jax.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from ..._errors import UnsupportedError
from ..._events import Event, check_affect_output, check_condition_output
from ..._problem import check_rhs_output
from ._grid import Grid, hermite_solver
from ._solve import (
    RESULTS,
    STATUSES,
    Config,
    Job,
    all_finite,
    diffeqsolve,
    failure_masked,
    fixed_inputs,
    solve_with,
)

__all__ = ["EventConfig", "program", "solve_events"]

_SUCCESS = STATUSES.index("success")
_TERMINATED = STATUSES.index("terminated")
_TOO_MANY = STATUSES.index("too_many_events")
_FAILED = STATUSES.index("solver_failed")

# diffrax's outcome of a segment -> status (an event is handled by the loop).
_SEGMENT_STATUS = {
    "successful": "success",
    "event_occurred": "success",
    "max_steps_reached": "max_steps_reached",
    "dt_min_reached": "step_size_too_small",
    "nonfinite": "nonfinite",
    "nonfinite_input": "nonfinite",
}

_TIMES = (
    "sensealg=dk.ForwardMode() on backend='jax' differentiates a solve with events "
    "with respect to u0 and p only, not tspan, saveat, rtol or atol."
)

_TIMES_REVERSE = (
    "A solve with events on backend='jax' is differentiated with respect to u0 "
    "and p only, not tspan, saveat, rtol or atol."
)

# A condition within this many ulps of t (times its rate of change) of zero at a
# segment's start (t0, or right after a jump) is "at zero": it does not fire there,
# only once it has left zero in the direction it moves and crosses again.
_AT_ZERO_ULPS = 1000


@dataclass(frozen=True)
class EventConfig:
    """The static part of a solve with events (part of the program's key)."""

    events: tuple[Event, ...]
    max_events: int
    # p's inputs -> p, to call the user's conditions and affects.
    bind: Callable[[Callable[..., Any]], Callable[..., Any]]
    # Whether the solve runs under the vmap of an ensemble.
    batched: bool = False

    @property
    def all_terminal(self) -> bool:
        return all(e.terminal for e in self.events)


def _status_code(result: Any) -> Any:
    code = jnp.array(_FAILED, dtype=jnp.int32)
    for name, status in _SEGMENT_STATUS.items():
        code = jnp.where(result == getattr(RESULTS, name), STATUSES.index(status), code)
    return code


def _rate(g: Callable[..., Any], f: Callable[..., Any], u: Any, p: Any, t: Any) -> Any:
    """d/dt of ``g(u(t), p, t)`` along the flow: one JVP, no gradient."""
    u, p, t = jax.lax.stop_gradient((u, p, t))
    _, dg = jax.jvp(lambda u, t: g(u, p, t), (u, t), (f(u, p, t), jnp.ones_like(t)))
    return dg


class _Watch(diffrax.AbstractAdaptiveStepSizeController):
    """A step-size controller around `controller` that watches the events'
    conditions over every accepted step and stops the solve (diffrax's
    ``event_occurred``) at the end of the first step over which one changed
    sign: ``g(y0) * g(y1) < 0`` between the step's ends, or ``g(y1) == 0``.

    Only a sign test per step, no root finding and no copy of the step's dense
    output: the cheap first try of a solve whose events may never fire. Its
    steps are the plain solve's.

    The test reads both ends of the step, which the controller is given, and
    so adds nothing to the loop's carry: carrying even one value (the sign at
    t0) cost more than the test on a small problem (bare diffrax, tiny
    Lotka-Volterra: 1.14x the plain solve against 1.03x). A condition exactly
    at zero at t0 is not a crossing here (as in the loop of segments, which
    takes the sign it moves to). It stops at a crossing in either direction,
    also one an event's `direction` ignores: the loop of segments then sorts
    it out.
    """

    controller: Any
    conditions: tuple[Callable[..., Any], ...] = eqx.field(static=True)
    sign: Any = 1  # of the direction of integration (diffrax's time is its own)

    # (A fixed grid's controller has no tolerances.)
    @property
    def rtol(self) -> Any:  # pyright: ignore[reportIncompatibleVariableOverride]
        return getattr(self.controller, "rtol", 0.0)

    @property
    def atol(self) -> Any:  # pyright: ignore[reportIncompatibleVariableOverride]
        return getattr(self.controller, "atol", 0.0)

    @property
    def norm(self) -> Any:  # pyright: ignore[reportIncompatibleMethodOverride]
        return getattr(self.controller, "norm", None)

    def wrap(self, direction: Any) -> Any:
        return eqx.tree_at(
            lambda s: (s.controller, s.sign),
            self,
            (self.controller.wrap(direction), direction),
        )

    def init(  # pyright: ignore[reportIncompatibleMethodOverride]
        self,
        terms: Any,
        t0: Any,
        t1: Any,
        y0: Any,
        dt0: Any,
        args: Any,
        func: Any,
        error_order: Any,
    ) -> tuple[Any, Any]:
        return self.controller.init(terms, t0, t1, y0, dt0, args, func, error_order)

    def adapt_step_size(  # pyright: ignore[reportIncompatibleMethodOverride]
        self,
        t0: Any,
        t1: Any,
        y0: Any,
        y1_candidate: Any,
        args: Any,
        y_error: Any,
        error_order: Any,
        controller_state: Any,
    ) -> tuple[Any, Any, Any, Any, Any, Any]:
        keep, next_t0, next_t1, jump, inner, result = self.controller.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state
        )
        ya, yb, p, ta, tb = jax.lax.stop_gradient(
            (y0, y1_candidate, args, t0 * self.sign, t1 * self.sign)
        )
        crossed = None
        for g in self.conditions:
            ga, gb = g(ya, p, ta), g(yb, p, tb)
            this = (ga * gb < 0) | (gb == 0)
            crossed = this if crossed is None else crossed | this
        result = RESULTS.where(keep & crossed, RESULTS.event_occurred, result)
        return keep, next_t0, next_t1, jump, inner, result


@dataclass(frozen=True)
class _Segment:
    """What locating one segment found (no gradients)."""

    t_end: Any  # the event time, or where the solve stopped
    y_end: Any  # the state there (from the interpolant)
    ys: Any  # the save times' states (clipped to the segment; inf past t_end)
    fired: Any  # whether an event stopped it
    which: Any  # the index of that event
    # Per event: whether another enabled event crossed before the one that
    # stopped the solve (diffrax picks the first listed in a step, not the
    # earliest crossing): then the segment is solved again up to there.
    crossed: Any
    code: Any  # status of the segment (success unless it failed)
    naccept: Any
    nreject: Any


def _locate(
    cfg: Config,
    ev: EventConfig,
    y0: Any,
    p: Any,
    times: Any,
    ts: Any,
    t_s: Any,
    cap: Any,
    enabled: Any,
) -> _Segment:
    """The solve from ``t_s`` towards ``cap`` (t1, or the end of a segment being
    solved again), stopped by the first crossing of an `enabled` event."""
    y0, p = jax.lax.stop_gradient((y0, p))
    _, t1, rtol, atol, dt0 = times
    method = cfg.method
    conditions = [ev.bind(e.condition) for e in ev.events]
    eps = jnp.finfo(y0.dtype).eps
    span = jnp.abs(t1 - t_s)
    scale_t = jnp.maximum(jnp.abs(t_s), jnp.abs(t1))
    ulp = eps * jnp.maximum(jnp.abs(t_s), jnp.finfo(y0.dtype).tiny)
    tiny = jnp.finfo(y0.dtype).tiny

    def wrapped(g: Callable[..., Any], on: Any) -> tuple[Any, ...]:
        g0 = g(y0, p, t_s)
        rate = _rate(g, cfg.f, y0, p, t_s)
        at_zero = jnp.abs(g0) <= _AT_ZERO_ULPS * ulp * jnp.abs(rate)
        # At the start a condition at zero takes the sign it is moving to, so its
        # own zero there is not a crossing.
        start = jnp.where(at_zero, jnp.where(rate >= 0, 1.0, -1.0), g0)
        # Scaled so that its values near the root are about times (Newton's
        # tolerance on the residual is one on time).
        scale = jnp.abs(rate) + jnp.abs(g0) / jnp.where(span > 0, span, 1.0) + tiny

        start = jnp.where(on, start / scale, 1.0).astype(y0.dtype)

        def cond(t: Any, y: Any, args: Any, **_: Any) -> Any:
            # A disabled event is a constant: it never crosses. At t_s the value
            # is `start` but the slope is the condition's: Newton's iterates may
            # be clipped to the step's start, where a zero slope would give NaN
            # (a crossing within rounding of t_s, as right after another event).
            value = g(y, args, t) / scale
            value = value + jnp.where(
                t == t_s, start - jax.lax.stop_gradient(value), 0.0
            )
            return jnp.where(on, value, 1.0).astype(y0.dtype)

        return cond, start

    direction = [{0: None, 1: True, -1: False}[e.direction] for e in ev.events]
    # Tolerances in time: a few ulps (optimistix types them as floats).
    newton: Any = optx.Newton
    root_finder = newton(rtol=4 * eps, atol=4 * eps * scale_t)
    conds, starts = zip(
        *(wrapped(g, enabled[i]) for i, g in enumerate(conditions)), strict=True
    )
    event = diffrax.Event(list(conds), root_finder=root_finder, direction=direction)
    lo, hi = jnp.minimum(t_s, cap), jnp.maximum(t_s, cap)
    if cfg.fixed_step:
        # Located on the steps' cubic Hermite interpolants, as on SciPy and torch.
        controller: Any = Grid(start=t_s, dt0=dt0, ts=jnp.clip(ts, lo, hi))
        solver, step0 = hermite_solver(method.build(True)), None
    else:
        pid = method.controller(rtol, atol)
        controller = (
            diffrax.ClipStepSizeController(pid, step_ts=ts) if cfg.land else pid
        )
        solver = method.build()
        step0 = jnp.where(cap > t_s, dt0, -dt0) if cfg.adaptive_dt0 else None
    sol = diffrax.diffeqsolve(
        method.term(cfg.f),
        solver,
        t_s,
        cap,
        step0,
        y0,
        args=p,
        saveat=diffrax.SaveAt(
            subs=[
                diffrax.SubSaveAt(ts=jnp.clip(ts, lo, hi)),
                diffrax.SubSaveAt(t1=True),
            ]
        ),
        stepsize_controller=controller,
        max_steps=cfg.max_steps,
        event=event,
        throw=False,
    )
    mask = jnp.stack(
        [jnp.asarray(m) for m in jax.tree_util.tree_leaves(sol.event_mask)]
    )
    fired = jnp.any(mask)
    ts_out, ys_out = sol.ts, sol.ys
    ts_out, ys_out = cast("Any", ts_out), cast("Any", ys_out)
    # A Newton iteration that stalled within rounding of the root still located it.
    code = jnp.where(fired, _SUCCESS, _status_code(sol.result))
    which = jnp.argmax(mask).astype(jnp.int32)
    t_end, y_end = ts_out[1][0], ys_out[1][0]
    crossed = []
    for i, (cond, e) in enumerate(zip(conds, ev.events, strict=True)):
        before, after = starts[i], cond(t_end, y_end, p)
        if e.direction == 0:
            flip = jnp.sign(before) != jnp.sign(after)
        elif e.direction == 1:
            flip = (before <= 0) & (after > 0)
        else:
            flip = (before > 0) & (after <= 0)
        crossed.append(flip & enabled[i] & (which != i))
    stats: Any = sol.stats
    return _Segment(
        t_end=t_end,
        y_end=y_end,
        ys=ys_out[0],
        fired=fired,
        which=which,
        crossed=fired & jnp.stack(crossed),
        code=code,
        naccept=jnp.asarray(stats["num_accepted_steps"]).astype(jnp.int32),
        nreject=jnp.asarray(stats["num_rejected_steps"]).astype(jnp.int32),
    )


@dataclass(frozen=True)
class _Carry:
    """The state of the loop over segments (a pytree)."""

    t_s: Any  # where the next segment starts
    y_s: Any  # and its state there (differentiable)
    ys: Any
    t_ev: Any
    u_ev: Any
    count: Any  # per event
    code: Any
    done: Any
    naccept: Any
    nreject: Any
    t_end: Any  # where the last segment ended
    which: Any  # the event that ended it, if one did
    # Solving a segment again up to `cap` with only the events that crossed
    # before `pending` enabled; if none fires, `pending` fires at `cap`.
    cap: Any
    enabled: Any
    retry: Any
    pending: Any


_FIELDS = [f for f in _Carry.__dataclass_fields__]
jax.tree_util.register_dataclass(_Carry, data_fields=_FIELDS, meta_fields=[])


def _grid_of(cfg: Config, t_s: Any, times: Any, ts: Any) -> Grid | None:
    """The fixed-step grid from `t_s` (``t_s + k*dt0`` merged with `ts`), or None
    for an adaptive solve."""
    return Grid(start=t_s, dt0=times[4], ts=ts) if cfg.fixed_step else None


def _plain_entry(job: Job) -> tuple[Any, Any]:
    """A segment's solve on its fixed grid, not differentiated."""
    sol, _ = diffeqsolve(job)
    ys: Any = sol.ys
    return (ys[0] if isinstance(ys, list | tuple) else ys), None


def _jump(
    cfg: Config, ev: EventConfig, which: Any, u_minus: Any, p: Any, t_star: Any
) -> tuple[Any, Any, Any]:
    """``(tau, u_ev, u_next)`` of event `which` at `t_star` (see the module's
    docstring): the event time, the state there before its jump, and the start of
    the next segment (for a terminal event: the state after its jump, which a save
    time at the event holds, as on every backend)."""

    def branch(i: int) -> Callable[[], tuple[Any, ...]]:
        e = ev.events[i]
        g = ev.bind(e.condition)

        def run() -> tuple[Any, ...]:
            value = g(u_minus, p, t_star)
            rate = _rate(g, cfg.f, u_minus, p, t_star)
            tau = t_star + (jax.lax.stop_gradient(value) - value) / rate
            moving = tau - jax.lax.stop_gradient(tau)
            fm = jax.lax.stop_gradient(cfg.f(u_minus, p, t_star))
            u_ev = u_minus + fm * moving.astype(u_minus.dtype)
            u_plus = u_ev if e.affect is None else ev.bind(e.affect)(u_ev, p, tau)
            fp = jax.lax.stop_gradient(cfg.f(u_plus, p, t_star))
            return tau, u_ev, u_plus - fp * moving.astype(u_plus.dtype)

        return run

    tau, u_ev, u_next = jax.lax.switch(
        which, [branch(i) for i in range(len(ev.events))]
    )
    return tau, u_ev, u_next


def _merge(ys: Any, rows: Any, ts: Any, lo: Any, hi: Any, take: Any) -> Any:
    """`ys` with the rows of save times in ``[lo, hi]`` from `rows` if `take`."""
    inside = (ts >= lo) & (ts <= hi) & take
    return jnp.where(inside.reshape((-1,) + (1,) * (rows.ndim - 1)), rows, ys)


def _segment(
    cfg: Config,
    ev: EventConfig,
    entry: Callable[[Job], tuple[Any, Any]] | None,
    p: Any,
    times: Any,
    ts: Any,
    c: _Carry,
) -> _Carry:
    """One segment: locate its end, take its saves and apply its event.

    `entry` (None: no gradient wanted) re-solves ``[t_s, t*]`` differentiably.
    """
    seg = _locate(cfg, ev, c.y_s, p, times, ts, c.t_s, c.cap, c.enabled)
    t_star = jax.lax.stop_gradient(seg.t_end)
    lo, hi = jnp.minimum(c.t_s, t_star), jnp.maximum(c.t_s, t_star)
    if entry is None and not cfg.fixed_step:
        rows, u_minus = seg.ys, seg.y_end
    else:
        # On a fixed grid the state at the event is a step of the alg to it (the
        # solve of [t_s, t*] on its grid), not the interpolant's value there.
        seg_ts = jnp.concatenate([jnp.clip(ts, lo, hi), t_star[None]])
        grid = _grid_of(cfg, c.t_s, times, seg_ts)
        job = Job(cfg, c.y_s, p, (c.t_s, t_star, *times[2:]), seg_ts, grid)
        out, _ = (entry or _plain_entry)(job)
        rows, u_minus = out[:-1], out[-1]

    ok = seg.code == _SUCCESS
    # An earlier crossing in the step: solve [t_s, t*] again with those events.
    conflict = ok & jnp.any(seg.crossed)
    # Solved again and none of them fired after all: the one found first fires.
    late = c.retry & jnp.logical_not(seg.fired) & ok
    fired = ok & ((seg.fired & jnp.logical_not(conflict)) | late)
    which = jnp.where(seg.fired, seg.which, c.pending)
    ys = _merge(c.ys, rows, ts, lo, hi, jnp.logical_not(conflict))

    tau, u_ev, u_next = _jump(cfg, ev, which, u_minus, p, t_star)
    terminal = jnp.asarray([e.terminal for e in ev.events])[which]
    room = jnp.sum(c.count) < ev.max_events
    record = fired & room
    slot = jnp.minimum(c.count[which], ev.max_events - 1)
    t_ev = c.t_ev.at[which, slot].set(jnp.where(record, tau, c.t_ev[which, slot]))
    u_ev_all = c.u_ev.at[which, slot].set(jnp.where(record, u_ev, c.u_ev[which, slot]))
    count = c.count.at[which].add(record.astype(c.count.dtype))
    code = jnp.where(
        ok,
        jnp.where(
            fired,
            jnp.where(room, jnp.where(terminal, _TERMINATED, _SUCCESS), _TOO_MANY),
            _SUCCESS,
        ),
        seg.code,
    ).astype(jnp.int32)
    go_on = fired & room & jnp.logical_not(terminal)
    # A save time on a terminal event holds the state after its jump (after a
    # continuing one, the next segment starts there with it).
    at_event = (record & terminal & (ts == t_star)).reshape((-1,) + (1,) * u_next.ndim)
    ys = jnp.where(at_event, u_next[None], ys)
    # No event: the solve reached t1 (or failed); a terminal event or one too many
    # ends it. Saves past where it stopped stay NaN.
    n = len(ev.events)
    return _Carry(
        t_s=jnp.where(go_on, t_star, c.t_s),
        y_s=jnp.where(go_on, u_next, c.y_s),
        ys=ys,
        t_ev=t_ev,
        u_ev=u_ev_all,
        count=count,
        code=code,
        done=jnp.logical_not(go_on | conflict),
        naccept=c.naccept + seg.naccept,
        nreject=c.nreject + seg.nreject,
        t_end=t_star,
        which=which,
        cap=jnp.where(conflict, t_star, times[1]),
        enabled=jnp.where(conflict, seg.crossed, jnp.ones((n,), bool)),
        retry=conflict,
        pending=which,
    )


def _start(ev: EventConfig, y0: Any, ts: Any, times: Any) -> _Carry:
    n, m = len(ev.events), ev.max_events
    nan = jnp.array(jnp.nan, y0.dtype)
    return _Carry(
        t_s=times[0],
        y_s=y0,
        ys=jnp.full((ts.shape[0], *y0.shape), nan),
        t_ev=jnp.full((n, m), nan),
        u_ev=jnp.full((n, m, *y0.shape), nan),
        count=jnp.zeros((n,), jnp.int32),
        code=jnp.array(_SUCCESS, jnp.int32),
        done=jnp.array(False),
        naccept=jnp.array(0, jnp.int32),
        nreject=jnp.array(0, jnp.int32),
        t_end=times[0],
        which=jnp.array(0, jnp.int32),
        cap=times[1],
        enabled=jnp.ones((n,), bool),
        retry=jnp.array(False),
        pending=jnp.array(0, jnp.int32),
    )


def _loop(
    cfg: Config,
    ev: EventConfig,
    entry: Callable[[Job], tuple[Any, Any]] | None,
    y0: Any,
    p: Any,
    times: Any,
    ts: Any,
    *,
    reverse: bool = False,
) -> _Carry:
    """All segments, in a while loop (segments solved again included).

    With `entry` and only terminal events (so no jump: every segment starts at
    t0), the loop only locates, without gradients, and one differentiable solve
    of ``[t0, t*]`` follows: reverse-mode AD needs no loop then. With events that
    continue and a `reverse` sensealg, equinox's checkpointed while loop of at
    most ``max_events + 1`` segments replaces `lax.while_loop`, which
    reverse-mode AD cannot go through; a solve that needs more segments (several
    events crossing in one step each take one more) stops with
    "too_many_events".
    """
    body = lambda c: _segment(cfg, ev, entry, p, times, ts, c)  # noqa: E731
    if entry is None or not ev.all_terminal:
        if not (reverse and entry is not None):
            return _watched(cfg, ev, entry, y0, p, times, ts)
        # Reverse-mode AD through equinox's checkpointed while loop: its
        # backward pass runs over the segments solved (recomputing from a few
        # checkpoints of the carry), not over max_events + 1 of them, and keeps
        # one segment's residuals at a time.
        c = eqxi.while_loop(
            lambda c: jnp.logical_not(c.done),
            body,
            _start(ev, y0, ts, times),
            max_steps=ev.max_events + 1,
            kind="checkpointed",
        )
        code = jnp.where(c.done, c.code, _TOO_MANY).astype(jnp.int32)
        return _Carry(**{**{k: getattr(c, k) for k in _FIELDS}, "code": code})
    y0_fixed, p_fixed = jax.lax.stop_gradient((y0, p))
    c = _watched(cfg, ev, None, y0_fixed, p_fixed, times, ts)
    t_star = c.t_end
    seg_ts = jnp.concatenate([jnp.clip(ts, times[0], t_star), t_star[None]])
    grid = _grid_of(cfg, times[0], times, seg_ts)
    out, _ = entry(Job(cfg, y0, p, (times[0], t_star, *times[2:]), seg_ts, grid))
    rows, u_minus = out[:-1], out[-1]
    lo, hi = jnp.minimum(times[0], t_star), jnp.maximum(times[0], t_star)
    ys = _merge(c.ys, rows, ts, lo, hi, jnp.array(True))
    tau, u_ev, u_next = _jump(cfg, ev, c.which, u_minus, p, t_star)
    fired = c.code == _TERMINATED
    # A save time on the terminal event holds the state after its jump.
    at_event = (fired & (ts == t_star)).reshape((-1,) + (1,) * u_next.ndim)
    ys = jnp.where(at_event, u_next[None], ys)
    t_ev = c.t_ev.at[c.which, 0].set(jnp.where(fired, tau, c.t_ev[c.which, 0]))
    u_ev_all = c.u_ev.at[c.which, 0].set(jnp.where(fired, u_ev, c.u_ev[c.which, 0]))
    return _Carry(
        **{
            **{k: getattr(c, k) for k in _FIELDS},
            "ys": ys,
            "t_ev": t_ev,
            "u_ev": u_ev_all,
        }
    )


def _first_try(
    cfg: Config,
    ev: EventConfig,
    y0: Any,
    p: Any,
    times: Any,
    ts: Any,
    adjoint: Any,
) -> tuple[Any, _Carry]:
    """The plain solve of ``[t0, t1]`` with the conditions watched (`_Watch`):
    whether an event crossed, and the outcome as if none fired (what the solve
    is when none does). `adjoint` is diffrax's (None: not differentiated)."""
    t0, t1, rtol, atol, dt0 = times
    method = cfg.method
    conditions = tuple(ev.bind(e.condition) for e in ev.events)
    if cfg.fixed_step:
        inner: Any = Grid(start=t0, dt0=dt0, ts=ts)
    else:
        pid = method.controller(rtol, atol)
        inner = diffrax.ClipStepSizeController(pid, step_ts=ts) if cfg.land else pid
    # (pyright takes the base's abstract tolerances for fields; they are
    # properties of the wrapped controller.)
    controller = _Watch(  # pyright: ignore[reportCallIssue]
        controller=inner,
        conditions=conditions,
    )
    sol = diffrax.diffeqsolve(
        method.term(cfg.f),
        method.build(cfg.fixed_step),
        t0,
        t1,
        jnp.where(t1 > t0, dt0, -dt0) if cfg.adaptive_dt0 else None,
        y0,
        args=p,
        saveat=diffrax.SaveAt(
            subs=[
                diffrax.SubSaveAt(ts=ts),
                diffrax.SubSaveAt(t1=True, fn=lambda t, y, args: t),
            ]
        ),
        stepsize_controller=controller,
        max_steps=cfg.max_steps,
        throw=False,
        adjoint=diffrax.RecursiveCheckpointAdjoint() if adjoint is None else adjoint,
    )
    fired = sol.result == RESULTS.event_occurred
    saved_ts, saved_ys = cast("list[Any]", sol.ts), cast("list[Any]", sol.ys)
    # Rows not reached (a failed solve) keep diffrax's fill value inf: NaN.
    reached = jnp.isfinite(saved_ts[0]).reshape((-1,) + (1,) * y0.ndim)
    stats: Any = sol.stats
    c = _start(ev, y0, ts, times)
    t_end = saved_ts[1][0]
    quiet = _Carry(
        **{
            **{k: getattr(c, k) for k in _FIELDS},
            "ys": jnp.where(reached, saved_ys[0], jnp.nan),
            "code": _status_code(sol.result),
            "done": jnp.array(True),
            "naccept": jnp.asarray(stats["num_accepted_steps"]).astype(jnp.int32),
            "nreject": jnp.asarray(stats["num_rejected_steps"]).astype(jnp.int32),
            "t_end": t_end,
        }
    )
    return fired, quiet


def _watched(
    cfg: Config,
    ev: EventConfig,
    entry: Callable[[Job], tuple[Any, Any]] | None,
    y0: Any,
    p: Any,
    times: Any,
    ts: Any,
) -> _Carry:
    """All segments in a while loop, entered only when the first try
    (`_first_try`) saw a crossing: a solve whose events never fire costs that
    one plain solve with a sign test per step. (With `entry`, ForwardMode's:
    the first try is differentiated by forward mode too.)"""
    adjoint = None if entry is None else diffrax.ForwardMode()
    fired, quiet = _first_try(cfg, ev, y0, p, times, ts, adjoint)
    body = lambda c: _segment(cfg, ev, entry, p, times, ts, c)  # noqa: E731
    go = lambda c: jnp.logical_not(c.done)  # noqa: E731

    def all_segments() -> _Carry:
        return jax.lax.while_loop(go, body, _start(ev, y0, ts, times))

    return jax.lax.cond(fired, all_segments, lambda: quiet)


def _outputs(c: _Carry) -> tuple[Any, Any, Any, Any, Any]:
    info = jnp.concatenate(
        [jnp.stack([c.code, c.naccept, c.nreject]), c.count.astype(jnp.int32)]
    )
    return c.ys, c.t_ev, c.u_ev, info, jax.lax.stop_gradient(c.t_end)


def _forward_entry(job: Job) -> tuple[Any, Any]:
    """A segment's solve differentiated by forward mode through diffrax's steps."""
    return solve_with(job, diffrax.ForwardMode(), own_init=True)


def _forward(cfg: Config, ev: EventConfig, job: Job) -> tuple[Any, ...]:
    """ForwardMode: a custom VJP whose forward pass takes the Jacobian of every
    output (saves, event times and states) by forward-mode AD through the loop of
    segments; its primal is the loop without gradients."""
    p_tree = jax.tree_util.tree_structure(job.p)

    def plain(y0: Any, p: Any, times: Any, ts: Any) -> Any:
        return _outputs(_loop(cfg, ev, None, y0, p, times, ts))

    def differentiable(y0: Any, p: Any, times: Any, ts: Any) -> Any:
        c = _loop(cfg, ev, _forward_entry, y0, p, times, ts)
        ys, t_ev, u_ev, info, t_end = _outputs(c)
        return (ys, t_ev, u_ev), (info, t_end)

    @jax.custom_vjp
    def solve(y0: Any, p: Any, times: Any, ts: Any) -> Any:
        return plain(y0, p, times, ts)

    def fwd(y0: Any, p: Any, times: Any, ts: Any) -> Any:
        primal = lambda x: isinstance(x, CustomVJPPrimal)  # noqa: E731
        times, ts = fixed_inputs((times, ts), _TIMES)
        inputs = jax.tree_util.tree_leaves((y0, p), is_leaf=primal)
        values = [x.value for x in inputs]
        which = [i for i, x in enumerate(inputs) if x.perturbed]
        sizes = [values[i].size for i in which]
        parts: list[Any] = [None] * len(values)
        if sum(sizes) == 0:
            out = plain(values[0], p_tree.unflatten(values[1:]), times, ts)
            return out, parts
        cuts = [int(s) for s in np.cumsum(sizes)[:-1]]
        flat = jnp.concatenate([jnp.ravel(values[i]) for i in which])

        def g(flat: Any) -> Any:
            full = list(values)
            for i, part in zip(which, jnp.split(flat, cuts), strict=True):
                full[i] = part.reshape(values[i].shape).astype(values[i].dtype)
            return differentiable(full[0], p_tree.unflatten(full[1:]), times, ts)

        outs, tangents, (info, t_end) = jax.vmap(
            lambda v: jax.jvp(g, (flat,), (v,), has_aux=True),
            out_axes=(None, 0, None),
        )(jnp.eye(flat.size, dtype=flat.dtype))
        for i in range(len(which)):
            lo = 0 if i == 0 else cuts[i - 1]
            hi = flat.size if i == len(which) - 1 else cuts[i]
            parts[which[i]] = tuple(
                t[lo:hi].reshape(values[which[i]].shape + o.shape)
                for t, o in zip(tangents, outs, strict=True)
            )
        return (*outs, info, t_end), parts

    def bwd(parts: Any, cts: Any) -> Any:
        grads = []
        for jacs in parts:
            if jacs is None:
                grads.append(None)
                continue
            total = None
            for jac, ct in zip(jacs, cts[:3], strict=True):
                if isinstance(ct, SymbolicZero):
                    continue
                ct = jnp.nan_to_num(ct.astype(jac.dtype))
                term = jnp.tensordot(jnp.nan_to_num(jac), ct, axes=ct.ndim)
                total = term if total is None else total + term
            grads.append(total)
        return (grads[0], p_tree.unflatten(grads[1:]), None, None)

    solve.defvjp(fwd, bwd, symbolic_zeros=True)
    return solve(job.y0, job.p, job.times, job.ts)


def solve_events(cfg: Config, ev: EventConfig, job: Job) -> tuple[Any, ...]:
    """``(ys, t_events, u_events, info)`` of the job with events; ``info`` is
    status, accepted and rejected steps, then the count of each event; and the
    time reached. Eager
    (``cfg.differentiable`` None): no gradients. Else differentiable by the
    request's sensealg: `ForwardMode` through the loop, the reverse ones through
    the single segment of a solve whose events are all terminal."""
    if cfg.differentiable is None:
        c = _loop(cfg, ev, None, job.y0, job.p, job.times, job.ts)
        return _outputs(c)
    from ..._sensealg import ForwardMode

    if isinstance(cfg.sensealg, ForwardMode):
        return _forward(cfg, ev, job)
    return _reverse(cfg, ev, job)


def _check_batched(cfg: Config, ev: EventConfig) -> None:
    """Refuse diffrax's checkpointed reverse pass through the scan of segments
    under an ensemble's vmap: its checkpointed loop, batched over members whose
    segments differ, fails at run time (equinox: "Nonconstant batch")."""
    from ..._sensealg import CheckpointedAdjoint, ReverseThroughSolver

    checkpointed = isinstance(cfg.sensealg, ReverseThroughSolver | CheckpointedAdjoint)
    if not (ev.batched and checkpointed and not ev.all_terminal):
        return
    raise UnsupportedError(
        f"sensealg=dk.{type(cfg.sensealg).__name__}() on backend='jax' cannot "
        "differentiate an ensemble whose events continue (diffrax's checkpointed "
        "reverse pass does not batch over members with different segments). Use "
        "sensealg=dk.ForwardMode() (the default for small problems), "
        "dk.InterpolatingAdjoint() or dk.ContinuousAdjoint(); or solve the "
        "members one by one (ens.member(i))."
    )


def _check_fixed(cfg: Config) -> None:
    """Refuse the adjoints for events on a fixed grid: their backward passes step
    on a grid of known length; ForwardMode, ReverseThroughSolver and
    CheckpointedAdjoint differentiate through the steps taken."""
    from ..._sensealg import CheckpointedAdjoint, ReverseThroughSolver

    through = isinstance(cfg.sensealg, ReverseThroughSolver | CheckpointedAdjoint)
    if not cfg.fixed_step or through:
        return
    raise UnsupportedError(
        f"sensealg=dk.{type(cfg.sensealg).__name__}() on backend='jax' cannot "
        "differentiate a solve with events on a fixed grid (a fixed-step alg, or "
        "adaptive=False). Use sensealg=dk.ForwardMode(), "
        "dk.ReverseThroughSolver() or dk.CheckpointedAdjoint(); an adaptive alg "
        "such as 'tsit5'; or backend='torch' or 'scipy'."
    )


def _reverse(cfg: Config, ev: EventConfig, job: Job) -> tuple[Any, ...]:
    """The reverse sensealgs: a custom VJP whose primal is the plain loop (a
    jitted solve that is not differentiated pays nothing more) and whose forward
    pass runs the differentiable segments (`_loop` with the sensealg's entry)
    under `jax.vjp`, keeping its pullback as the residual."""
    entry = cfg.differentiable

    def differentiable(y0: Any, p: Any, times: Any, ts: Any) -> Any:
        c = _loop(cfg, ev, entry, y0, p, times, ts, reverse=True)
        ys, t_ev, u_ev, info, t_end = _outputs(c)
        return (ys, t_ev, u_ev), (info, t_end)

    @jax.custom_vjp
    def solve(y0: Any, p: Any, times: Any, ts: Any) -> Any:
        return _outputs(_loop(cfg, ev, None, y0, p, times, ts))

    def fwd(y0: Any, p: Any, times: Any, ts: Any) -> Any:
        _check_batched(cfg, ev)
        _check_fixed(cfg)
        times, ts = fixed_inputs((times, ts), _TIMES_REVERSE)
        y0, p = jax.tree_util.tree_map(lambda x: x.value, (y0, p))
        outs, pull, (info, t_end) = jax.vjp(
            lambda y0, p: differentiable(y0, p, times, ts), y0, p, has_aux=True
        )
        return (*outs, info, t_end), pull

    def bwd(pull: Any, cts: Any) -> Any:
        cts = tuple(
            jnp.zeros(ct.shape, cast("Any", ct).dtype)
            if isinstance(ct, SymbolicZero)
            else jnp.nan_to_num(ct)
            for ct in cts[:3]
        )
        dy0, dp = pull(cts)
        return (dy0, dp, None, None)

    solve.defvjp(fwd, bwd, symbolic_zeros=True)
    return solve(job.y0, job.p, job.times, job.ts)


def program(
    cfg: Config, ev: EventConfig, u0: Any, p: Any, scalars: Any, ts: Any
) -> Any:
    """One solve with events, traced once per `Config`, `EventConfig` and input
    structure: the save times, saved states, event times and states (padded with
    NaN), and ``info`` (status, steps, per-event counts, f(u0)'s finiteness), with
    the time reached."""
    dtype = jnp.dtype(cfg.dtype)
    y0 = jnp.asarray(u0, dtype=dtype)
    times = tuple(jnp.asarray(scalars[i], dtype=dtype) for i in range(5))
    ts = jnp.asarray(ts, dtype=dtype)
    du0 = cfg.f(y0, p, times[0])
    check_rhs_output(du0, y0, times[0])
    for i, e in enumerate(ev.events):
        check_condition_output(i, ev.bind(e.condition)(y0, p, times[0]))
        if e.affect is not None:
            check_affect_output(i, ev.bind(e.affect)(y0, p, times[0]), y0)
    job = Job(cfg, y0, p, times, ts, None)
    ys, t_ev, u_ev, info, t_end = solve_events(cfg, ev, job)
    ok = (info[0] == _SUCCESS) | (info[0] == _TERMINATED)
    if cfg.raises:
        ys = eqx.error_if(
            ys,
            jnp.logical_not(ok),
            "The solve with events failed (its status code is the index in "
            "dk.Solution.STATUS_CODES; run it with throw=False to read it): "
            "max_steps, a step size too small, a non-finite state, or more than "
            "max_events events.",
        )
    elif cfg.differentiable is not None:
        inputs = (y0, p)
        ys = failure_masked(ys, ok, inputs)
        t_ev = failure_masked(t_ev.T, ok, inputs).T
        u_ev = failure_masked(jnp.moveaxis(u_ev, 1, 0), ok, inputs)
        u_ev = jnp.moveaxis(u_ev, 0, 1)
    info = jnp.concatenate([info, all_finite(du0).astype(jnp.int32)[None]])
    return ts, ys, t_ev, u_ev, info, t_end
