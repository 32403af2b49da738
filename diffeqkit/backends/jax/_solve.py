"""The plain JAX solve: the alg table on diffrax, its step-size controllers, and the
compiled program with its cache.

Every solve runs one ``jax.jit``-compiled program, kept in a bounded LRU cache
keyed by the problem's structure; the data (u0, p, times, tolerances, the fixed
grid) are traced arguments, so new values never recompile. A differentiated solve
runs the request's entry of the sensealg table on a `Job` inside the same program.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from jax.custom_derivatives import CustomVJPPrimal

from ..._cache import LRUCache
from ..._errors import UnsupportedError
from ..._problem import check_rhs_output
from ..._sensealg import SensitivityAlgorithm
from ..._solution import STATUS_CODES
from ..._tableaux import get_tableau

__all__ = [
    "ALGS",
    "CACHE_SIZE",
    "PROGRAMS",
    "PULLBACK",
    "RK4",
    "STATUSES",
    "Config",
    "Job",
    "Method",
    "Programs",
    "counts",
    "diffeqsolve",
    "fixed_inputs",
    "nfev",
    "program",
    "solve_with",
    "vector_field",
    "vjp_program",
]

# Compiled programs kept; each holds its f alive, so the cache is bounded.
CACHE_SIZE = 128

# diffrax's outcome -> diffeqkit status; any other outcome is "solver_failed" (e.g.
# an implicit solver's Newton iteration that did not converge on an accepted step).
_RESULT_STATUS: Mapping[str, str] = {
    "successful": "success",
    "max_steps_reached": "max_steps_reached",
    "dt_min_reached": "step_size_too_small",
    "nonfinite": "nonfinite",
    "nonfinite_input": "nonfinite",
}
# The program returns a status as its index here (the core's status codes).
STATUSES = STATUS_CODES
_FAILED = STATUSES.index("solver_failed")

# diffrax's outcomes, an equinox Enumeration (whose items pyright cannot type).
RESULTS: Any = diffrax.RESULTS

# SciPy's minimum step: a step shorter than this many ulps of t is too small.
_MIN_STEP_ULPS = 10


# ---------------------------------------------------------------------------------
# Step-size controllers: diffrax's, with a guard that stops a hopeless solve.
# ---------------------------------------------------------------------------------


def all_finite(tree: Any) -> jax.Array:
    ok = jnp.array(True)
    for x in jax.tree_util.tree_leaves(tree):
        ok = ok & jnp.all(jnp.isfinite(x))
    return ok


class _PIDController(diffrax.PIDController):
    """`diffrax.PIDController` that stops when a rejected step underflows.

    diffrax (without ``dtmin``) keeps halving a rejected step forever, until
    ``max_steps``, once ``t + dt == t``. As SciPy does, a step rejected down to ten
    ulps of ``t`` ends the solve: ``dt_min_reached``, or ``nonfinite`` when the
    rejected candidate state is NaN/inf.
    """

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
        # A non-finite candidate (an implicit step whose Newton iteration diverged
        # to inf, an explicit step into a blow-up) is rejected as if its error were
        # infinite, so the step shrinks by factormin. diffrax would scale the error
        # by |y1_candidate| = inf, get NaN, and propose a NaN step forever.
        finite = all_finite(y1_candidate)
        candidate = jax.tree_util.tree_map(
            lambda y1, y: jnp.where(finite, y1, y), y1_candidate, y0
        )
        error = jax.tree_util.tree_map(lambda e: jnp.where(finite, e, jnp.inf), y_error)
        keep, next_t0, next_t1, made_jump, state, result = super().adapt_step_size(
            t0, t1, y0, candidate, args, error, error_order, controller_state
        )
        # diffrax integrates in increasing (direction-normalised) time.
        # (No gradient flows through step sizes; nextafter has no derivative.)
        here = jax.lax.stop_gradient(next_t0)
        ulp = jnp.nextafter(here, jnp.inf) - here
        too_small = jnp.logical_not(keep) & (next_t1 - next_t0 < _MIN_STEP_ULPS * ulp)
        failure = RESULTS.where(finite, RESULTS.dt_min_reached, RESULTS.nonfinite)
        result = RESULTS.where(too_small, failure, result)
        return keep, next_t0, next_t1, made_jump, state, result


class StepTo(diffrax.StepTo):
    """`diffrax.StepTo` that refuses a step to a non-finite state and stops there.

    Plain ``StepTo`` accepts every step, so a blow-up would fill the rest of the
    solution with NaN and report success; here the solve stops at the last finite
    step with ``nonfinite``.
    """

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
        _, next_t0, next_t1, made_jump, state, result = super().adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state
        )
        ok = all_finite(y1_candidate)
        return (
            ok,
            jnp.where(ok, next_t0, t0),
            jnp.where(ok, next_t1, t1),
            made_jump,
            jnp.where(ok, state, controller_state),
            RESULTS.where(ok, result, RESULTS.nonfinite),
        )


# ---------------------------------------------------------------------------------
# Solvers: the alg table.
# ---------------------------------------------------------------------------------


class StepValues(diffrax.AbstractLocalInterpolation):
    """A step's interpolant that is *exactly* the step value at the step's end.

    Solves on a fixed grid save only at step ends (the save times are grid
    points), so this returns ``y1`` itself there instead of a polynomial evaluated
    at 1; inside the step it is the method's own interpolant (`inner`), which the
    interpolating adjoint reads.
    """

    t0: Any
    t1: Any
    inner: diffrax.AbstractLocalInterpolation
    y1: Any

    @classmethod
    def wrapping(cls, inner: Callable[..., Any], **info: Any) -> StepValues:
        """From a step's dense information, around ``inner(**info)``."""
        return cls(t0=info["t0"], t1=info["t1"], inner=inner(**info), y1=info["y1"])

    def evaluate(self, t0: Any, t1: Any = None, left: bool = True) -> Any:
        out = self.inner.evaluate(t0, t1, left)
        if t1 is not None:
            return out
        return jax.tree_util.tree_map(
            lambda y1, y: jnp.where(t0 == self.t1, y1, y), self.y1, out
        )


@functools.cache
def on_grid(cls: type[diffrax.AbstractSolver]) -> type[diffrax.AbstractSolver]:
    """`cls` saving exact step values (see `StepValues`); one class per solver."""
    return type(
        f"{cls.__name__}OnGrid",
        (cls,),
        {
            "interpolation_cls": functools.partial(
                StepValues.wrapping, cast("Any", cls).interpolation_cls
            ),
            "__module__": __name__,
            "__qualname__": f"{cls.__name__}OnGrid",
        },
    )


def _butcher(name: str) -> diffrax.ButcherTableau:
    """The shared tableau `name` in diffrax's layout, for a fixed-step method."""
    tab = get_tableau(name)
    s = tab.n_stages
    return diffrax.ButcherTableau(
        c=np.array(tab.c[1:]),
        a_lower=tuple(np.array(tab.a[i, :i]) for i in range(1, s)),
        b_sol=np.array(tab.b),
        # A fixed-step method has no error estimate; diffrax wants a zero-sum one.
        b_error=np.zeros(s),
    )


class _RK4Interpolation(diffrax.AbstractLocalInterpolation):
    """The classical Runge-Kutta method's third-order continuous extension: the
    weights ``b(theta)`` of its stages, equal to ``b`` at ``theta = 1``."""

    t0: Any
    t1: Any
    y0: Any
    k: Any  # diffrax's stage increments (f times the step), stage axis first

    @classmethod
    def from_dense(cls, *, t0: Any, t1: Any, y0: Any, k: Any, **_: Any) -> Any:
        return cls(t0=t0, t1=t1, y0=y0, k=k)

    def evaluate(self, t0: Any, t1: Any = None, left: bool = True) -> Any:
        del left
        if t1 is not None:
            return jax.tree_util.tree_map(
                jnp.subtract, self.evaluate(t1), self.evaluate(t0)
            )
        th = (t0 - self.t0) / (self.t1 - self.t0)
        middle = th**2 - 2 * th**3 / 3
        b = jnp.stack(
            [
                th - 3 * th**2 / 2 + 2 * th**3 / 3,
                middle,
                middle,
                2 * th**3 / 3 - th**2 / 2,
            ]
        )
        return jax.tree_util.tree_map(
            lambda y0, k: y0 + jnp.tensordot(b.astype(k.dtype), k, axes=1),
            self.y0,
            self.k,
        )


class RK4(diffrax.AbstractERK):
    """The classical 4th-order Runge-Kutta method, from ``get_tableau("rk4")``.

    A fixed-step method (no error estimate): use it with ``diffrax.StepTo`` or
    ``diffrax.ConstantStepSize``. Its interpolant is the method's third-order
    continuous extension.
    """

    tableau: ClassVar[diffrax.ButcherTableau | diffrax.MultiButcherTableau] = _butcher(
        "rk4"
    )
    interpolation_cls: ClassVar[Callable[..., Any]] = _RK4Interpolation.from_dense

    def order(self, terms: Any) -> int:
        del terms
        return 4


@dataclass(frozen=True)
class Method:
    """A diffrax solver and what diffeqkit needs to know about it."""

    solver: type[diffrax.AbstractSolver]
    # Evaluations of f per step (None: not countable, e.g. Newton iterations).
    stages: int | None
    # Whether a step reuses the previous step's last evaluation as its first.
    fsal: bool
    # Order of the interpolant that gives save values between steps; None for
    # fixed-step methods, which save only at step ends.
    dense_order: int | None
    # Order of the embedded error estimate (the tableau's error_order); None for
    # fixed-step methods.
    error_order: int | None
    # An implicit (stiff) method: Newton root finder, PI step-size control.
    implicit: bool = False
    # An IMEX method (KenCarp): f goes in as its implicit part, so it runs as the
    # L-stable ESDIRK of the pair; the explicit part is zero.
    imex: bool = False

    @property
    def fixed_step(self) -> bool:
        return self.error_order is None

    @property
    def lands_on_saves(self) -> bool:
        """Whether adaptive steps must end on save times: the interpolant is too
        weak (implicit methods always: their interpolants are cubic at best, and
        stiff problems have few saves)."""
        return self.implicit or (
            self.dense_order is not None
            and self.error_order is not None
            and self.dense_order < self.error_order
        )

    def build(self, fixed_step: bool = False) -> diffrax.AbstractSolver:
        """The solver object; with `fixed_step`, one that saves exact step values.

        An implicit one gets a full Newton iteration (a fresh Jacobian each
        iteration) with the step-size controller's tolerances instead of diffrax's
        default chord iteration: far fewer steps on stiff problems
        (docs/stiff.md).
        """
        if not self.implicit:
            return on_grid(self.solver)() if fixed_step else self.solver()
        root_finder = diffrax.with_stepsize_controller_tols(optx.Newton)()
        return cast("Any", self.solver)(root_finder=root_finder)

    def term(self, f: Callable[..., Any]) -> diffrax.AbstractTerm:
        """diffrax's term for the user's ``f(u, p, t)``."""
        term = diffrax.ODETerm(vector_field(f))
        if not self.imex:
            return term
        zero = diffrax.ODETerm(
            lambda t, y, args: jax.tree_util.tree_map(jnp.zeros_like, y)
        )
        return diffrax.MultiTerm(zero, term)

    def controller(self, rtol: Any, atol: Any) -> _PIDController:
        """The adaptive step-size controller at these tolerances; implicit
        methods get the PI coefficients diffrax recommends for stiff problems
        (docs/stiff.md)."""
        if self.implicit:
            return _PIDController(rtol=rtol, atol=atol, pcoeff=0.3, icoeff=0.4)
        return _PIDController(rtol=rtol, atol=atol)


def _explicit(
    solver: type[diffrax.AbstractSolver], dense_order: int | None, tableau: str
) -> Method:
    tab: Any = getattr(solver, "tableau", None)
    stages, fsal = (1, False) if tab is None else (tab.num_stages, tab.fsal)
    return Method(solver, stages, fsal, dense_order, get_tableau(tableau).error_order)


# The algs this backend offers (declared in the registry's SPECS["jax"]). The dense
# orders are those of diffrax's interpolants as measured (docs/performance.md);
# dopri8 and the implicit methods therefore step onto the save times.
ALGS: Mapping[str, Method] = {
    "euler": _explicit(on_grid(diffrax.Euler), None, "euler"),
    "midpoint": _explicit(on_grid(diffrax.Midpoint), None, "midpoint"),
    "heun": _explicit(on_grid(diffrax.Heun), None, "heun"),
    "rk4": _explicit(on_grid(RK4), None, "rk4"),
    "bosh3": _explicit(diffrax.Bosh3, 3, "bosh3"),
    "dopri5": _explicit(diffrax.Dopri5, 4, "dopri5"),
    "tsit5": _explicit(diffrax.Tsit5, 4, "tsit5"),
    "dopri8": _explicit(diffrax.Dopri8, 5, "dopri8"),
    # Implicit: their error estimates are embedded methods of one order less;
    # Newton iterations make nfev uncountable here (stages None).
    "implicit_euler": Method(diffrax.ImplicitEuler, None, False, 1, 1, True),
    "kvaerno3": Method(diffrax.Kvaerno3, None, False, 3, 2, True),
    "kvaerno4": Method(diffrax.Kvaerno4, None, False, 3, 3, True),
    "kvaerno5": Method(diffrax.Kvaerno5, None, False, 3, 4, True),
    "kencarp3": Method(diffrax.KenCarp3, None, False, 3, 2, True, imex=True),
    "kencarp4": Method(diffrax.KenCarp4, None, False, 3, 3, True, imex=True),
    "kencarp5": Method(diffrax.KenCarp5, None, False, 3, 4, True, imex=True),
}


def nfev(method: Method, naccept: int, nreject: int) -> int | None:
    """Evaluations of f made by the solve, from diffrax's step counts.

    Every step attempt (accepted or rejected) evaluates all ``stages``, except that
    an FSAL solver takes its first stage from the last accepted step; for the first
    step that is our ``f(u0, p, t0)``, handed to diffrax as the solver state (see
    `_fsal_state`), hence the 1. Without FSAL that check is not used by the solver
    and not counted. diffrax's automatic first step (``dt0=None``) costs no
    evaluation: its controller sees a direction-wrapped term and starts from 0.01.
    """
    if method.stages is None:
        return None
    steps = naccept + nreject
    if method.fsal:
        return 1 + (method.stages - 1) * steps
    return method.stages * steps


def _fsal_state(method: Method, du0: Any) -> Any:
    """The initial solver state: for an FSAL Runge-Kutta solver ``(first_step,
    f0)`` with f0 = our ``f(u0, p, t0)``, so its first step does not evaluate it
    again (diffrax's own init leaves ``first_step=True`` and f0 unset); else None,
    diffrax's default."""
    if not method.fsal:
        return None
    return (jnp.array(False), du0)


# ---------------------------------------------------------------------------------
# The solve.
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """The static part of a solve: everything that shapes the compiled program."""

    f: Callable[..., Any]
    method: Method
    dtype: str
    max_steps: int
    fixed_step: bool  # steps on the fixed grid (a fixed-step alg, or adaptive=False)
    adaptive_dt0: bool  # an adaptive solve with dt0 given
    land: bool  # adaptive steps must end on the save times
    # "eager": a plain solve, all host information returned; "traced": under a
    # JAX transformation, diffrax raises on failure; "vjp": `dk.vjp`'s solve and
    # pullback, status returned.
    mode: str
    # The gradient method and its entry of the sensealg table, which makes the
    # solve differentiable; None for an eager solve (nothing is differentiated).
    sensealg: SensitivityAlgorithm | None = None
    differentiable: Callable[[Job], tuple[Any, Any]] | None = None
    # "traced" mode: whether a failure raises when the program runs (diffrax's
    # throw), for the forward solve and an adjoint's backward one. False returns
    # the status as a traced code instead (`failure_masked`).
    throw: bool = True

    @property
    def raises(self) -> bool:
        """Whether the program raises on a failed solve."""
        return self.mode == "traced" and self.throw


@dataclass(frozen=True)
class Job:
    """One solve inside the compiled program: its `Config` and the traced inputs,
    ``times = (t0, t1, rtol, atol, dt0)`` and `grid` the fixed-step grid (an
    array, or a step-size controller stepping on it) or None.
    The sensealg table's entries take it and return ``(ys, counts)``."""

    cfg: Config
    y0: Any
    p: Any
    times: tuple[Any, ...]
    ts: Any
    grid: Any

    @property
    def sensealg(self) -> Any:
        return self.cfg.sensealg


def vector_field(f: Callable[..., Any]) -> Callable[..., Any]:
    """diffrax's ``vf(t, y, args)`` over the user's ``f(u, p, t)``."""

    def vf(t: Any, y: Any, args: Any) -> Any:
        return f(y, args, t)

    return vf


def diffeqsolve(
    job: Job,
    adjoint: diffrax.AbstractAdjoint | None = None,
    *,
    own_init: bool = False,
    dense: bool = False,
) -> tuple[Any, Any]:
    """diffrax's solve of the job, and ``f(u0, p, t0)``.

    `adjoint` is diffrax's (None: its default, for a solve that is not
    differentiated or is differentiated outside diffrax). `own_init` lets diffrax
    initialise the solver itself instead of reusing ``f(u0, p, t0)`` as an FSAL
    solver's first stage (`_fsal_state`), for adjoints that refuse a given solver
    state. `dense` keeps the interpolant of every step (``sol.evaluate``).
    """
    cfg, y0, p, ts, grid = job.cfg, job.y0, job.p, job.ts, job.grid
    t0, t1, rtol, atol, dt0 = job.times
    du0 = cfg.f(y0, p, t0)
    check_rhs_output(du0, y0, t0)  # shapes and dtypes, at trace time
    method = cfg.method
    if isinstance(grid, diffrax.AbstractStepSizeController):
        # A grid built step by step (events on a fixed grid: `_grid.Grid`).
        controller: diffrax.AbstractStepSizeController = grid
        step0 = None
    elif grid is not None:
        controller = StepTo(ts=grid)
        t0, t1, step0 = grid[0], grid[-1], None
    else:
        pid = method.controller(rtol, atol)
        controller = (
            diffrax.ClipStepSizeController(pid, step_ts=ts) if cfg.land else pid
        )
        step0 = jnp.where(t1 > t0, dt0, -dt0) if cfg.adaptive_dt0 else None
    if cfg.mode == "eager":
        # Also the time the solve stopped at; nothing of y is needed there.
        saveat = diffrax.SaveAt(
            subs=[
                diffrax.SubSaveAt(ts=ts),
                diffrax.SubSaveAt(t1=True, fn=lambda t, y, args: t),
            ]
        )
    else:  # BacksolveAdjoint accepts nothing but plain save times
        saveat = diffrax.SaveAt(ts=ts, dense=dense)
    sol = diffrax.diffeqsolve(
        method.term(cfg.f),
        method.build(cfg.fixed_step),
        t0,
        t1,
        step0,
        y0,
        args=p,
        saveat=saveat,
        stepsize_controller=controller,
        max_steps=cfg.max_steps,
        throw=cfg.raises,
        adjoint=diffrax.RecursiveCheckpointAdjoint() if adjoint is None else adjoint,
        solver_state=None if own_init else _fsal_state(method, du0),
    )
    return sol, du0


def _status_code(sol: Any) -> Any:
    code = jnp.array(_FAILED, dtype=jnp.int32)
    for name, status in _RESULT_STATUS.items():
        code = jnp.where(
            sol.result == getattr(RESULTS, name), STATUSES.index(status), code
        )
    return code


def counts(sol: Any) -> Any:
    """Status code, accepted and rejected steps, as one int32 array."""
    stats: Any = sol.stats
    return jnp.stack(
        [
            _status_code(sol),
            jnp.asarray(stats["num_accepted_steps"]).astype(jnp.int32),
            jnp.asarray(stats["num_rejected_steps"]).astype(jnp.int32),
        ]
    )


def solve_with(
    job: Job, adjoint: diffrax.AbstractAdjoint, *, own_init: bool = False
) -> tuple[Any, Any]:
    """``(ys, counts)`` of the job, differentiated by diffrax's `adjoint`."""
    sol, _ = diffeqsolve(job, adjoint, own_init=own_init)
    return sol.ys, counts(sol)


def fixed_inputs(fixed: Any, message: str) -> Any:
    """The values of a custom VJP's inputs that get no gradient; raises
    `UnsupportedError` with `message` when one of them is perturbed."""
    primal = lambda x: isinstance(x, CustomVJPPrimal)  # noqa: E731
    if any(x.perturbed for x in jax.tree_util.tree_leaves(fixed, is_leaf=primal)):
        raise UnsupportedError(message)
    return jax.tree_util.tree_map(lambda x: x.value, fixed, is_leaf=primal)


def _eager(job: Job) -> tuple[Any, Any]:
    """The plain solve, and everything the host reads in one integer array (one
    transfer): status, step counts, f(u0)'s finiteness and the time reached."""
    sol, du0 = diffeqsolve(job)
    saved_ts, saved_ys = cast("list[Any]", sol.ts), cast("list[Any]", sol.ys)
    ys = saved_ys[0]
    # Rows not reached keep diffrax's fill value inf in both ts and ys.
    reached = jnp.isfinite(saved_ts[0]).reshape((-1,) + (1,) * job.y0.ndim)
    ys = jnp.where(reached, ys, jnp.nan)
    # The time reached rides along bit for bit in an integer of its width.
    t_end = saved_ts[1][0]
    bits = jnp.dtype(f"int{8 * jnp.dtype(job.cfg.dtype).itemsize}")
    info = jnp.concatenate(
        [
            counts(sol).astype(bits),
            jnp.stack(
                [
                    all_finite(du0).astype(bits),
                    jax.lax.bitcast_convert_type(t_end, bits),
                ]
            ),
        ]
    )
    return ys, info


def program(cfg: Config, u0: Any, p: Any, scalars: Any, ts: Any, grid: Any) -> Any:
    """One solve, traced once per `Config` and input structure.

    ``scalars`` is ``(t0, t1, rtol, atol, dt0)`` (dt0 unused unless
    ``cfg.adaptive_dt0``); ``grid`` the fixed-step grid or None. Returns the save
    times, the saved states and host information: in eager mode status, step
    counts, f(u0)'s finiteness and the time reached (`_eager`); otherwise status
    and step counts (`counts`) of the solve made differentiable by the
    sensealg's entry.
    """
    dtype = jnp.dtype(cfg.dtype)
    job = Job(
        cfg,
        jnp.asarray(u0, dtype=dtype),
        p,
        tuple(jnp.asarray(scalars[i], dtype=dtype) for i in range(5)),
        jnp.asarray(ts, dtype=dtype),
        None if grid is None else jnp.asarray(grid, dtype=dtype),
    )
    run = _eager if cfg.differentiable is None else cfg.differentiable
    ys, info = run(job)
    if cfg.differentiable is not None and not cfg.raises:
        ys = failure_masked(ys, info[0] == 0, (job.y0, job.p))
    return job.ts, ys, info


def failure_masked(ys: Any, success: Any, inputs: Any) -> Any:
    """The saved states of a solve that may have failed, as a user sees them.

    Rows not reached (diffrax fills them with inf) become NaN, and a failed solve
    has no derivative: the derivative of every row with respect to `inputs`
    (``(u0, p)``), and so every gradient, is NaN whatever the sensealg computed
    (a reached row's derivative would depend on where the solve happened to
    stop). A successful solve passes through unchanged.
    """
    rows = ys.reshape(ys.shape[0], -1)
    reached = jnp.all(jnp.isfinite(rows), axis=1)
    ys = jnp.where(
        (success | reached).reshape((-1,) + (1,) * (ys.ndim - 1)), ys, jnp.nan
    )
    floats = [
        x
        for x in jax.tree_util.tree_leaves(inputs)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return ys + _zero_derivative_unless(success, floats).astype(ys.dtype)


@jax.custom_jvp
def _zero_derivative_unless(ok: Any, inputs: Any) -> Any:
    """0, whose derivative with respect to `inputs` is 0 if `ok` and NaN if not."""
    del inputs
    # Computed from `ok` so that under jax.vmap it is batched as its tangent is
    # (a constant would be unbatched while the tangent is not).
    return jnp.where(ok, 0.0, 0.0)


@_zero_derivative_unless.defjvp
def _zero_derivative_jvp(primals: Any, tangents: Any) -> tuple[Any, Any]:
    ok, inputs = primals
    _, dinputs = tangents
    total = sum((jnp.sum(d) for d in dinputs), jnp.zeros(()))
    return _zero_derivative_unless(ok, inputs), jnp.where(ok, 0.0, jnp.nan) * total


class Programs(LRUCache):
    """A bounded LRU cache of compiled programs, keyed by problem structure."""

    def get(self, key: Any, fn: Callable[..., Any]) -> Callable[..., Any]:  # pyright: ignore[reportIncompatibleMethodOverride]
        """``jax.jit(fn)``, compiled once per key."""
        return super().get(key, lambda: jax.jit(fn))


PROGRAMS = Programs(CACHE_SIZE)


def vjp_program(
    cfg: Config, u0: Any, p: Any, scalars: Any, ts: Any, grid: Any
) -> tuple[Any, Any, Any]:
    """The solve with its pullback (a `jax.tree_util.Partial` holding the
    residuals, so it can leave the compiled program), for `dk.vjp`."""

    def solve(u0: Any, p: Any) -> tuple[Any, Any]:
        ts_out, ys, info = program(cfg, u0, p, scalars, ts, grid)
        return ys, (ts_out, info)

    return jax.vjp(solve, u0, p, has_aux=True)


# Applies a pullback from `vjp_program`; its function is the same object for
# every call of one compiled program, so this compiles once per structure.
PULLBACK = jax.jit(lambda pullback, cotangent: pullback(cotangent))
