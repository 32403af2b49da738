"""`Solution`, and the status table: every status with its message and hint."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "STATUSES",
    "STATUS_CODES",
    "SUCCESS_CODES",
    "Solution",
    "Status",
    "failure_hint",
]


@dataclass(frozen=True)
class Status:
    """One outcome of an integration, with the words users see for it."""

    name: str
    success: bool
    message: str
    hint: str = ""


STATUSES: Mapping[str, Status] = {
    s.name: s
    for s in (
        Status("success", True, "The integration reached t1."),
        Status(
            "max_steps_reached",
            False,
            "The solver took max_steps steps without reaching t1.",
            "Raise max_steps, loosen rtol/atol, or {stiff}",
        ),
        Status(
            "step_size_too_small",
            False,
            "The step size fell below what the solver can represent.",
            "The solution may blow up (a singularity) near this time, or {stiff}",
        ),
        Status(
            "nonfinite",
            False,
            "The state or f(u, p, t) became NaN or inf.",
            "Check f for division by zero or overflow near this time, or {stiff}",
        ),
        Status(
            "solver_failed",
            False,
            "The solver reported a failure (for an implicit solver: Newton did "
            "not converge).",
            "Tighten rtol/atol or supply jac; {stiff}",
        ),
        Status("terminated", True, "A terminal event stopped the integration."),
        Status(
            "too_many_events",
            False,
            "More than max_events events fired before t1.",
            "The events may chatter (a Zeno point: events ever closer together, "
            "as a ball bouncing to rest): add a terminal event below a threshold, "
            "or raise max_events in dk.solve.",
        ),
    )
}


# The integer code of each status, its index here: what ``Solution.status`` holds
# when the status is a traced value (JAX, ``throw=False`` under a transformation).
# New statuses go at the end so that codes never change.
STATUS_CODES: tuple[str, ...] = tuple(STATUSES)
# The codes of the successful statuses.
SUCCESS_CODES: tuple[int, ...] = tuple(
    i for i, name in enumerate(STATUS_CODES) if STATUSES[name].success
)


def failure_hint(
    status: str, stiff_algs: list[str], alternatives: str = "", alg: str = ""
) -> str:
    """The hint for a failed status, naming implicit algs to try; when `alg` is
    itself one of them, the others."""
    others = [a for a in stiff_algs if a != alg]
    if alg in stiff_algs:
        names = " or ".join(f"alg='{a}'" for a in others[:2])
        stiff = (
            f"try another implicit solver ({names})."
            if others
            else ("tighten rtol/atol.")
        )
    elif stiff_algs:
        names = " or ".join(f"alg='{a}'" for a in stiff_algs[:2])
        stiff = f"the problem looks stiff: try {names}."
    else:
        stiff = "the problem looks stiff: this backend has no implicit solver; " + (
            alternatives or "try another backend."
        )
    hint = STATUSES[status].hint
    return hint.format(stiff=stiff) if hint else ""


@dataclass(frozen=True, eq=False)
class Solution:
    """The result of `dk.solve`.

    Attributes
    ----------
    t : array, shape ``(m,)``
        The save times, in the backend's array type, on the solve's device.
    u : array, shape ``(m, *u0.shape)``
        The state at the save times. When the integration failed
        (``success=False``), rows at save times that were not reached are NaN.
        For an ensemble, shape ``(B, m, *u0.shape)``: members first.
    stats : dict
        At least ``nfev`` (evaluations of `f`), ``naccept`` and ``nreject``
        (accepted and rejected steps); ints, or None where a backend cannot tell.
    status : str, tuple of str or int array
        ``"success"``, ``"terminated"`` (a terminal event stopped the solve, a
        success), ``"max_steps_reached"``, ``"step_size_too_small"``,
        ``"nonfinite"``, ``"solver_failed"`` or ``"too_many_events"``. Under a
        JAX transformation with ``throw=False`` the status is only known when
        the program runs: it is then a traced int32 array, the index of the status in
        ``Solution.STATUS_CODES`` (0 is ``"success"``; batched under
        ``jax.vmap``). For an ensemble (``dk.EnsembleProblem``), a tuple with
        one status per member (a traced int32 array of them under a JAX
        transformation with ``throw=False``).
    success : bool or bool array
        Whether the integration reached ``t1`` or a terminal event (a traced bool
        array when the status is traced; a NumPy bool array, one per member, for
        an ensemble).
    message : str
        A sentence describing the status.
    backend, alg : str
        What actually ran.
    sensealg : SensitivityAlgorithm
        The gradient method that differentiates this solve: the one passed as
        ``sensealg=``, or the one `default_sensealg` chose for ``sensealg=None``.
    t_events, u_events : list or None
        With ``events=[...]``: per event, in the order given, the times where it
        fired (1-D array) and the states there before its jump (shape ``(k,
        *u0.shape)``). None for a solve without events. Saved rows after a
        terminal event are NaN, as for a failed solve. For an ensemble, per
        event, shapes ``(B, n)`` and ``(B, n, *u0.shape)`` with ``n`` the most
        any member fired it, each member's row NaN after its own events (``n =
        max_events`` under ``jax.jit``).
    """

    STATUS_CODES: ClassVar[tuple[str, ...]] = STATUS_CODES

    t: Any
    u: Any
    stats: dict[str, Any]
    status: Any
    backend: str
    alg: str
    sensealg: Any = None
    message: str = field(default="")
    t_events: Any = None
    u_events: Any = None

    def __post_init__(self) -> None:
        if not self.message:
            message = (
                STATUSES[self.status].message
                if isinstance(self.status, str)
                else "The status is a traced value: Solution.STATUS_CODES[status]."
            )
            object.__setattr__(self, "message", message)

    @property
    def success(self) -> Any:
        if isinstance(self.status, str):
            return STATUSES[self.status].success
        if isinstance(self.status, tuple):  # an ensemble's, one per member
            return np.array([STATUSES[s].success for s in self.status], dtype=bool)
        # A traced code: success or a terminal event (an array of bools).
        return (self.status == SUCCESS_CODES[0]) | (self.status == SUCCESS_CODES[1])

    def __repr__(self) -> str:
        shape = tuple(getattr(self.u, "shape", ()))
        return (
            f"Solution(status={self.status!r}, backend={self.backend!r}, "
            f"alg={self.alg!r}, sensealg={self.sensealg!r}, u shape={shape}, "
            f"stats={self.stats})"
        )
