"""The plain SciPy solve, driven step by step, and what the gradient methods reuse:
the alg table, solver options and the step loop (docs/design.md, "SciPy").
"""

from __future__ import annotations

import bisect
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import scipy.sparse
from scipy.integrate import BDF, LSODA, RK45, OdeSolver, Radau

from ..._arrays import to_numpy
from ..._errors import InvalidProblemError, UnsupportedError, short
from ..._events import Fired, Tracker, check_affect_output, check_condition_output
from ..._problem import check_rhs_output
from ..._saveat import step_grid
from ..._solution import Solution
from ..._tableaux import get_tableau
from .._protocol import SolveRequest, conclude
from ._autodiff import FINITE_DIFFERENCES, newton_jacobian_of_f

__all__ = [
    "ALGS",
    "Counter",
    "Jump",
    "Method",
    "Outcome",
    "Problem",
    "RungeKutta",
    "check_events",
    "conclude_outcome",
    "event_arrays",
    "finite_check",
    "integrate",
    "newton_jacobian",
    "options",
    "plain_jump",
    "prepare",
    "solve",
    "sparse",
]

# SciPy's generic explicit Runge-Kutta machinery (scipy.integrate._ivp.rk.RungeKutta)
# is private; RK45 is that class plus class attributes only (no methods), so a
# subclass that replaces every attribute defining the method is a RungeKutta on
# another tableau, through public API.
RungeKutta = RK45


class _FixedStepRungeKutta(RungeKutta):
    """Explicit Runge-Kutta steps exactly onto the points of a given grid."""

    def __init__(
        self, fun: Callable[..., Any], t0: float, y0: Any, t_bound: float, *, grid: Any
    ) -> None:
        self._grid = [float(t) for t in grid]
        self._next = 1
        # first_step only keeps RungeKutta from spending an f call on choosing one.
        super().__init__(
            fun, t0, y0, t_bound, first_step=abs(self._grid[1] - self._grid[0])
        )

    def _step_impl(self) -> tuple[Literal[True], None]:
        t, y, K = self.t, self.y, self.K
        t_new = self._grid[self._next]
        self._next += 1
        h = t_new - t
        K[0] = self.f
        for s in range(1, self.n_stages):
            K[s] = self.fun(t + self.C[s] * h, y + h * (K[:s].T @ self.A[s, :s]))
        y_new = y + h * (K[:-1].T @ self.B)
        # f(t_new, y_new) is the first stage of the next step (as in SciPy's rk_step)
        self.f = K[-1] = self.fun(t_new, y_new)
        self.h_previous = h
        self.y_old = y
        self.t = t_new
        self.y = y_new
        return True, None


def _runge_kutta(name: str, constant: bool = False) -> type[RungeKutta]:
    """A SciPy solver class running the shared tableau `name`; `constant`: on the
    fixed grid even if the tableau is adaptive (``adaptive=False``)."""
    tab = get_tableau(name)
    base = RungeKutta if tab.adaptive and not constant else _FixedStepRungeKutta
    attrs = {
        "C": tab.c,
        "A": tab.a,
        "B": tab.b,
        "E": tab.e,
        "P": tab.p,
        "order": tab.order,
        # unused without error control, but RungeKutta.__init__ computes with it
        "error_estimator_order": tab.error_order or tab.order,
        "n_stages": tab.n_stages,
        "__doc__": f"SciPy Runge-Kutta solver on the shared '{name}' tableau.",
    }
    return cast("type[RungeKutta]", type(f"RungeKutta_{name}", (base,), attrs))


@dataclass(frozen=True)
class _Setup:
    """What the solver options are built from: the converted request."""

    req: SolveRequest
    p: Any
    shape: tuple[int, ...]


def _first_step(setup: _Setup) -> float | None:
    req = setup.req
    # SciPy rejects a first step longer than the interval; dt0 is only a hint here
    return None if req.dt0 is None else min(req.dt0, abs(req.t1 - req.t0))


def _fixed_options(setup: _Setup) -> dict[str, Any]:
    req = setup.req
    if req.dt0 is None:  # the core requires dt0 for fixed-step algs
        raise InvalidProblemError(f"dt0 is required by alg='{req.alg.name}'.")
    return {"grid": step_grid(req.t0, req.t1, req.dt0, req.saveat)}


def _adaptive_options(setup: _Setup) -> dict[str, Any]:
    req = setup.req
    return {"rtol": req.rtol, "atol": req.atol, "first_step": _first_step(setup)}


def _implicit_options(setup: _Setup) -> dict[str, Any]:
    # "jac" is set by `prepare`, which also records where it comes from.
    return {**_adaptive_options(setup), "jac": None}


def _rk_stats(solver: Any, nfev0: int, naccept: int) -> dict[str, Any]:
    # Every attempt of a Runge-Kutta step (accepted or rejected) calls f exactly
    # n_stages times (stages 2..s and f(t + h, y1)), so the solver's own counter
    # since construction gives the attempts without per-step bookkeeping.
    attempts = (solver.nfev - nfev0) // solver.n_stages
    return {"nreject": attempts - naccept}


def _implicit_stats(solver: Any, nfev0: int, naccept: int) -> dict[str, Any]:
    # nreject is None: BDF and Radau retry rejected steps (error-test and Newton
    # failures) inside one step() call without counting them, and their f calls
    # per attempt vary with the Newton iterations, so rejections cannot be
    # inferred; LSODA does not report them either.
    return {"nreject": None, "njev": int(solver.njev), "nlu": int(solver.nlu)}


@contextmanager
def _quiet_lsoda() -> Iterator[None]:
    """Silence LSODA's failure warnings: the failure becomes the status."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="lsoda: ", category=UserWarning)
        yield


@dataclass(frozen=True)
class Method:
    """How one neutral alg runs on SciPy."""

    solver: type[OdeSolver]
    options: Callable[[_Setup], dict[str, Any]]
    stats: Callable[[Any, int, int], dict[str, Any]]
    guard: Callable[[], AbstractContextManager[Any]] = nullcontext
    # LSODA takes a dense Jacobian only; BDF and Radau also take sparse ones.
    dense_jac: bool = False


def _rk(
    name: str, options: Callable[[_Setup], dict[str, Any]], constant: bool = False
) -> Method:
    return Method(_runge_kutta(name, constant), options, _rk_stats)


ALGS: Mapping[str, Method] = {
    "euler": _rk("euler", _fixed_options),
    "midpoint": _rk("midpoint", _fixed_options),
    "heun": _rk("heun", _fixed_options),
    "rk4": _rk("rk4", _fixed_options),
    "bosh3": _rk("bosh3", _adaptive_options),
    "dopri5": _rk("dopri5", _adaptive_options),
    "tsit5": _rk("tsit5", _adaptive_options),
    "dopri8": _rk("dopri8", _adaptive_options),
    "bdf": Method(BDF, _implicit_options, _implicit_stats),
    "radau": Method(Radau, _implicit_options, _implicit_stats),
    "lsoda": Method(
        LSODA, _implicit_options, _implicit_stats, _quiet_lsoda, dense_jac=True
    ),
}
# The adaptive explicit algs with constant steps (``adaptive=False``).
CONSTANT_STEP: Mapping[str, Method] = {
    name: _rk(name, _fixed_options, constant=True)
    for name in ("bosh3", "dopri5", "tsit5", "dopri8")
}

# SciPy's failure messages -> statuses; any other failure (LSODA's "Unexpected
# istate") is "solver_failed". BDF and Radau answer a Newton failure by halving
# the step, so theirs end as "step_size_too_small".
_FAILURES: Mapping[str, str] = {OdeSolver.TOO_SMALL_STEP: "step_size_too_small"}


def _convert_leaf(x: Any) -> Any:
    """A p leaf as a NumPy array: floating -> float64, integers stay integers."""
    a = np.asarray(to_numpy(x))
    return a.astype(np.float64, copy=False) if a.dtype.kind == "f" else a


def _float64_only(req: SolveRequest) -> None:
    dtype = req.state_dtype(default="float64")
    if dtype == "float64":
        return
    source = f"dtype={short(req.dtype)}" if req.dtype is not None else "u0"
    raise UnsupportedError(
        f"backend='scipy' integrates in float64 only, but {source} asks for "
        f"{dtype}. Pass dtype='float64', or use backend='torch' or backend='jax' "
        f"to integrate in {dtype}."
    )


@dataclass(frozen=True)
class Problem:
    """A `SolveRequest` converted once: NumPy float64 state, p and times."""

    req: SolveRequest
    method: Method
    u0: Any  # float64, u0's shape (our own copy)
    p: Any  # p with NumPy leaves
    t0: float
    t1: float
    ts: Any  # the save times, float64
    base_options: dict[str, Any]  # the solver options of the user's system
    # Implicit algs: what builds the Newton Jacobian of the user's system
    # ("prob.jac", "jax", "torch" or FINITE_DIFFERENCES); None for explicit ones.
    jacobian: str | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.u0.shape

    @property
    def n(self) -> int:
        return self.u0.size

    @property
    def autodiff_jacobians(self) -> bool:
        """Whether the gradient methods give the systems they integrate with an
        implicit alg a Jacobian from their engine: unless the alg is explicit or
        finite differences were forced (or nothing can differentiate f, where
        the gradient methods refuse to run anyway)."""
        return self.jacobian not in (None, FINITE_DIFFERENCES)

    @property
    def grid(self) -> Any:
        """The step grid of a fixed-step alg, else None."""
        return self.base_options.get("grid")

    @property
    def stops(self) -> list[float]:
        """Times the steps must end on: the save times for algs whose dense output
        is weaker than their steps (dopri8); fixed-step grids already hold them."""
        if self.req.land_on_saves and self.grid is None:
            return self.ts.tolist()
        return []


def prepare(req: SolveRequest) -> Problem:
    """Convert and check `req`; ``f(u0, p, t0)`` is validated here (not counted)."""
    _float64_only(req)
    table = CONSTANT_STEP if req.fixed_step and not req.alg.fixed_step else ALGS
    method = table[req.alg.name]
    u0 = np.array(to_numpy(req.u0), dtype=np.float64)  # our own copy
    p = req.convert_p(_convert_leaf)
    t0, t1 = float(req.t0), float(req.t1)
    # NumPy's divide/overflow warnings are silenced for this one call: a
    # non-finite value raises a clearer InvalidProblemError.
    with np.errstate(all="ignore"):
        du0 = req.f(u0, p, t0)
    check_rhs_output(du0, u0, t0)
    ts = np.array(req.saveat, dtype=np.float64)
    opts = method.options(_Setup(req, p, u0.shape))
    jacobian = None
    if "jac" in opts:  # an implicit alg
        opts["jac"], jacobian = newton_jacobian_of_f(req, p, u0)
    problem = Problem(req, method, u0, p, t0, t1, ts, opts, jacobian)
    check_events(problem)
    return problem


def options(
    problem: Problem,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    jac: Callable[[float, Any], Any] | None = None,
    grid: Any = None,
    first_step: float | None = None,
) -> dict[str, Any]:
    """The solver options of another system integrated with the request's alg:
    the given tolerances (None: the request's), Jacobian (implicit algs; None:
    SciPy's finite differences), step grid (fixed-step algs) or first step."""
    opts = dict(problem.base_options)
    if "grid" in opts:
        if grid is not None:
            opts["grid"] = grid
        return opts
    opts["rtol"] = problem.req.rtol if rtol is None else rtol
    opts["atol"] = problem.req.atol if atol is None else atol
    if first_step is not None:
        opts["first_step"] = first_step
    if "jac" in opts:
        opts["jac"] = jac
    return opts


# Augmented systems' Jacobians are assembled sparse; up to this size they are
# handed over dense, as SciPy's dense LU beats its sparse one (splu) on small
# systems. LSODA takes dense Jacobians only.
_DENSE_JACOBIAN_MAX = 200


def sparse(block: Any) -> Any:
    """A dense Jacobian block as a sparse matrix, for `scipy.sparse.bmat`/`vstack`
    (which read a list of equal-shape dense arrays as one higher-dimensional
    array and refuse it)."""
    return scipy.sparse.csr_matrix(block)


def newton_jacobian(problem: Problem, J: Any) -> Any:
    """A sparse Jacobian of an augmented system in the form SciPy should get."""
    if problem.method.dense_jac or J.shape[0] <= _DENSE_JACOBIAN_MAX:
        return J.toarray()
    return J


class Counter:
    """Calls of a system and its latest value (to tell a NaN f from a tiny step)."""

    __slots__ = ("last", "nfev")

    def __init__(self) -> None:
        self.nfev = 0
        self.last: Any = None


def counted(fn: Callable[[float, Any], Any], counter: Counter) -> Callable[..., Any]:
    """`fn(t, y)` counting its calls in `counter`."""

    def fun(t: float, y: Any) -> Any:
        counter.nfev += 1
        counter.last = fn(t, y)
        return counter.last

    return fun


def user_rhs(problem: Problem, counter: Counter) -> Callable[[float, Any], Any]:
    """The adapter from SciPy's ``fun(t, y)`` (flat y, t often a NumPy scalar) to
    ``f(u, p, t)`` with u of u0's shape and t a Python float."""
    f, p, shape = problem.req.f, problem.p, problem.shape
    if len(shape) == 1:

        def fun(t: float, y: Any) -> Any:
            counter.nfev += 1
            counter.last = f(y, p, float(t))
            return counter.last

    else:

        def fun(t: float, y: Any) -> Any:
            counter.nfev += 1
            counter.last = f(y.reshape(shape), p, float(t))
            return counter.last.reshape(-1)

    return fun


@dataclass
class Outcome:
    """The end of one integration."""

    out: Any  # (m, N): the state at the save times, NaN where not reached
    status: str
    naccept: int
    t_reached: float
    err: ValueError | None
    solver: Any
    nfev0: int
    # With events: the tracker that kept them, and the Newton Jacobians and LU
    # factorisations of the solvers before the last (restarted at each event).
    events: Tracker | None = None
    spent: dict[str, int] = field(default_factory=dict)


# A callable told the solver after the setup and after every accepted step
# (CheckpointedAdjoint keeps some of those states).
Recorder = Callable[[Any], None]


@dataclass(frozen=True)
class Jump:
    """How events see and change the integrated vector ``y`` (the state, or the
    state with more, such as forward sensitivities).

    `state(y)` is the state in u0's shape; `apply(i, t, y)` is ``y`` after event
    ``i``'s affect at `t` (called only for events with an affect); `seen(i, t,
    y)`, if given, is told every event kept, with ``y`` before its jump.
    """

    state: Callable[[Any], Any]
    apply: Callable[[int, float, Any], Any]
    seen: Callable[[int, float, Any], None] | None = None


def plain_jump(problem: Problem) -> Jump:
    """Events on the plain state: ``y`` is the flat state."""
    shape, p, events = problem.shape, problem.p, problem.req.events

    def state(y: Any) -> Any:
        return y.reshape(shape)

    def apply(i: int, t: float, y: Any) -> Any:
        affect = events[i].affect
        return np.array(affect(y.reshape(shape), p, t), dtype=np.float64).reshape(-1)

    return Jump(state, apply)


def _tracker(problem: Problem) -> Tracker:
    events, p, f = problem.req.events, problem.p, problem.req.f

    def value(i: int, u: Any, t: float) -> float:
        return float(events[i].condition(u, p, t))

    def rhs(u: Any, t: float) -> Any:
        return f(u, p, t)

    direction = 1.0 if problem.t1 > problem.t0 else -1.0
    return Tracker(events, value, rhs, problem.req.max_events, direction)


def check_events(problem: Problem) -> None:
    """Check each condition and affect once at ``(u0, p, t0)``."""
    u0, p, t0 = problem.u0, problem.p, problem.t0
    for i, event in enumerate(problem.req.events):
        with np.errstate(all="ignore"):
            check_condition_output(i, event.condition(u0, p, t0))
            if event.affect is not None:
                check_affect_output(i, event.affect(u0.copy(), p, t0), u0)


def integrate(
    problem: Problem,
    fun: Callable[[float, Any], Any],
    y0: Any,
    opts: dict[str, Any],
    recorder: Recorder | None = None,
    jump: Jump | None = None,
) -> Outcome:
    """Integrate ``y' = fun(t, y)`` from ``t0`` to ``t1`` with the request's alg,
    saving at the request's save times and ending steps on `Problem.stops`.

    With events, each accepted step is checked for crossings (`Tracker`); at the
    earliest one the rows before it are saved from the step's dense output, the
    jump (`jump`, default `plain_jump`) is applied and the solver is restarted
    there: the rest of the step is integrated again from the new state. A save
    time exactly at an event takes the state after its jump.
    """
    req = problem.req
    ts = problem.ts
    out = np.full((ts.size, y0.size), np.nan)
    tracker = _tracker(problem) if req.events else None
    jump = jump or plain_jump(problem)
    watch = None if tracker is None else _watcher(tracker, jump.state)
    if tracker is not None:
        tracker.start(jump.state(y0), problem.t0)
    t_start, y_start, stops = problem.t0, y0, problem.stops
    direction = 1.0 if problem.t1 > problem.t0 else -1.0
    naccept = used = 0
    spent = {"nfev": 0, "njev": 0, "nlu": 0}
    with problem.method.guard():
        while True:
            solver = problem.method.solver(fun, t_start, y_start, problem.t1, **opts)
            nfev0 = solver.nfev
            # max_steps bounds step attempts (accepted + rejected), as on the other
            # backends, where they can be told (Runge-Kutta: every attempt costs
            # n_stages calls of f); BDF/Radau/LSODA hide rejections: accepted steps.
            rk = isinstance(solver, RungeKutta)
            limit: int | tuple[int, int, int] = req.max_steps - used
            if rk:
                limit = (req.max_steps - used, nfev0, solver.n_stages)
            status, n, t_reached, err, fired = _integrate(
                solver, ts, out, y_start, t_start, limit, stops, recorder, watch
            )
            naccept += n
            if fired is None or tracker is None:
                break
            t = fired.t
            y = solver.y.copy() if t == solver.t else solver.dense_output()(t)
            if not tracker.record(fired, jump.state(y).copy()):
                status, t_reached = "too_many_events", t
                break
            if jump.seen is not None:
                jump.seen(fired.index, t, y)
            event = req.events[fired.index]
            if event.affect is not None:
                y = jump.apply(fired.index, t, y)
            if event.terminal or t == problem.t1:
                out[ts == t] = y  # a save time at the event: after its jump
                status, t_reached = ("terminated" if event.terminal else "success"), t
                break
            spent["nfev"] += solver.nfev - nfev0
            spent["njev"] += int(getattr(solver, "njev", 0))
            spent["nlu"] += int(getattr(solver, "nlu", 0))
            used += (solver.nfev - nfev0) // solver.n_stages if rk else n
            opts = _restart_options(opts, solver, t, problem.t1, direction)
            stops = [s for s in stops if direction * s > direction * t]
            t_start, y_start = t, y
            tracker.start(jump.state(y), t, fired.index)
    return Outcome(
        out,
        status,
        naccept,
        t_reached,
        err,
        solver,
        nfev0 - spent["nfev"],
        tracker,
        spent,
    )


def _watcher(
    tracker: Tracker, state: Callable[[Any], Any]
) -> Callable[[Any], Fired | None]:
    """Checks the solver's last accepted step for events."""

    def watch(solver: Any) -> Fired | None:
        dense: list[Any] = []

        def state_at(t: float) -> Any:
            if not dense:  # built only when a condition changed sign
                dense.append(solver.dense_output())
            return state(dense[0](t))

        return tracker.check(solver.t_old, solver.t, state(solver.y), state_at)

    return watch


def _restart_options(
    opts: dict[str, Any], solver: Any, t: float, t1: float, direction: float
) -> dict[str, Any]:
    """The options of the solver restarted at an event at `t`: the rest of a
    fixed grid, or a first step as long as the last one."""
    opts = dict(opts)
    if "grid" in opts:
        later = [s for s in opts["grid"] if direction * s > direction * t]
        opts["grid"] = [t, *later]
    elif "first_step" in opts:
        opts["first_step"] = min(abs(solver.step_size), abs(t1 - t))
    return opts


def conclude_outcome(
    problem: Problem,
    outcome: Outcome,
    counter: Counter,
    u: Any,
    jacobian: str | None = None,
) -> Solution:
    """The `Solution` of an integration whose state rows are `u` (m, n);
    `jacobian` says what built the integrated system's Jacobian (None: the plain
    solve's `Problem.jacobian`)."""
    status, solver = outcome.status, outcome.solver
    if status in ("step_size_too_small", "solver_failed") and not (
        _finite(counter.last) and _finite(solver.y)
    ):
        status = "nonfinite"  # the step shrank or broke because f went NaN/inf
    elif outcome.err is not None:
        raise outcome.err  # not a non-finite f: a bug to see, not a status
    stats: dict[str, Any] = {"nfev": counter.nfev, "naccept": outcome.naccept}
    stats.update(problem.method.stats(solver, outcome.nfev0, outcome.naccept))
    for key in ("njev", "nlu"):
        if key in stats:
            stats[key] += outcome.spent.get(key, 0)
    t_events = u_events = None
    if outcome.events is not None:
        t_events, u_events = event_arrays(outcome.events, problem.shape)
        stats["nevents"] = outcome.events.count
    if problem.jacobian is not None:
        stats["jacobian"] = jacobian or problem.jacobian
    return conclude(
        problem.req,
        t=problem.ts,
        u=u.reshape((problem.ts.size, *problem.shape)),
        stats=stats,
        status=status,
        t_reached=outcome.t_reached,
        t_events=t_events,
        u_events=u_events,
    )


def event_arrays(tracker: Tracker, shape: tuple[int, ...]) -> tuple[Any, Any]:
    """`t_events` and `u_events` as NumPy float64 arrays of exact lengths."""
    t_events = [np.array(times, dtype=np.float64) for times in tracker.times]
    u_events = [
        np.array(states, dtype=np.float64).reshape((len(states), *shape))
        for states in tracker.states
    ]
    return t_events, u_events


def solve(problem: Problem, recorder: Recorder | None = None) -> Solution:
    """The plain solve of the user's system."""
    counter = Counter()
    fun = user_rhs(problem, counter)
    outcome = integrate(
        problem, fun, problem.u0.reshape(-1), problem.base_options, recorder
    )
    return conclude_outcome(problem, outcome, counter, outcome.out)


def _finite(x: Any) -> bool:
    return x is None or bool(np.isfinite(np.asarray(to_numpy(x), dtype=float)).all())


def finite_check(n: int) -> Callable[[Any], bool]:
    """A fast test that a state of size `n` is finite."""
    if n > _SMALL:
        return lambda y: bool(np.isfinite(y).all())
    # A Python float sum is a few times cheaper than np.isfinite(y).all() on small
    # states and never warns: NaN/inf make it non-finite (the exact test confirms
    # that an overflow of huge finite values is no failure).
    return lambda y: math.isfinite(sum(y.tolist())) or bool(np.isfinite(y).all())


# Below this state size the Python-float test of `finite_check` is the cheaper.
_SMALL = 64


def stop_list(stops: list[float], t0: float, t_end: float) -> list[float]:
    """The successive ``t_bound`` of a solver that must end steps on `stops`."""
    stops = [t for t in stops if t != t0]
    if stops and stops[-1] != t_end:
        stops.append(t_end)
    return stops


def _integrate(
    solver: Any,
    ts: Any,
    out: Any,
    y0: Any,
    t0: float,
    max_steps: int | tuple[int, int, int],
    stops: list[float],
    recorder: Recorder | None = None,
    watch: Callable[[Any], Fired | None] | None = None,
) -> tuple[str, int, float, ValueError | None, Fired | None]:
    """Step `solver` to its end, filling the rows of `out` at the save times `ts`.

    `max_steps` is the most accepted steps, or ``(most attempts, nfev at the
    start, calls of f per attempt)`` for solvers whose attempts can be counted.
    Steps end exactly on each time of `stops`: the solver's ``t_bound`` (which
    SciPy's steps never cross) is moved from one stop to the next. `recorder`, if
    given, sees the solver before the first step and after every accepted one.
    `watch`, if given, checks every accepted step for an event; at one, the rows
    before it are saved and the integration stops there (status "event").
    Returns the status, the number of accepted steps, the time reached, the
    error a step raised, if any, and the event found, if any.
    """
    direction = 1.0 if solver.t_bound > t0 else -1.0
    stops = stop_list(stops, t0, solver.t_bound)
    stop = 0
    if stops:
        solver.t_bound = stops[0]
    # save times as Python floats signed so that "reached" is always ">=": cheaper
    # per step than solve_ivp's searchsorted
    keys = (direction * ts).tolist()
    m = len(keys)
    # the first save time not before t0 (t0 > the solve's start after an event)
    i = bisect.bisect_left(keys, direction * t0)
    if i < m and ts[i] == t0:
        out[i] = y0
        i += 1
    nxt = keys[i] if i < m else math.inf
    step = solver.step
    finite = finite_check(solver.n)
    naccept = 0
    if isinstance(max_steps, tuple):
        limit, nfev0, per_attempt = max_steps

        def attempts() -> int:
            return (solver.nfev - nfev0) // per_attempt

    else:
        limit = max_steps

        def attempts() -> int:
            return naccept

    retry = _Retry(solver) if isinstance(solver, BDF | Radau) else None
    if recorder is not None:
        recorder(solver)
    while True:
        if attempts() >= limit:
            return "max_steps_reached", naccept, float(solver.t), None, None
        if retry is not None:
            retry.keep()
        try:
            message = step()
        except ValueError as err:
            # SciPy's LU factorisation refuses a NaN/inf Jacobian (BDF, Radau):
            # retried smaller; at the end `solve` makes it "nonfinite" when f went
            # non-finite, else re-raises
            if retry is not None and _NONFINITE_LU in str(err) and retry.shrink():
                continue
            return "solver_failed", naccept, float(solver.t), err, None
        if solver.status == "failed":
            status = _FAILURES.get(message, "solver_failed")
            return status, naccept, float(solver.t), None, None
        if not finite(solver.y):
            if retry is not None and retry.shrink():
                continue
            return "nonfinite", naccept, float(solver.t_old or solver.t), None, None
        naccept += 1
        if retry is not None:
            retry.accepted()
        if watch is not None and (fired := watch(solver)) is not None:
            _save(solver, ts, keys, i, out, direction, direction * fired.t)
            return "event", naccept, fired.t, None, fired
        if direction * solver.t >= nxt:
            i = _save(solver, ts, keys, i, out, direction)
            nxt = keys[i] if i < m else math.inf
        if solver.status == "finished":
            stop += 1
            if stop >= len(stops):
                return "success", naccept, float(solver.t), None, None
            solver.t_bound = stops[stop]
            solver.status = "running"
        if recorder is not None:
            recorder(solver)


class _Retry:
    """Rejects an implicit step that went non-finite and retries it smaller.

    SciPy's BDF and Radau accept a step whose Newton iterates went NaN (the NaN
    error norm passes their test), where the Runge-Kutta solvers, diffrax and
    the torch backend reject it and shrink the step. Here the solver is put back
    as it was before the step (its attributes; BDF's difference array is updated
    in place, so it is copied) and its public ``max_step`` caps the retry at a
    fifth of the failed step (the controllers' smallest factor); once a step
    succeeds the cap is lifted. A step below 10 ulps of t ends the solve.
    """

    def __init__(self, solver: Any) -> None:
        self.solver = solver
        self.max_step = solver.max_step
        self.saved: dict[str, Any] = {}

    def keep(self) -> None:
        self.saved = dict(vars(self.solver))
        if "D" in self.saved:
            self.saved["D"] = self.saved["D"].copy()

    def shrink(self) -> bool:
        solver, saved = self.solver, self.saved
        # The step it attempted: the failure may come before t moves (an LU
        # factorisation refusing a NaN Jacobian).
        h = min(saved["h_abs"], solver.max_step)
        vars(solver).update(saved)
        self.keep()  # the restored D must not be the one the retry updates
        if h <= _MIN_STEP_ULPS * abs(np.spacing(saved["t"])):
            return False
        solver.max_step = h * _SHRINK
        return True

    def accepted(self) -> None:
        self.solver.max_step = self.max_step


# What SciPy's LU factorisation says of a Jacobian with NaN/inf entries.
_NONFINITE_LU = "infs or NaNs"
# SciPy's smallest step (in ulps of t) and smallest step-size factor.
_MIN_STEP_ULPS = 10
_SHRINK = 0.2


def _save(
    solver: Any,
    ts: Any,
    keys: list[float],
    i: int,
    out: Any,
    d: float,
    until: float = math.inf,
) -> int:
    """Fill the rows of the save times reached by the last step (those before
    `until`, a signed time, only); the next row."""
    t = solver.t
    reached = d * t
    j = i
    while j < len(keys) and keys[j] <= reached and keys[j] < until:
        j += 1
    end = j
    if (
        j > i and ts[j - 1] == t
    ):  # a save time at the step's end takes the state exactly
        out[j - 1] = solver.y
        end = j - 1
    if end > i:
        out[i:end] = solver.dense_output()(ts[i:end]).T
    return j
