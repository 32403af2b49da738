"""`dk.Event` and `events=` are checked before any backend runs: each bad input
raises InvalidProblemError naming the argument; statuses of events are in the
status table with stable codes."""

from __future__ import annotations

import pytest

import diffeqkit as dk
from diffeqkit._solution import STATUS_CODES, SUCCESS_CODES


def _prob():
    return dk.ODEProblem(lambda u, p, t: -u, [1.0], (0.0, 1.0))


def _condition(u, p, t):
    return u[0] - 0.5


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"condition": 1.0}, "condition"),
        ({"condition": _condition, "direction": 2}, "direction"),
        ({"condition": _condition, "direction": True}, "direction"),
        ({"condition": _condition, "terminal": 1}, "terminal"),
        ({"condition": _condition, "affect": "jump"}, "affect"),
    ],
)
def test_bad_event_fields_name_the_argument(kwargs, named):
    with pytest.raises(dk.InvalidProblemError, match=f"^{named} "):
        dk.Event(**kwargs)


def test_one_event_not_in_a_list_is_refused_with_the_fix():
    with pytest.raises(dk.InvalidProblemError, match=r"events=\[event\]"):
        dk.solve(_prob(), events=dk.Event(_condition))


@pytest.mark.parametrize("events", ["event", [_condition], 3])
def test_events_must_be_a_list_of_event(events):
    with pytest.raises(dk.InvalidProblemError, match="events"):
        dk.solve(_prob(), events=events)


@pytest.mark.parametrize("max_events", [0, 1.5, True])
def test_max_events_must_be_a_positive_int(max_events):
    with pytest.raises(dk.InvalidProblemError, match="max_events"):
        dk.solve(_prob(), events=[dk.Event(_condition)], max_events=max_events)


def test_event_statuses_keep_the_older_codes():
    assert STATUS_CODES[:5] == (
        "success",
        "max_steps_reached",
        "step_size_too_small",
        "nonfinite",
        "solver_failed",
    )
    assert [STATUS_CODES[i] for i in SUCCESS_CODES] == ["success", "terminated"]
    sol = dk.Solution(
        t=None, u=None, stats={}, status="terminated", backend="scipy", alg="tsit5"
    )
    assert sol.success
