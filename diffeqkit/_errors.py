"""The diffeqkit exception hierarchy and the helpers that word its messages.

Every message names the argument (or step) as the user wrote it, shows what was
received and says what to do next. Build messages here so the wording is the same
across the core and every backend.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

__all__ = [
    "BackendNotInstalledError",
    "DiffEqKitError",
    "InvalidProblemError",
    "SolveError",
    "UnsupportedError",
]


class DiffEqKitError(Exception):
    """Base class of every error diffeqkit raises on purpose."""


class InvalidProblemError(DiffEqKitError, ValueError):
    """An argument of `ODEProblem` or `solve` is invalid (wrong shape, value, type)."""


class UnsupportedError(DiffEqKitError, NotImplementedError):
    """A backend cannot do what was asked (alg, sensealg, device, dtype)."""


class BackendNotInstalledError(DiffEqKitError, ImportError):
    """The packages a backend needs are not installed."""


class SolveError(DiffEqKitError, RuntimeError):
    """The integration failed (max steps, step size too small, non-finite state).

    Attributes
    ----------
    solution : Solution
        The partial solution up to the failure (`success` is False).
    """

    def __init__(self, message: str, solution: Any = None) -> None:
        super().__init__(message)
        self.solution = solution


def short(value: Any, limit: int = 80) -> str:
    """`repr` of a value, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def invalid(argument: str, problem: str, got: Any, fix: str) -> InvalidProblemError:
    """`<argument> <problem>; got <argument>=<got>. <fix>`"""
    return InvalidProblemError(
        f"{argument} {problem}; got {argument}={short(got)}. {fix}"
    )


def listing(names: Iterable[str]) -> str:
    return ", ".join(names) or "(none)"


def unsupported_alg(
    alg: str, backend: str, offered: Iterable[str], offered_by: Iterable[str]
) -> UnsupportedError:
    by = list(offered_by)
    where = (
        f"'{alg}' is offered by: {listing(by)}."
        if by
        else f"'{alg}' is not offered by any backend."
    )
    return UnsupportedError(
        f"alg='{alg}' is not available on backend='{backend}'. "
        f"{backend} offers: {listing(offered)}. {where}"
    )


def unsupported_sensealg(
    sensealg: str, backend: str, offered: Iterable[str], offered_by: Iterable[str]
) -> UnsupportedError:
    alternatives = ", ".join(f"dk.{name}()" for name in offered) or "(none)"
    return UnsupportedError(
        f"sensealg=dk.{sensealg}() is not available on backend='{backend}'. "
        f"{backend} offers: {alternatives}. dk.{sensealg}() is offered by: "
        f"{listing(offered_by)}."
    )


def unavailable_device(
    device: str, backend: str, available: str, fix: str
) -> UnsupportedError:
    """`device='cuda' is not available on backend='x': <available>. <fix>`"""
    return UnsupportedError(
        f"device='{device}' is not available on backend='{backend}': {available}. {fix}"
    )


def unknown_alg(alg: object, known: Iterable[str]) -> UnsupportedError:
    return UnsupportedError(
        f"alg={short(alg)} is not a solver diffeqkit knows. "
        f"Known solvers: {listing(known)}."
    )


def backend_not_installed(
    backend: str, missing: Iterable[str], extra: str
) -> BackendNotInstalledError:
    names = " and ".join(missing)
    return BackendNotInstalledError(
        f"backend='{backend}' needs {names}, which are not installed. "
        f'Run: pip install "diffeqkit[{extra}]"'
    )


def solve_failed(
    t: float, tspan: tuple[float, float], status: str, steps: int | None, hint: str
) -> str:
    counted = f" ({steps} steps)" if steps is not None else ""
    return (
        f"integration stopped at t={t:.6g} of tspan=({tspan[0]!r}, {tspan[1]!r}) "
        f"with status '{status}'{counted}. {hint}"
    ).rstrip()


def backward_failed(sensealg: Any, reason: str) -> str:
    """The message of a `SolveError` raised by a gradient's backward solve."""
    # A library's runtime error may wrap the real message (equinox's does).
    found = re.search(r"RuntimeError: ([^\n]+)", reason)
    lines = reason.strip().splitlines()
    first = found.group(1) if found else (lines[0] if lines else "it failed")
    return (
        f"the backward solve of sensealg=dk.{sensealg!r} failed: "
        f"{first[:200].rstrip('.')}. "
        "With an explicit alg a continuous adjoint re-integrates the state "
        "backward, which drifts off the forward trajectory on chaotic or unstable "
        "problems, and on stiff ones, whose fast decaying modes grow when "
        "integrated backward (use an implicit alg there). Use "
        "sensealg=dk.CheckpointedAdjoint(), or raise max_steps, or loosen the "
        "backward tolerances ContinuousAdjoint(rtol=..., atol=...)."
    )


def ineffective_option(
    sensealg: Any, option: str, value: Any, backend: str, works_on: Iterable[str]
) -> InvalidProblemError:
    """A sensealg option that would have no effect on this backend."""
    cls = type(sensealg).__name__
    where = list(works_on)
    elsewhere = f" It takes effect on: {listing(where)}." if where else ""
    return InvalidProblemError(
        f"sensealg=dk.{cls}({option}={value!r}) has no effect on "
        f"backend='{backend}'.{elsewhere} Leave {option}=None on backend='{backend}'"
        + (f", or use backend='{where[0]}'." if where else ".")
    )


def unsupported_kind(
    sensealg: Any,
    alg: str,
    kind: str,
    backend: str,
    why: str | None,
    instead: Iterable[str],
) -> UnsupportedError:
    """A sensealg that cannot run this kind of alg on this backend."""
    reason = f": {why}" if why else ""
    options = ", ".join(f"dk.{name}()" for name in instead) or "(none)"
    return UnsupportedError(
        f"sensealg=dk.{type(sensealg).__name__}() cannot differentiate alg='{alg}' "
        f"({kind}) on backend='{backend}'{reason}. With {kind} algs "
        f"backend='{backend}' offers: {options}."
    )
