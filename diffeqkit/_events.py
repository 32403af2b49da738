"""`dk.Event`: a zero crossing of ``condition(u, p, t)`` that stops the solve or
applies a jump, and the checks every backend shares (API.md section 9).

Imports no framework. Backends locate crossings, apply jumps and differentiate
through them; this module only defines what an event is and words the errors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._arrays import dtype_name, is_array, is_real_number
from ._errors import InvalidProblemError, invalid, short

__all__ = ["MAX_EVENTS", "Event", "check_affect_output", "check_condition_output"]

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
