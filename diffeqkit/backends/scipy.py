"""The SciPy backend: `scipy.integrate` solvers, driven step by step.

Requirements met here:

- The explicit algs run the shared tableaux of `diffeqkit._tableaux` on SciPy's
  Runge-Kutta machinery: classes made by `_runge_kutta` (class attributes
  ``C, A, B, E, P``, orders and stage count), so SciPy integrates with the same
  coefficients as the other backends; ``bosh3`` and ``dopri5`` are SciPy's ``RK23``
  and ``RK45`` bit for bit. Fixed-step algs step exactly on
  `diffeqkit._saveat.step_grid` with no error control.
- The implicit algs are SciPy's ``BDF``, ``Radau`` and ``LSODA``, with the user's
  ``jac(u, p, t)`` when given.
- The step loop is ours, as in `solve_ivp` (construct the solver, call
  ``solver.step()`` until it finishes), because `solve_ivp` has no ``max_steps``,
  hides accepted/rejected counts and returns nothing useful on failure. Save times
  inside a step come from the solver's dense output (for the Runge-Kutta methods
  the tableau's ``p``); a save time equal to a step's end takes the step's state.
- Per-step Python work is kept to what `solve_ivp`'s own loop does: the benchmark
  is `solve_ivp` with the same tableau.
- SciPy integrates in float64 on the CPU only: float32 raises `UnsupportedError`.
- Stats are real counts: ``nfev`` every call of `f` (finite-difference Jacobian
  columns included, the validation call at ``t0`` not), ``naccept`` the accepted
  steps (``max_steps`` bounds them), ``nreject`` where it can be told.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
import scipy
from scipy.integrate import BDF, LSODA, RK45, OdeSolver, Radau

from .._arrays import to_numpy
from .._errors import InvalidProblemError, UnsupportedError, short
from .._problem import check_rhs_output
from .._saveat import step_grid
from .._solution import Solution
from .._tableaux import get_tableau
from ._protocol import SolveRequest, conclude

__all__ = ["BACKEND", "ScipyBackend"]

# SciPy's generic explicit Runge-Kutta machinery (scipy.integrate._ivp.rk.RungeKutta)
# is private; RK45 is that class plus class attributes only (no methods), so a
# subclass that replaces every attribute defining the method is a RungeKutta on
# another tableau, through public API.
_RungeKutta = RK45


class _FixedStepRungeKutta(_RungeKutta):
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


def _runge_kutta(name: str) -> type[_RungeKutta]:
    """A SciPy solver class running the shared tableau `name`."""
    tab = get_tableau(name)
    base = _RungeKutta if tab.adaptive else _FixedStepRungeKutta
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
    return cast("type[_RungeKutta]", type(f"RungeKutta_{name}", (base,), attrs))


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
    # Without jac, SciPy's finite differences (BDF/Radau) or LSODA's own difference
    # quotients build the Jacobian; AD Jacobians come with the gradient work.
    user_jac = setup.req.jac
    jac = None if user_jac is None else _jac_adapter(user_jac, setup.p, setup.shape)
    return {**_adaptive_options(setup), "jac": jac}


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
class _Method:
    """How one neutral alg runs on SciPy."""

    solver: type[OdeSolver]
    options: Callable[[_Setup], dict[str, Any]]
    stats: Callable[[Any, int, int], dict[str, Any]]
    guard: Callable[[], AbstractContextManager[Any]] = nullcontext


def _rk(name: str, options: Callable[[_Setup], dict[str, Any]]) -> _Method:
    return _Method(_runge_kutta(name), options, _rk_stats)


_ALGS: Mapping[str, _Method] = {
    "euler": _rk("euler", _fixed_options),
    "midpoint": _rk("midpoint", _fixed_options),
    "heun": _rk("heun", _fixed_options),
    "rk4": _rk("rk4", _fixed_options),
    "bosh3": _rk("bosh3", _adaptive_options),
    "dopri5": _rk("dopri5", _adaptive_options),
    "tsit5": _rk("tsit5", _adaptive_options),
    "dopri8": _rk("dopri8", _adaptive_options),
    "bdf": _Method(BDF, _implicit_options, _implicit_stats),
    "radau": _Method(Radau, _implicit_options, _implicit_stats),
    "lsoda": _Method(LSODA, _implicit_options, _implicit_stats, _quiet_lsoda),
}

# SciPy's failure messages -> statuses; any other failure (LSODA's "Unexpected
# istate") is "solver_failed". BDF and Radau answer a Newton failure by halving
# the step, so theirs end as "step_size_too_small".
_FAILURES: Mapping[str, str] = {OdeSolver.TOO_SMALL_STEP: "step_size_too_small"}


def _jac_adapter(
    user_jac: Callable[..., Any], p: Any, shape: tuple[int, ...]
) -> Callable[[float, Any], Any]:
    """SciPy's ``jac(t, y)`` from the user's ``jac(u, p, t)``, as an (n, n) array."""
    n = math.prod(shape)
    expected = shape + shape

    def jac(t: float, y: Any) -> Any:
        J = np.asarray(to_numpy(user_jac(y.reshape(shape), p, float(t))))
        if J.shape != expected:
            raise InvalidProblemError(
                f"jac(u, p, t) returned shape {J.shape} but must return df/du of "
                f"shape u.shape + u.shape = {expected}."
            )
        return J.astype(np.float64, copy=False).reshape(n, n)

    return jac


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


class ScipyBackend:
    """Solves `SolveRequest`s with `scipy.integrate` (see the module docstring)."""

    name = "scipy"

    def describe(self) -> dict[str, Any]:
        """Versions and devices, for `python -m diffeqkit info`."""
        return {
            "devices": ["cpu"],
            "versions": {"scipy": scipy.__version__, "numpy": np.__version__},
        }

    def solve(self, req: SolveRequest) -> Solution:
        """Integrate `req` and return a `Solution` of NumPy float64 arrays.

        Parameters
        ----------
        req : SolveRequest
            The validated call of `dk.solve`.

        Returns
        -------
        Solution
            ``t`` of shape ``(m,)`` and ``u`` of shape ``(m, *u0.shape)``, float64
            NumPy arrays; rows at save times not reached are NaN.

        Raises
        ------
        UnsupportedError
            The state dtype is float32.
        InvalidProblemError
            `f` (at ``t0``) or `jac` returns the wrong shape, dtype or values.
        SolveError
            The integration failed and ``req.throw``.
        """
        _float64_only(req)
        method = _ALGS[req.alg.name]
        u0 = np.array(to_numpy(req.u0), dtype=np.float64)  # our own copy
        shape = u0.shape
        p = req.convert_p(_convert_leaf)
        t0, t1 = float(req.t0), float(req.t1)
        f = req.f
        # Not counted in stats. NumPy's divide/overflow warnings are silenced for
        # this one call: a non-finite value raises a clearer InvalidProblemError.
        with np.errstate(all="ignore"):
            du0 = f(u0, p, t0)
        check_rhs_output(du0, u0, t0)

        nfev = 0
        last_du: Any = None  # the latest f value, to tell a NaN f from a tiny step

        # The adapter from SciPy's fun(t, y) (flat y, t often a NumPy scalar) to
        # f(u, p, t) with u of u0's shape and t a Python float.
        if len(shape) == 1:

            def fun(t: float, y: Any) -> Any:
                nonlocal nfev, last_du
                nfev += 1
                last_du = f(y, p, float(t))
                return last_du

        else:

            def fun(t: float, y: Any) -> Any:
                nonlocal nfev, last_du
                nfev += 1
                last_du = f(y.reshape(shape), p, float(t))
                return last_du.reshape(-1)

        ts = np.array(req.saveat, dtype=np.float64)
        m = ts.size
        n = u0.size
        out = np.full((m, n), np.nan)
        y0 = u0.reshape(-1)
        options = method.options(_Setup(req, p, shape))
        # Adaptive methods whose dense output is weaker than their steps (dopri8)
        # stop on every save time; fixed-step grids already contain them.
        stops = ts.tolist() if req.land_on_saves and "grid" not in options else []
        with method.guard():
            solver = method.solver(fun, t0, y0, t1, **options)
            nfev0 = solver.nfev
            # max_steps bounds step attempts (accepted + rejected), as on the other
            # backends, where they can be told (Runge-Kutta: every attempt costs
            # n_stages calls of f); BDF/Radau/LSODA hide rejections: accepted steps.
            limit: int | tuple[int, int, int] = req.max_steps
            if isinstance(solver, _RungeKutta):
                limit = (req.max_steps, nfev0, solver.n_stages)
            status, naccept, t_reached, err = _integrate(
                solver, ts, out, y0, t0, limit, stops
            )
        if status in ("step_size_too_small", "solver_failed") and not (
            _finite(last_du) and _finite(solver.y)
        ):
            status = "nonfinite"  # the step shrank or broke because f went NaN/inf
        elif err is not None:
            raise err  # not a non-finite f: a bug to see, not a status
        stats = {"nfev": nfev, "naccept": naccept}
        stats.update(method.stats(solver, nfev0, naccept))
        return conclude(
            req,
            t=ts,
            u=out.reshape((m, *shape)),
            stats=stats,
            status=status,
            t_reached=t_reached,
        )


def _finite(x: Any) -> bool:
    return x is None or bool(np.isfinite(np.asarray(to_numpy(x), dtype=float)).all())


def _finite_check(n: int) -> Callable[[Any], bool]:
    """A fast test that a state of size `n` is finite."""
    if n > _SMALL:
        return lambda y: bool(np.isfinite(y).all())
    # A Python float sum is a few times cheaper than np.isfinite(y).all() on small
    # states and never warns: NaN/inf make it non-finite (the exact test confirms
    # that an overflow of huge finite values is no failure).
    return lambda y: math.isfinite(sum(y.tolist())) or bool(np.isfinite(y).all())


# Below this state size the Python-float test of `_finite_check` is the cheaper.
_SMALL = 64


def _integrate(
    solver: Any,
    ts: Any,
    out: Any,
    y0: Any,
    t0: float,
    max_steps: int | tuple[int, int, int],
    stops: list[float],
) -> tuple[str, int, float, ValueError | None]:
    """Step `solver` to its end, filling the rows of `out` at the save times `ts`.

    `max_steps` is the most accepted steps, or ``(most attempts, nfev at the
    start, calls of f per attempt)`` for solvers whose attempts can be counted.
    Steps end exactly on each time of `stops`: the solver's ``t_bound`` (which
    SciPy's steps never cross) is moved from one stop to the next.
    Returns the status, the number of accepted steps, the time reached and the
    error a step raised, if any.
    """
    direction = 1.0 if solver.t_bound > t0 else -1.0
    t_end = solver.t_bound
    stops = [t for t in stops if t != t0]
    if stops and stops[-1] != t_end:
        stops.append(t_end)
    stop = 0
    if stops:
        solver.t_bound = stops[0]
    # save times as Python floats signed so that "reached" is always ">=": cheaper
    # per step than solve_ivp's searchsorted
    keys = (direction * ts).tolist()
    m = len(keys)
    i = 0
    if ts[0] == t0:
        out[0] = y0
        i = 1
    nxt = keys[i] if i < m else math.inf
    step = solver.step
    finite = _finite_check(solver.n)
    naccept = 0
    if isinstance(max_steps, tuple):
        limit, nfev0, per_attempt = max_steps

        def attempts() -> int:
            return (solver.nfev - nfev0) // per_attempt

    else:
        limit = max_steps

        def attempts() -> int:
            return naccept

    while True:
        if attempts() >= limit:
            return "max_steps_reached", naccept, float(solver.t), None
        try:
            message = step()
        except ValueError as err:
            # SciPy's LU factorisation refuses a NaN/inf Jacobian (BDF, Radau):
            # `solve` makes it "nonfinite" when f went non-finite, else re-raises
            return "solver_failed", naccept, float(solver.t), err
        if solver.status == "failed":
            status = _FAILURES.get(message, "solver_failed")
            return status, naccept, float(solver.t), None
        naccept += 1
        if not finite(solver.y):
            return "nonfinite", naccept, float(solver.t_old), None
        if direction * solver.t >= nxt:
            i = _save(solver, ts, keys, i, out, direction)
            nxt = keys[i] if i < m else math.inf
        if solver.status == "finished":
            stop += 1
            if stop >= len(stops):
                return "success", naccept, float(solver.t), None
            solver.t_bound = stops[stop]
            solver.status = "running"


def _save(solver: Any, ts: Any, keys: list[float], i: int, out: Any, d: float) -> int:
    """Fill the rows of the save times reached by the last step; the next row."""
    t = solver.t
    reached = d * t
    j = i
    while j < len(keys) and keys[j] <= reached:
        j += 1
    end = j
    if ts[j - 1] == t:  # a save time at the step's end takes the state exactly
        out[j - 1] = solver.y
        end = j - 1
    if end > i:
        out[i:end] = solver.dense_output()(ts[i:end]).T
    return j


BACKEND = ScipyBackend()
