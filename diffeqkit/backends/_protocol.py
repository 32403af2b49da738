"""The backend interface: what the core hands a backend and what it gets back.

Imports no framework. The core validates and normalises every argument once and
hands each backend the same `SolveRequest`; a backend translates neutral names to
its library and the library's result back into a `Solution` via `conclude`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar, get_args

from .._algs import AlgInfo, Kind
from .._arrays import dtype_name, is_array
from .._errors import SolveError, solve_failed
from .._pytree import tree_map
from .._solution import STATUSES, Solution, failure_hint

__all__ = [
    "Backend",
    "Capabilities",
    "Kind",
    "Pullback",
    "SensealgSupport",
    "SensealgTable",
    "SolveRequest",
    "conclude",
    "conclude_ensemble",
    "solution",
]


_ALL_KINDS: tuple[Kind, ...] = get_args(Kind)


@dataclass(frozen=True)
class SensealgSupport:
    """How one backend runs one sensealg, as data the core checks once.

    Attributes
    ----------
    computes : {"discrete", "continuous"}
        "discrete": the derivative of the solver's own steps (exact to rounding
        for the computed solution); "continuous": sensitivity or adjoint ODEs
        integrated under error control, converging to the derivative of the exact
        solution as the tolerances shrink.
    options : tuple of str
        The sensealg's options that take effect on this backend; setting any
        other one raises `InvalidProblemError`. (``autodiff`` is checked by value
        against `Capabilities.autodiff` instead.)
    kinds : tuple of {"fixed", "adaptive", "implicit"}
        The alg kinds it runs with.
    """

    computes: Literal["discrete", "continuous"]
    options: tuple[str, ...] = ()
    kinds: tuple[Kind, ...] = _ALL_KINDS


@dataclass(frozen=True)
class Capabilities:
    """What a backend offers, as data: validation, messages, `support_matrix`, the
    docs and the test parametrisation all read it, and a test checks it against
    each backend's own dispatch tables.

    Attributes
    ----------
    algs, devices : tuple of str
        Neutral alg names and device kinds offered.
    sensealgs : mapping
        Sensealg class name -> `SensealgSupport`.
    autodiff : tuple of str
        Values of a sensealg's ``autodiff`` option honoured here.
    forward_mode_max_inputs : int
        The default rule's crossover: `ForwardMode` up to this many inputs
        (``u0.size`` plus parameters), `CheckpointedAdjoint` above (measured;
        docs/performance.md).
    reference_algs : tuple of (str, str)
        The explicit and the implicit alg a tight-tolerance reference gradient
        uses (`python -m diffeqkit compare`).
    reference_rank : int
        Preference among backends for that reference (lowest first).
    events : tuple of str
        The sensealgs that differentiate a solve with ``events=[...]`` here; empty
        when the backend does not offer events.
    ensemble : tuple of str
        The scale-out options of ``dk.solve(ensemble, ...)`` this backend takes:
        ``"devices"`` (split the batch over devices), ``"executor"`` (members in
        chunks on a `concurrent.futures.Executor` or a Dask client).
    """

    algs: tuple[str, ...]
    devices: tuple[str, ...]
    sensealgs: Mapping[str, SensealgSupport] = field(default_factory=dict)
    autodiff: tuple[str, ...] = ()
    forward_mode_max_inputs: int = 0
    reference_algs: tuple[str, str] | None = None
    reference_rank: int = 0
    events: tuple[str, ...] = ()
    ensemble: tuple[str, ...] = ()


@dataclass(frozen=True)
class SolveRequest:
    """One validated, normalised call of `dk.solve`.

    `u0` and `p` are as the user gave them (backends convert them); `saveat` is a
    float64 NumPy array of save times in integration order (or a JAX tracer, or
    None under ``jax.jit`` with traced `tspan`); `dtype` is ``"float32"``,
    ``"float64"`` or None (follow the inputs); `device` is None, ``"cpu"``,
    ``"cuda"`` or ``"cuda:N"``. `land_on_saves` says that steps must end on every
    save time: true for fixed-step methods, and for adaptive methods whose dense
    output is of lower order than their error estimator (dopri8), so that saved
    values are as accurate as the steps. `adaptive` is False when an adaptive
    explicit alg runs with constant steps of `dt0` (``dk.solve(adaptive=False)``);
    `fixed_step` says whether the solve steps on the fixed grid. `events` are the
    checked `diffeqkit._events.Event`s (empty: none), `max_events` the most that
    may fire in all.
    """

    backend: str
    f: Callable[..., Any]
    u0: Any
    p: Any
    jac: Callable[..., Any] | None
    t0: Any
    t1: Any
    saveat: Any
    alg: AlgInfo
    rtol: Any
    atol: Any
    dt0: float | None
    max_steps: int
    dtype: str | None
    device: str | None
    throw: bool
    sensealg: Any = None
    land_on_saves: bool = False
    adaptive: bool = True
    events: tuple[Any, ...] = ()
    max_events: int = 1000

    @property
    def fixed_step(self) -> bool:
        """Whether the solve steps on the fixed grid `diffeqkit._saveat.step_grid`
        (a fixed-step alg, or ``adaptive=False``) rather than adaptively."""
        return self.alg.fixed_step or not self.adaptive

    def state_dtype(self, default: str) -> str:
        """The dtype to integrate in: the one asked for, else u0's if it is an
        array, else the backend's `default` float."""
        if self.dtype is not None:
            return self.dtype
        if is_array(self.u0):
            return dtype_name(self.u0.dtype)
        return default

    def convert_p(self, leaf: Callable[[Any], Any]) -> Any:
        """`p` with `leaf` applied to every non-None leaf, structure kept."""
        return tree_map(lambda x: x if x is None else leaf(x), self.p)


JobT = TypeVar("JobT")
ResultT = TypeVar("ResultT")
# The one sensealg contract: each backend's table maps a sensealg class to one
# callable of one argument, the backend's prepared solve (its "job"), returning
# that solve made differentiable by the method in the backend's own terms (JAX:
# traced arrays under a custom VJP or diffrax adjoint; torch: a Solution whose u
# autograd differentiates; SciPy: a Solution and its Pullback). The keys are the
# registry's `Capabilities.sensealgs` (a test checks it); nothing dispatches on a
# sensealg's class outside the table.
SensealgTable = Mapping[type[Any], Callable[[JobT], ResultT]]


# pullback(cotangent) -> (dL/du0, dL/dp): cotangent of shape sol.u's, in any array
# type the backend accepts; the gradients in the backend's array type, dL/dp with
# p's structure (None leaves stay None). A solve with events also takes
# pullback(cotangent, (t_cots, u_cots)): per event, dL/d(sol.t_events[k]) and
# dL/d(sol.u_events[k]) of those shapes (NumPy or the backend's type).
Pullback = Callable[..., tuple[Any, Any]]


class Backend(Protocol):
    """A backend: translates a `SolveRequest` to its library and back."""

    name: str

    def solve(self, req: SolveRequest) -> Solution:
        """Solve; differentiable by the framework's own autodiff with
        ``req.sensealg`` doing the work (JAX, torch)."""
        ...

    def vjp(self, req: SolveRequest) -> tuple[Solution, Pullback]:
        """Solve, and return the pullback of ``sol.u`` with respect to
        ``(u0, p)`` by ``req.sensealg``; the pullback may be called repeatedly."""
        ...

    def loss_grad(
        self, loss: Callable[[Solution], Any], sol: Solution, req: SolveRequest
    ) -> tuple[Any, Any, Any]:
        """``(loss(sol), d loss / d sol.u, events)``: the value and the cotangents;
        ``events`` is ``(t_cots, u_cots)``, per event ``d loss / d
        sol.t_events[k]`` and ``d loss / d sol.u_events[k]``, for a solve with
        events (else None)."""
        ...

    def solve_ensemble(
        self, req: SolveRequest, u0: Any, p: Any, size: int, **options: Any
    ) -> Solution:
        """Solve `size` members of the template `req` (its u0 and p are member
        0's): `u0` has a leading member axis or is None (every member starts at
        ``req.u0``), `p` is ``req.p``'s structure with a leading member axis on
        every leaf, or None (shared). `options` are the ensemble options the
        registry lists for the backend (``devices``, ``executor``). Returns
        `conclude_ensemble`'s `Solution`."""
        ...

    def vjp_ensemble(
        self, req: SolveRequest, u0: Any, p: Any, size: int, **options: Any
    ) -> tuple[Solution, Pullback]:
        """`solve_ensemble` and its pullback: the cotangent has ``sol.u``'s shape
        ``(size, m, *u0.shape)``; batched inputs get gradients with the member
        axis, shared ones (`u0` or `p` None) the sum over members."""
        ...

    def describe(self) -> dict[str, Any]:
        """Versions and visible devices, for `python -m diffeqkit info`."""
        ...


def solution(req: SolveRequest, **fields: Any) -> Solution:
    """A `Solution` of `req`: what ran (backend, alg, sensealg) from the request,
    the rest (t, u, stats, status, ...) from `fields`."""
    return Solution(
        backend=req.backend, alg=req.alg.name, sensealg=req.sensealg, **fields
    )


def conclude(
    req: SolveRequest,
    *,
    t: Any,
    u: Any,
    stats: dict[str, Any],
    status: str,
    t_reached: float | None = None,
    t_events: Any = None,
    u_events: Any = None,
) -> Solution:
    """Build the `Solution`; raise `SolveError` for a failure when ``req.throw``."""
    sol = solution(
        req,
        t=t,
        u=u,
        stats=stats,
        status=status,
        t_events=t_events,
        u_events=u_events,
    )
    if sol.success:
        return sol
    from . import implicit_algs

    ours = implicit_algs(req.backend)
    elsewhere = ", ".join(
        f"backend='{b}' with alg='{a[0]}'"
        for b, a in ((b, implicit_algs(b)) for b in _other_backends(req.backend))
        if a
    )
    hint = failure_hint(
        status, ours, f"try {elsewhere}." if elsewhere else "", req.alg.name
    )
    reached = float("nan") if t_reached is None else float(t_reached)
    steps = stats.get("naccept")
    if steps is not None and stats.get("nreject") is not None:
        steps += stats["nreject"]
    message = solve_failed(reached, (req.t0, req.t1), status, steps, hint)
    sol = solution(
        req,
        t=t,
        u=u,
        stats=stats,
        status=status,
        message=message,
        t_events=t_events,
        u_events=u_events,
    )
    if req.throw:
        raise SolveError(message, sol)
    return sol


def conclude_ensemble(
    req: SolveRequest,
    *,
    t: Any,
    u: Any,
    stats: dict[str, Any],
    status: Sequence[str],
    t_reached: Sequence[float] | None = None,
    t_events: Any = None,
    u_events: Any = None,
) -> Solution:
    """The `Solution` of an ensemble: ``status`` a tuple of per-member names,
    ``stats`` per-member lists, `t_events` / `u_events` per event with the
    member axis first (`diffeqkit._events.stack_members`); raise `SolveError`
    naming the failed members when ``req.throw`` and any failed."""
    statuses = tuple(status)
    failed = [i for i, s in enumerate(statuses) if not STATUSES[s].success]
    message = (
        f"All {len(statuses)} members reached t1 (or a terminal event)."
        if not failed
        else ensemble_failed(req, statuses, failed, t_reached)
    )
    sol = solution(
        req,
        t=t,
        u=u,
        stats=stats,
        status=statuses,
        message=message,
        t_events=t_events,
        u_events=u_events,
    )
    if failed and req.throw:
        raise SolveError(message, sol)
    return sol


def ensemble_failed(
    req: SolveRequest,
    statuses: Sequence[str],
    failed: Sequence[int],
    t_reached: Sequence[float] | None,
) -> str:
    """The message of an ensemble with failed members: which, how, and the hint
    of the first one's status."""
    by_status: dict[str, list[int]] = {}
    for i in failed:
        by_status.setdefault(statuses[i], []).append(i)
    parts = [f"{name} for members {_ids(ids)}" for name, ids in by_status.items()]
    first = failed[0]
    reached = ""
    if t_reached is not None:
        reached = f" (member {first} stopped at t={float(t_reached[first]):.6g})"
    from . import implicit_algs

    hint = failure_hint(statuses[first], implicit_algs(req.backend), "", req.alg.name)
    return (
        f"{len(failed)} of {len(statuses)} members failed over tspan=("
        f"{req.t0!r}, {req.t1!r}): {'; '.join(parts)}{reached}. "
        f"{hint} With throw=False the other members' results are returned and "
        "sol.success marks the failed ones."
    ).replace("  ", " ")


def _ids(ids: Sequence[int], limit: int = 10) -> str:
    text = ", ".join(str(i) for i in ids[:limit])
    more = f", ... ({len(ids)} in all)" if len(ids) > limit else ""
    return f"[{text}{more}]"


def _other_backends(name: str) -> list[str]:
    from . import SPECS

    return [b for b in SPECS if b != name]
