"""`dk.Event`: a zero crossing of ``condition(u, p, t)`` that stops the solve or
applies a jump, and the checks every backend shares (API.md section 9).

Imports no framework. Backends locate crossings, apply jumps and differentiate
through them; this module only defines what an event is and words the errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from array_api_compat import device

from ._arrays import array_namespace, dtype_name, is_array, is_real_number
from ._errors import InvalidProblemError, invalid, short

__all__ = [
    "MAX_EVENTS",
    "Event",
    "Fired",
    "Tracker",
    "check_affect_output",
    "check_condition_output",
    "crosses",
    "find_root",
    "stack_members",
]

# The most events one solve may fire (all events together) before it stops with
# status "too_many_events": a chattering (Zeno) event ends with an error, not a
# hang. `dk.solve(max_events=...)` overrides it.
MAX_EVENTS = 1000


@dataclass(frozen=True)
class Event:
    """A zero crossing of ``condition(u, p, t)`` during a solve.

    Parameters
    ----------
    condition : callable
        ``condition(u, p, t) -> scalar``, written in the Array API like `f`
        (``xp = dk.array_namespace(u)``). The event is a zero of it, located by
        root finding on the step's dense output to the solve's tolerance.
    direction : {0, 1, -1}
        +1 fires only where the condition rises through zero, -1 only where it
        falls, 0 both.
    terminal : bool, default True
        True stops the solve at the event (``status == "terminated"``, a success).
    affect : callable, optional
        ``affect(u, p, t) -> u_new`` with the shape and dtype of ``u``: a jump
        applied at the event, after which integration continues (unless
        `terminal`). A condition that is zero at ``t0``, or right after its own
        event's jump, does not fire there: only a crossing after it does.

    Examples
    --------
    >>> import diffeqkit as dk
    >>> ground = dk.Event(lambda u, p, t: u[0], direction=-1, terminal=False,
    ...                   affect=lambda u, p, t: u * dk.array_namespace(u).asarray(
    ...                       [1.0, -0.9]))
    """

    condition: Callable[..., Any]
    direction: int = 0
    terminal: bool = True
    affect: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if not callable(self.condition):
            raise invalid(
                "condition",
                "must be a callable condition(u, p, t) -> scalar",
                self.condition,
                "Pass e.g. lambda u, p, t: u[0] (an event where u[0] crosses 0).",
            )
        if isinstance(self.direction, bool) or self.direction not in (-1, 0, 1):
            raise invalid(
                "direction",
                "must be 0 (both), 1 (rising) or -1 (falling)",
                self.direction,
                "Pass direction=-1 for a condition falling through zero.",
            )
        if not isinstance(self.terminal, bool):
            raise invalid("terminal", "must be True or False", self.terminal, "")
        if self.affect is not None and not callable(self.affect):
            raise invalid(
                "affect",
                "must be None or a callable affect(u, p, t) -> u_new",
                self.affect,
                "Pass a function returning the state after the jump.",
            )


def check_events(events: Any) -> tuple[Event, ...]:
    """`events` as a tuple of `Event` (None: none); anything else is refused."""
    if events is None:
        return ()
    if isinstance(events, Event):
        raise invalid(
            "events",
            "must be a list of dk.Event",
            events,
            "Wrap the one event in a list: events=[event].",
        )
    if not isinstance(events, Sequence) or isinstance(events, str):
        raise invalid("events", "must be a list of dk.Event", events, "")
    for i, event in enumerate(events):
        if not isinstance(event, Event):
            raise invalid(
                f"events[{i}]",
                "must be a dk.Event",
                event,
                "Build it with dk.Event(condition, direction=..., terminal=..., "
                "affect=...).",
            )
    return tuple(events)


def check_max_events(max_events: Any) -> int:
    if (
        isinstance(max_events, bool)
        or not isinstance(max_events, int)
        or max_events < 1
    ):
        raise invalid(
            "max_events", "must be an int >= 1", max_events, f"Pass e.g. {MAX_EVENTS}."
        )
    return max_events


def check_condition_output(index: int, g: Any) -> None:
    """Refuse a condition whose value at ``(u0, p, t0)`` is not a real scalar."""
    shape = tuple(getattr(g, "shape", ()))
    if not (is_real_number(g) or is_array(g)) or shape != ():
        raise InvalidProblemError(
            f"events[{index}].condition(u0, p, t0) must return a scalar; got "
            f"{short(g)}" + (f" of shape {shape}" if shape else "") + ". Return one "
            "number, e.g. u[0] - 1.0 (an event where u[0] crosses 1)."
        )


def check_affect_output(index: int, u_new: Any, u0: Any) -> None:
    """Refuse an affect whose result differs from the state in shape or dtype."""
    if not is_array(u_new) or tuple(u_new.shape) != tuple(u0.shape):
        got = getattr(u_new, "shape", None)
        raise InvalidProblemError(
            f"events[{index}].affect(u, p, t) must return the new state, of the "
            f"shape of u0 {tuple(u0.shape)}; got "
            + (f"shape {tuple(got)}" if got is not None else short(u_new))
            + ". Return e.g. xp.stack([...]) built with xp = dk.array_namespace(u)."
        )
    if dtype_name(u_new.dtype) != dtype_name(u0.dtype):
        raise InvalidProblemError(
            f"events[{index}].affect(u, p, t) returned dtype "
            f"{dtype_name(u_new.dtype)} but the state has dtype "
            f"{dtype_name(u0.dtype)}. Keep its arithmetic in the state's dtype."
        )


# -- Locating events on an eager backend's steps ------------------------------
#
# The eager backends (SciPy, torch) drive their solvers one accepted step at a
# time; `Tracker` watches those steps for sign changes of the conditions, locates
# the earliest crossing on the step's dense output, and keeps `t_events` /
# `u_events`. Values it sees are Python floats; states are the backend's arrays,
# passed through untouched.


def crosses(direction: int, before: float, after: float) -> bool:
    """Whether a condition going from `before` to `after` crosses zero in
    `direction`. Leaving zero is no crossing (a condition zero at the start, or
    right after its own jump, does not fire there); reaching it is. NaN never
    crosses."""
    rising = before < 0.0 <= after
    falling = before > 0.0 >= after
    if direction > 0:
        return rising
    if direction < 0:
        return falling
    return rising or falling


# Where a step starting on a zero of a condition is probed for the side the
# condition leaves to (a fraction of the step).
_PROBE = 1e-6
# Bracket width at which `find_root` stops, in ulps of the time.
_ROOT_ULPS = 2
_ROOT_ITERATIONS = 200


def find_root(
    h: Callable[[float], float], a: float, b: float, ha: float, hb: float
) -> float:
    """A zero of `h` between `a` (``h(a) = ha``, nonzero) and `b` (``h(b) = hb``, of
    the other sign or zero), to a bracket of a few ulps of t.

    The Illinois variant of regula falsi (superlinear on smooth conditions; a
    condition linear in t, such as ``t - 24.0``, is hit exactly), falling back to
    bisection when a step would leave the bracket. Returns the end of the final
    bracket on `b`'s side, where the condition has crossed (or is zero). `a` and
    `b` may be in either order (backward integration).
    """
    kept = 0  # +1: `a` kept twice in a row, -1: `b` (Illinois halves its value)
    for i in range(_ROOT_ITERATIONS):
        if hb == 0.0 or abs(b - a) <= _ROOT_ULPS * math.ulp(max(abs(a), abs(b))):
            return b
        s = b - hb * (b - a) / (hb - ha)
        if i >= _ROOT_ITERATIONS // 2 or not (min(a, b) < s < max(a, b)):
            s = 0.5 * (a + b)
            if s in (a, b):
                return b
        hs = h(s)
        if hs == 0.0:
            return s
        if (hs > 0.0) == (hb > 0.0):
            b, hb = s, hs
            if kept == 1:
                ha *= 0.5
            kept = 1
        else:
            a, ha = s, hs
            if kept == -1:
                hb *= 0.5
            kept = -1
        if math.isnan(hs):
            return b
    return b


@dataclass
class Fired:
    """An event located in a step: its index and time. `zeno`: it fired again
    closer to its last firing than t can resolve (a Zeno point), which ends
    the solve as "too_many_events"."""

    index: int
    t: float
    zeno: bool = False


class Tracker:
    """The events of one eager solve: their last condition values, where they
    fired, and the count against `max_events`.

    `value(i, u, t)` is ``events[i].condition(u, p, t)`` as a Python float, on the
    backend's state `u`; `rhs(u, t)` is ``f(u, p, t)`` (the same array type);
    `direction` is that of integration (+1, or -1 for ``t1 < t0``).
    Call `start` at the start of each segment (t0, and after every event),
    `check` after every accepted step, and `record` for the event `check`
    returns.
    """

    def __init__(
        self,
        events: Sequence[Event],
        value: Callable[[int, Any, float], float],
        rhs: Callable[[Any, float], Any],
        max_events: int,
        direction: float = 1.0,
    ) -> None:
        self.events = tuple(events)
        self.direction = direction  # of integration: +1 forward in time, -1 back
        self.value = value
        self.rhs = rhs
        self.max_events = max_events
        self.prev: list[float] = []
        # +1 / -1: the side a condition that is zero at a segment's start leaves
        # to (0: unknown, or not zero there)
        self.leaves: list[float] = []
        self.times: list[list[float]] = [[] for _ in self.events]
        self.states: list[list[Any]] = [[] for _ in self.events]
        self.count = 0

    def start(self, u: Any, t: float, fired: int | None = None) -> None:
        """A segment starts at `t` from `u`; the event that just `fired` counts
        as zero there, so that only a later crossing fires it again."""
        n = len(self.events)
        self.prev = [0.0 if i == fired else self.value(i, u, t) for i in range(n)]
        self.leaves = [0.0] * n
        zeros = [i for i in range(n) if self.prev[i] == 0.0]
        if zeros:
            # the side each leaves to: the sign of its rate along the flow, from
            # a difference over a step small against t (one call of f)
            f = self.rhs(u, t)
            d = self.direction * _RATE_STEP * max(1.0, abs(t))
            for i in zeros:
                ahead = self.value(i, u + d * f, t + d) - self.value(i, u, t)
                self.leaves[i] = math.copysign(1.0, ahead) if ahead != 0.0 else 0.0

    def check(
        self, t_a: float, t_b: float, u_b: Any, state_at: Callable[[float], Any]
    ) -> Fired | None:
        """The earliest event crossed in the step from `t_a` to `t_b` (state `u_b`
        at its end, `state_at(t)` the step's dense output), or None."""
        now = [self.value(i, u_b, t_b) for i in range(len(self.events))]
        best: Fired | None = None
        forward = t_b >= t_a
        for i, event in enumerate(self.events):
            before, after, start = self.prev[i], now[i], t_a
            at_start = False

            def h(t: float, i: int = i) -> float:
                return self.value(i, state_at(t), t)

            if before == 0.0 and after != 0.0:
                # Zero at the start (t0, or its own jump): a step that leaves zero
                # and comes back (a ball thrown up by its bounce, falling again)
                # fires; the bracket starts where it is on the side it left to.
                leaves = self.leaves[i]
                found = _left_zero(h, t_a, t_b, after, leaves)
                if found is None:
                    continue
                start, before = found
                if start == t_a:  # back across zero within ulps of t: fires there
                    before, at_start = leaves, True
            if not crosses(event.direction, before, after):
                continue
            t = t_a if at_start else find_root(h, start, t_b, before, after)
            if best is None or (t < best.t if forward else t > best.t):
                best = Fired(i, t, at_start)
        if best is None:
            self.prev = now
        return best

    def record(self, fired: Fired, u: Any) -> bool:
        """Keep an event at ``(fired.t, u)``, the state before its jump; False
        (nothing kept) when it would be one more than `max_events`, or at a
        Zeno point (`Fired.zeno`)."""
        if self.count >= self.max_events or fired.zeno:
            return False
        self.count += 1
        self.times[fired.index].append(fired.t)
        self.states[fired.index].append(u)
        return True


# The step of the difference that tells which side a zero condition leaves to,
# relative to max(1, |t|).
_RATE_STEP = 1e-7
# How many halvings of a step search for where a condition that left zero is.
_HALVINGS = 60


def _left_zero(
    h: Callable[[float], float], t_a: float, t_b: float, after: float, leaves: float
) -> tuple[float, float] | None:
    """In a step starting on a zero of `h` and ending at ``after != 0``: a time and
    value on the side it left to, when it came back across zero (None: it did
    not), or `t_a` itself when the return is too close to it to resolve. `leaves`
    is that side (0: unknown, probed just after `t_a`)."""
    if leaves == 0.0:
        start = t_a + _PROBE * (t_b - t_a)
        return start, h(start)
    if (after > 0.0) == (leaves > 0.0):
        return None  # still on the side it left to
    width = t_b - t_a
    for _ in range(_HALVINGS):
        width *= 0.5
        if t_a + width == t_a:
            break
        value = h(t_a + width)
        if value != 0.0 and (value > 0.0) == (leaves > 0.0):
            return t_a + width, value
    # It left and came back within less than t's resolution (a Zeno point: the
    # bounces of a ball coming to rest): it fires again at t_a, which ends the
    # solve (`Fired.zeno`).
    return t_a, leaves


def stack_members(
    t_events: Sequence[Sequence[Any]], u_events: Sequence[Sequence[Any]]
) -> tuple[list[Any], list[Any]]:
    """An ensemble's events from its members': per event ``k``, the times of
    shape ``(B, n_k)`` and the states of shape ``(B, n_k, *u0.shape)``, ``n_k``
    the most any member fired it, NaN after each member's own (the layout of
    `dk.solve` of an ensemble, as JAX pads under ``jax.jit``).

    `t_events[i]` / `u_events[i]` are member ``i``'s ``Solution.t_events`` /
    ``u_events`` (1-D times, states ``(c, *u0.shape)``), in one array type
    (NumPy or torch; differentiable where the members' are)."""
    xp = array_namespace(u_events[0][0])
    times: list[Any] = []
    states: list[Any] = []
    for k in range(len(t_events[0])):
        n = max(int(member[k].shape[0]) for member in t_events)
        times.append(xp.stack([_pad(xp, member[k], n) for member in t_events]))
        states.append(xp.stack([_pad(xp, member[k], n) for member in u_events]))
    return times, states


def _pad(xp: Any, x: Any, n: int) -> Any:
    """`x` grown to `n` rows with rows of NaN."""
    extra = n - int(x.shape[0])
    if extra == 0:
        return x
    nan = xp.full((extra, *x.shape[1:]), math.nan, dtype=x.dtype, device=device(x))
    return xp.concat([x, nan], axis=0)
