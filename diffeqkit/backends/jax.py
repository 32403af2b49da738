"""The JAX backend: diffeqkit's algs on diffrax, compiled once per problem structure.

Requirements met here:

- Every alg is a diffrax solver (`_ALGS`): euler, midpoint, heun, bosh3, dopri5,
  tsit5, dopri8 and kvaerno5 are diffrax's own; rk4 (the classical method, which
  diffrax lacks) is a `diffrax.AbstractERK` built from the shared tableau
  ``get_tableau("rk4")``, so diffrax's Runge-Kutta machinery runs it. diffrax's
  tableaux equal the shared ones (a test checks a, b and c to 1e-15).
- Adaptive algs run under ``diffrax.PIDController(rtol, atol)`` (diffrax's default
  coefficients and RMS norm of ``err / (atol + rtol * max(|y0|, |y1|))``). Save
  values between steps come from diffrax's own interpolants where they are at least
  of the order of the method's error estimate (bosh3, dopri5, tsit5); dopri8's
  (measured order 5) and kvaerno5's (cubic Hermite) are weaker, so their steps end
  on the save times (`_Method.dense_order`, `_Method.lands_on_saves`, checked by
  tests), as do those of any alg the core asks to (``req.land_on_saves``).
  Fixed-step algs step with ``diffrax.StepTo`` on `diffeqkit._saveat.step_grid`, and
  their saved values are the step values themselves (`_StepValues`).
- No recompilation: every solve runs one ``jax.jit``-compiled program, kept in a
  bounded LRU cache keyed by the problem's *structure* (f, jac, alg, shapes and
  dtypes of u0 and of p's leaves, p's tree structure, number of save times, fixed
  grid length, max_steps, whether dt0 is given, device, throw mode, dtype). The
  *data* (u0, p, t0, t1, save times, rtol, atol, dt0 or grid) are traced arguments,
  so new values never re-trace f or recompile. The program also evaluates
  ``f(u0, p, t0)`` (checked by `check_rhs_output` at trace time) and returns its
  finiteness with the status, step counts and time reached, which come to the host
  in one transfer; eager per-call work is a few NumPy conversions, one dictionary
  lookup, one compiled call and that transfer. (f's finiteness at t0 is not
  checked under a transformation; a non-finite f then fails the solve itself.)
- Under a JAX transformation (any of u0, p, tspan, saveat, rtol, atol a tracer),
  `solve` calls the same kind of cached program, which inlines into the caller's
  trace, so ``jax.jit``/``jax.grad``/``jax.vmap`` of a function calling `dk.solve`
  trace f once. The status cannot be read inside a trace: with ``throw=True`` diffrax
  raises when the compiled program runs and the `Solution` says ``"success"`` (it
  can only be seen if the solve succeeded), and ``throw=False`` raises
  `UnsupportedError`. Gradients use diffrax's default adjoint.
- Failures: the step-size controllers are diffrax's with a guard. An adaptive step
  rejected down to ten ulps of t (SciPy's rule) stops the solve with
  ``"step_size_too_small"``, or ``"nonfinite"`` when the rejected candidate state is
  not finite (plain diffrax would spin until ``max_steps``); a fixed step that
  produces a non-finite state is refused and stops the solve with ``"nonfinite"``.
  diffrax's ``RESULTS`` map to the statuses in `_RESULT_STATUS`; rows of save times
  not reached are NaN (diffrax fills them with inf) and the time reached is the one
  diffrax stopped at.
- stats: ``naccept``/``nreject`` are diffrax's step counts; diffrax does not count
  evaluations of f, so ``nfev`` is derived from the step counts, the stage count and
  FSAL-ness of the solver (see `_nfev`; a test counts real evaluations). The FSAL
  solvers take our ``f(u0, p, t0)`` as their first stage (`_fsal_state`), as the
  other backends reuse theirs. kvaerno5's Newton iterations are not counted, so its
  ``nfev`` is None. Under a transformation all three are None (they are traced).
- dtype: the state dtype follows the inputs; lists get JAX's default float (float32
  unless x64 is on). float64 with ``jax_enable_x64`` off raises `UnsupportedError`;
  the flag is never changed here. device: the one asked for, else that of the JAX
  inputs, else JAX's default; the data are put there and the whole solve runs there.
  Under a transformation the values stay where the caller's trace has them.
- ``jac`` is part of the cache key but not used: diffrax's implicit solvers
  differentiate f themselves.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from jax.core import Tracer
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from .._arrays import to_numpy
from .._cache import LRUCache
from .._errors import (
    SolveError,
    UnsupportedError,
    backward_failed,
    listing,
    unavailable_device,
)
from .._problem import check_rhs_output, rhs_nonfinite_error
from .._saveat import step_grid
from .._sensealg import (
    CheckpointedAdjoint,
    ContinuousAdjoint,
    ForwardMode,
    ReverseThroughSolver,
    SensitivityAlgorithm,
    adjoint_atol,
)
from .._solution import Solution
from .._tableaux import get_tableau
from ._protocol import Pullback, SolveRequest, conclude

__all__ = ["BACKEND", "JaxBackend"]

# Compiled programs kept; each holds its f alive, so the cache is bounded.
_CACHE_SIZE = 128

# diffrax's outcome -> diffeqkit status; any other outcome is "solver_failed" (e.g.
# an implicit solver's Newton iteration that did not converge on an accepted step).
_RESULT_STATUS: Mapping[str, str] = {
    "successful": "success",
    "max_steps_reached": "max_steps_reached",
    "dt_min_reached": "step_size_too_small",
    "nonfinite": "nonfinite",
    "nonfinite_input": "nonfinite",
}
# The program returns a status as its index here.
_STATUSES = (
    "success",
    "max_steps_reached",
    "step_size_too_small",
    "nonfinite",
    "solver_failed",
)
_FAILED = _STATUSES.index("solver_failed")

# diffrax's outcomes, an equinox Enumeration (whose items pyright cannot type).
RESULTS: Any = diffrax.RESULTS

# SciPy's minimum step: a step shorter than this many ulps of t is too small.
_MIN_STEP_ULPS = 10


# ---------------------------------------------------------------------------------
# Step-size controllers: diffrax's, with a guard that stops a hopeless solve.
# ---------------------------------------------------------------------------------


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)])
    )


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
        finite = _all_finite(y1_candidate)
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


class _StepTo(diffrax.StepTo):
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
        ok = _all_finite(y1_candidate)
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


class _StepValues(diffrax.LocalLinearInterpolation):
    """Linear between the ends of a step and *exactly* the step values at them.

    Fixed-step methods save only at step ends (the save times are grid points), so
    this returns ``y1`` itself there instead of a polynomial evaluated at 1.
    """

    @classmethod
    def from_dense(cls, *, t0: Any, t1: Any, y0: Any, y1: Any, **_: Any) -> Any:
        return cls(t0=t0, t1=t1, y0=y0, y1=y1)

    def evaluate(self, t0: Any, t1: Any = None, left: bool = True) -> Any:
        out = super().evaluate(t0, t1, left)
        if t1 is not None:
            return out
        return jax.tree_util.tree_map(
            lambda y1, y: jnp.where(t0 == self.t1, y1, y), self.y1, out
        )


def _on_grid(cls: type[diffrax.AbstractSolver]) -> type[diffrax.AbstractSolver]:
    """`cls` saving exact step values (see `_StepValues`)."""
    return type(
        f"{cls.__name__}OnGrid",
        (cls,),
        {
            "interpolation_cls": _StepValues.from_dense,
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


class RK4(diffrax.AbstractERK):
    """The classical 4th-order Runge-Kutta method, from ``get_tableau("rk4")``.

    A fixed-step method (no error estimate): use it with ``diffrax.StepTo`` or
    ``diffrax.ConstantStepSize``. Its interpolant is exact at step ends and linear
    in between.
    """

    tableau: ClassVar[diffrax.ButcherTableau | diffrax.MultiButcherTableau] = _butcher(
        "rk4"
    )
    interpolation_cls: ClassVar[Callable[..., Any]] = _StepValues.from_dense

    def order(self, terms: Any) -> int:
        del terms
        return 4


@dataclass(frozen=True)
class _Method:
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
        """Whether steps must end on save times: the interpolant is too weak.

        Implicit methods always do: their interpolants (cubic Hermite, or
        KenCarp's) are weaker than their steps, and saves are few on the long
        time spans of stiff problems.
        """
        return self.implicit or (
            self.dense_order is not None
            and self.error_order is not None
            and self.dense_order < self.error_order
        )

    def build(self) -> diffrax.AbstractSolver:
        """The solver object.

        An implicit one gets a full Newton iteration (a fresh Jacobian each
        iteration) with the step-size controller's tolerances, instead of
        diffrax's default chord iteration (the Jacobian of the stage's first
        iterate). Measured in diffrax 0.7 at rtol=1e-8 (accepted/rejected steps,
        Kvaerno5): ROBER to 1e11 2787/2627 with the default, 484/5 with Newton;
        HIRES 3052/2883 against 458/38; KenCarp4 with the chord iteration did not
        finish either within 100000 steps. Each Newton iteration costs a Jacobian
        (one forward-mode pass per state component), which small stiff systems
        repay many times over.
        """
        if not self.implicit:
            return self.solver()
        root_finder = diffrax.with_stepsize_controller_tols(optx.Newton)()
        return cast("Any", self.solver)(root_finder=root_finder)

    def term(self, f: Callable[..., Any]) -> diffrax.AbstractTerm:
        """diffrax's term for the user's ``f(u, p, t)``."""
        term = diffrax.ODETerm(_vector_field(f))
        if not self.imex:
            return term
        zero = diffrax.ODETerm(
            lambda t, y, args: jax.tree_util.tree_map(jnp.zeros_like, y)
        )
        return diffrax.MultiTerm(zero, term)

    def controller(self, rtol: Any, atol: Any) -> _PIDController:
        """The adaptive step-size controller at these tolerances.

        Implicit methods get the PI coefficients diffrax's documentation
        recommends for stiff problems (pcoeff=0.3, icoeff=0.4): with diffrax's
        chord iteration on HIRES at rtol=1e-8 they cut Kvaerno5's rejected steps
        from 2903 to 582.
        """
        if self.implicit:
            return _PIDController(rtol=rtol, atol=atol, pcoeff=0.3, icoeff=0.4)
        return _PIDController(rtol=rtol, atol=atol)


def _explicit(
    solver: type[diffrax.AbstractSolver], dense_order: int | None, tableau: str
) -> _Method:
    tab: Any = getattr(solver, "tableau", None)
    stages, fsal = (1, False) if tab is None else (tab.num_stages, tab.fsal)
    return _Method(solver, stages, fsal, dense_order, get_tableau(tableau).error_order)


# The algs this backend offers (declared in the registry's SPECS["jax"]). The dense
# orders are those of diffrax 0.7's interpolants as measured (local error of one
# step's interpolant at theta = 0.3, 0.5, 0.7 against the exact solution, for
# h = 0.4, 0.2, 0.1, 0.05): Bosh3's cubic Hermite 3, Dopri5's and Tsit5's own
# quartics 4, Dopri8's 5 (its local error falls as h**6, although its docstring
# says 8th order), Kvaerno5's cubic Hermite 3. Dopri8 and Kvaerno5 therefore step
# onto the save times; a test checks the error at save times against that at step
# ends.
_ALGS: Mapping[str, _Method] = {
    "euler": _explicit(_on_grid(diffrax.Euler), None, "euler"),
    "midpoint": _explicit(_on_grid(diffrax.Midpoint), None, "midpoint"),
    "heun": _explicit(_on_grid(diffrax.Heun), None, "heun"),
    "rk4": _explicit(RK4, None, "rk4"),
    "bosh3": _explicit(diffrax.Bosh3, 3, "bosh3"),
    "dopri5": _explicit(diffrax.Dopri5, 4, "dopri5"),
    "tsit5": _explicit(diffrax.Tsit5, 4, "tsit5"),
    "dopri8": _explicit(diffrax.Dopri8, 5, "dopri8"),
    # Implicit: their error estimates are embedded methods of one order less;
    # Newton iterations make nfev uncountable here (stages None).
    "implicit_euler": _Method(diffrax.ImplicitEuler, None, False, 1, 1, True),
    "kvaerno3": _Method(diffrax.Kvaerno3, None, False, 3, 2, True),
    "kvaerno4": _Method(diffrax.Kvaerno4, None, False, 3, 3, True),
    "kvaerno5": _Method(diffrax.Kvaerno5, None, False, 3, 4, True),
    "kencarp3": _Method(diffrax.KenCarp3, None, False, 3, 2, True, imex=True),
    "kencarp4": _Method(diffrax.KenCarp4, None, False, 3, 3, True, imex=True),
    "kencarp5": _Method(diffrax.KenCarp5, None, False, 3, 4, True, imex=True),
}


def _nfev(method: _Method, naccept: int, nreject: int) -> int | None:
    """Evaluations of f made by the solve, from diffrax's step counts.

    Every step attempt (accepted or rejected) evaluates all ``stages``, except that
    an FSAL solver takes its first stage from the last accepted step; for the first
    step that is our ``f(u0, p, t0)``, handed to diffrax as the solver state (see
    `_fsal_state`), hence the 1. Without FSAL that check is not used by the solver
    and not counted. diffrax 0.7's automatic first step (``dt0=None``) costs no
    evaluation: its controller sees a direction-wrapped term and starts from 0.01.
    """
    if method.stages is None:
        return None
    steps = naccept + nreject
    if method.fsal:
        return 1 + (method.stages - 1) * steps
    return method.stages * steps


def _fsal_state(method: _Method, du0: Any) -> Any:
    """The initial solver state: for an FSAL Runge-Kutta solver ``(first_step,
    f0)`` with f0 = our ``f(u0, p, t0)``, so its first step does not evaluate it
    again (diffrax's own init leaves ``first_step=True`` and f0 unset); else None,
    diffrax's default.

    diffrax differentiates through this state with its default adjoint; its
    BacksolveAdjoint and ImplicitAdjoint refuse gradients through a given solver
    state, so a solve using those must pass None here instead.
    """
    if not method.fsal:
        return None
    return (jnp.array(False), du0)


# ---------------------------------------------------------------------------------
# The compiled program.
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    """The static part of a solve: everything that shapes the compiled program."""

    f: Callable[..., Any]
    method: _Method
    dtype: str
    max_steps: int
    adaptive_dt0: bool  # an adaptive solve with dt0 given
    land: bool  # adaptive steps must end on the save times
    # "eager": a plain solve, all host information returned; "traced": under a
    # JAX transformation, diffrax raises on failure; "vjp": `dk.vjp`'s solve and
    # pullback, status returned.
    mode: str
    # The gradient method; None for an eager solve (nothing is differentiated).
    sensealg: SensitivityAlgorithm | None = None


def _vector_field(f: Callable[..., Any]) -> Callable[..., Any]:
    """diffrax's ``vf(t, y, args)`` over the user's ``f(u, p, t)``."""

    def vf(t: Any, y: Any, args: Any) -> Any:
        return f(y, args, t)

    return vf


# ---------------------------------------------------------------------------------
# Gradient methods: the sensealg table -> diffrax adjoints.
# ---------------------------------------------------------------------------------


def _reverse_adjoint(cfg: _Config, grid: Any, times: Any) -> Any:
    """ReverseThroughSolver: one checkpoint per step, so nothing is recomputed."""
    del grid, times
    return diffrax.RecursiveCheckpointAdjoint(checkpoints=cfg.max_steps)


def _checkpointed_adjoint(cfg: _Config, grid: Any, times: Any) -> Any:
    """CheckpointedAdjoint: diffrax's recursive (binomial) checkpointing."""
    del grid, times
    return diffrax.RecursiveCheckpointAdjoint(
        checkpoints=cast("Any", cfg.sensealg).checkpoints
    )


def _backsolve_adjoint(cfg: _Config, grid: Any, times: Any) -> Any:
    """ContinuousAdjoint: diffrax's backsolve, with its own controller for the
    backward solve (the sensealg's tolerances, else the forward ones)."""
    _, _, rtol, atol, dt0 = times
    # The backward solve raises when it fails (a backsolve that drifts off the
    # forward trajectory can hit max_steps), even where the forward one reports a
    # status instead: a silently truncated adjoint would be a wrong gradient.
    if grid is not None:
        # Fixed step: diffrax solves the adjoint between consecutive save times, so
        # it steps by dt0 backward from each save time (a grid of its own).
        backward = jnp.where(grid[-1] > grid[0], -dt0, dt0)
        return diffrax.BacksolveAdjoint(
            stepsize_controller=diffrax.ConstantStepSize(), dt0=backward, throw=True
        )
    sensealg = cast("Any", cfg.sensealg)
    # The backward solve uses the forward method (implicit for a stiff problem),
    # with the same kind of controller.
    return diffrax.BacksolveAdjoint(
        stepsize_controller=cfg.method.controller(
            rtol if sensealg.rtol is None else sensealg.rtol,
            atol if sensealg.atol is None else sensealg.atol,
        ),
        throw=True,
    )


def _forward_adjoint(cfg: _Config, grid: Any, times: Any) -> Any:
    """ForwardMode: diffrax's forward-mode adjoint, driven by `_forward_mode`."""
    del cfg, grid, times
    return diffrax.ForwardMode()


_SENSEALGS: Mapping[type[SensitivityAlgorithm], Callable[..., Any]] = {
    ForwardMode: _forward_adjoint,
    ReverseThroughSolver: _reverse_adjoint,
    ContinuousAdjoint: _backsolve_adjoint,
    CheckpointedAdjoint: _checkpointed_adjoint,
}


def _adjoint(cfg: _Config, grid: Any, times: Any) -> Any:
    if cfg.sensealg is None:  # an eager solve: nothing is differentiated
        return diffrax.RecursiveCheckpointAdjoint()
    return _SENSEALGS[type(cfg.sensealg)](cfg, grid, times)


# ---------------------------------------------------------------------------------
# The compiled program.
# ---------------------------------------------------------------------------------


def _diffeqsolve(
    cfg: _Config, y0: Any, p: Any, times: Any, ts: Any, grid: Any, dense: bool = False
) -> tuple[Any, Any]:
    """diffrax's solve of one problem, and ``f(u0, p, t0)``; `dense` keeps the
    interpolant of every step too (``sol.evaluate``)."""
    t0, t1, rtol, atol, dt0 = times
    du0 = cfg.f(y0, p, t0)
    check_rhs_output(du0, y0, t0)  # shapes and dtypes, at trace time
    method = cfg.method
    if grid is not None:
        controller: diffrax.AbstractStepSizeController = _StepTo(ts=grid)
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
    adjoint = _adjoint(cfg, grid, times)
    # diffrax's backsolve refuses a given solver state (see `_fsal_state`); under
    # ForwardMode a given state, whose tangents are computed outside the solve,
    # made the gradient ~10% slower than diffrax's own init (neural ODE with 1220
    # inputs, benchmarks/overhead.py), and f0 costs one evaluation either way.
    own_init = isinstance(adjoint, diffrax.BacksolveAdjoint | diffrax.ForwardMode)
    sol = diffrax.diffeqsolve(
        method.term(cfg.f),
        method.build(),
        t0,
        t1,
        step0,
        y0,
        args=p,
        saveat=saveat,
        stepsize_controller=controller,
        max_steps=cfg.max_steps,
        throw=cfg.mode == "traced",
        adjoint=adjoint,
        solver_state=None if own_init else _fsal_state(method, du0),
    )
    return sol, du0


def _status_code(sol: Any) -> Any:
    code = jnp.array(_FAILED, dtype=jnp.int32)
    for name, status in _RESULT_STATUS.items():
        code = jnp.where(
            sol.result == getattr(RESULTS, name), _STATUSES.index(status), code
        )
    return code


def _counts(sol: Any) -> Any:
    """Status code, accepted and rejected steps, as one int32 array."""
    stats: Any = sol.stats
    return jnp.stack(
        [
            _status_code(sol),
            jnp.asarray(stats["num_accepted_steps"]).astype(jnp.int32),
            jnp.asarray(stats["num_rejected_steps"]).astype(jnp.int32),
        ]
    )


def _program(
    cfg: _Config,
    u0: Any,
    p: Any,
    scalars: Any,
    ts: Any,
    grid: Any,
) -> Any:
    """One solve, traced once per `_Config` and input structure.

    ``scalars`` is ``(t0, t1, rtol, atol, dt0)`` (dt0 unused unless
    ``cfg.adaptive_dt0``); ``grid`` the fixed-step grid or None. Returns the save
    times, the saved states and host information: in eager mode status, step
    counts, f(u0)'s finiteness and the time reached (`_eager_info`); otherwise
    status and step counts (`_counts`).
    """
    dtype = jnp.dtype(cfg.dtype)
    y0 = jnp.asarray(u0, dtype=dtype)
    times = tuple(jnp.asarray(scalars[i], dtype=dtype) for i in range(5))
    ts = jnp.asarray(ts, dtype=dtype)
    if grid is not None:
        grid = jnp.asarray(grid, dtype=dtype)
    if cfg.mode != "eager" and isinstance(cfg.sensealg, ForwardMode):
        ys, counts = _forward_mode(cfg, y0, p, times, ts, grid)
        return ts, ys, counts
    if isinstance(cfg.sensealg, ContinuousAdjoint) and cfg.method.implicit:
        ys, counts = _interpolating_adjoint(cfg, y0, p, times, ts)
        return ts, ys, counts
    sol, du0 = _diffeqsolve(cfg, y0, p, times, ts, grid)
    saved_ts, saved_ys = cast("list[Any]", sol.ts), cast("list[Any]", sol.ys)
    if cfg.mode != "eager":
        return ts, saved_ys, _counts(sol)

    ys = saved_ys[0]
    # Rows not reached keep diffrax's fill value inf in both ts and ys.
    reached = jnp.isfinite(saved_ts[0]).reshape((-1,) + (1,) * y0.ndim)
    ys = jnp.where(reached, ys, jnp.nan)
    # Everything the host reads, in one integer array (one transfer): the time
    # reached rides along bit for bit in an integer of its width.
    t_end = saved_ts[1][0]
    bits = jnp.dtype(f"int{8 * dtype.itemsize}")
    info = jnp.concatenate(
        [
            _counts(sol).astype(bits),
            jnp.stack(
                [
                    _all_finite(du0).astype(bits),
                    jax.lax.bitcast_convert_type(t_end, bits),
                ]
            ),
        ]
    )
    return ts, ys, info


def _forward_mode(
    cfg: _Config, y0: Any, p: Any, times: Any, ts: Any, grid: Any
) -> tuple[Any, Any]:
    """The solve as a custom VJP whose forward pass computes the Jacobian of the
    saved states by forward-mode AD through the solver (diffrax's ForwardMode, one
    batched tangent per input that is differentiated) and whose backward pass
    contracts it with the cotangent (SciMLSensitivity's ForwardDiffSensitivity
    under reverse mode). Only perturbed inputs get a tangent (JAX's symbolic
    zeros tell which)."""
    p_tree = jax.tree_util.tree_structure(p)

    def run(y0: Any, p: Any, times: Any, ts: Any, grid: Any) -> tuple[Any, Any]:
        sol, _ = _diffeqsolve(cfg, y0, p, times, ts, grid)
        return sol.ys, _counts(sol)

    @jax.custom_vjp
    def solve(y0: Any, p: Any, times: Any, ts: Any, grid: Any) -> tuple[Any, Any]:
        return run(y0, p, times, ts, grid)

    def fwd(y0: Any, p: Any, times: Any, ts: Any, grid: Any) -> Any:
        primal = lambda x: isinstance(x, CustomVJPPrimal)  # noqa: E731
        fixed = _fixed_inputs((times, ts, grid), _FORWARD_MODE_TIMES)
        # y0 is one array, then p's leaves.
        inputs = jax.tree_util.tree_leaves((y0, p), is_leaf=primal)
        values = [x.value for x in inputs]
        which = [i for i, x in enumerate(inputs) if x.perturbed]
        cuts = np.cumsum([values[i].size for i in which])[:-1]
        flat = jnp.concatenate([jnp.ravel(values[i]) for i in which])

        def g(flat: Any) -> tuple[Any, Any]:
            full = list(values)
            for i, part in zip(which, jnp.split(flat, cuts), strict=True):
                full[i] = part.reshape(values[i].shape).astype(values[i].dtype)
            return run(full[0], p_tree.unflatten(full[1:]), *fixed)

        # One tangent per input number; the primal (and with it every step-size
        # decision) is not batched, so all tangents share the steps.
        ys, tangents, counts = jax.vmap(
            lambda v: jax.jvp(g, (flat,), (v,), has_aux=True),
            out_axes=(None, 0, None),
        )(jnp.eye(flat.size, dtype=flat.dtype))
        parts: list[Any] = [None] * len(values)
        for i, jac in zip(which, jnp.split(tangents, cuts), strict=True):
            parts[i] = jac.reshape(values[i].shape + ys.shape)
        return (ys, counts), parts

    def bwd(parts: Any, cts: Any) -> Any:
        ct_ys = cts[0]
        grads = [
            None
            if jac is None or isinstance(ct_ys, SymbolicZero)
            else jnp.tensordot(jac, ct_ys.astype(jac.dtype), axes=ct_ys.ndim)
            for jac in parts
        ]
        return (grads[0], p_tree.unflatten(grads[1:]), None, None, None)

    solve.defvjp(fwd, bwd, symbolic_zeros=True)
    return solve(y0, p, times, ts, grid)


def _fixed_inputs(fixed: Any, message: str) -> Any:
    """The values of a custom VJP's inputs that get no gradient; raises
    `UnsupportedError` with `message` when one of them is perturbed."""
    primal = lambda x: isinstance(x, CustomVJPPrimal)  # noqa: E731
    if any(x.perturbed for x in jax.tree_util.tree_leaves(fixed, is_leaf=primal)):
        raise UnsupportedError(message)
    return jax.tree_util.tree_map(lambda x: x.value, fixed, is_leaf=primal)


def _interpolating_adjoint(
    cfg: _Config, y0: Any, p: Any, times: Any, ts: Any
) -> tuple[Any, Any]:
    """ContinuousAdjoint for an implicit alg: the adjoint ODE solved backward
    against the forward solution's interpolant (SciMLSensitivity's
    InterpolatingAdjoint), with the forward method, instead of diffrax's backsolve.

    A backsolve re-integrates the state backward in time, where a stiff problem's
    fast decaying modes grow: on ROBER over [0, 0.1] with Kvaerno5 it returned
    gradients wrong by a factor 1e69 without an error. The adjoint equations
    themselves are stable backward, so here the state comes from the forward
    pass's dense output (kept in memory: O(steps), not O(1)) and only
    ``(a, g)`` is integrated: ``a' = -(df/du)^T a``, ``g' = -(df/dp)^T a`` from
    each save time to the one before, the cotangent added at each, so that
    ``a(t0) = dL/du0`` and ``g(t0) = dL/dp``. The implicit solver's Newton
    Jacobian of this system is JAX's forward-over-reverse derivative.
    """
    plain = dataclasses.replace(cfg, sensealg=None)
    sensealg = cast("ContinuousAdjoint", cfg.sensealg)
    vf = _vector_field(cfg.f)

    def run(y0: Any, p: Any, times: Any, ts: Any, dense: bool) -> Any:
        sol, _ = _diffeqsolve(plain, y0, p, times, ts, None, dense=dense)
        return sol

    @jax.custom_vjp
    def solve(y0: Any, p: Any, times: Any, ts: Any) -> tuple[Any, Any]:
        sol = run(y0, p, times, ts, False)
        return sol.ys, _counts(sol)

    def fwd(y0: Any, p: Any, times: Any, ts: Any) -> Any:
        times, ts = _fixed_inputs((times, ts), _ADJOINT_TIMES)
        y0, p = jax.tree_util.tree_map(lambda x: x.value, (y0, p))
        sol = run(y0, p, times, ts, True)
        return (sol.ys, _counts(sol)), (sol, p, times, ts)

    def adjoint_rhs(t: Any, state: Any, args: Any) -> Any:
        a, _ = state
        sol, p, lo, hi = args
        # Stage times can fall a rounding error outside the forward solve, where
        # the interpolant is garbage (ROBER: every step onto t0 = 0 was rejected,
        # until max_steps).
        u = sol.evaluate(jnp.clip(t, lo, hi))
        _, pull = jax.vjp(lambda u, p: vf(t, u, p), u, p)
        du, dp = pull(a)
        return (
            jax.tree_util.tree_map(jnp.negative, du),
            jax.tree_util.tree_map(jnp.negative, dp),
        )

    def bwd(res: Any, cts: Any) -> Any:
        sol, p, times, ts = res
        t0, t1, rtol, atol, _ = times
        lo, hi = jnp.minimum(t0, t1), jnp.maximum(t0, t1)
        ct = cts[0]
        if isinstance(ct, SymbolicZero):
            ct = jnp.zeros_like(sol.ys)
        ct = ct.astype(sol.ys.dtype)
        # The times to integrate between: t0, then the save times.
        grid = jnp.concatenate([t0[None], ts])
        cts_all = jnp.concatenate([jnp.zeros_like(ct[:1]), ct])
        # Steps end on the forward steps' ends: the interpolant's higher
        # derivatives jump there, which an error estimate straddling one reads as
        # error (ROBER over [0, 1e-3]: max_steps without, the forward count with).
        controller = diffrax.ClipStepSizeController(
            cfg.method.controller(
                rtol if sensealg.rtol is None else sensealg.rtol,
                adjoint_atol(atol, ct, sol.ys)
                if sensealg.atol is None
                else sensealg.atol,
            ),
            step_ts=sol.interpolation.ts,
        )
        term = cfg.method.term(lambda a, args, t: adjoint_rhs(t, a, args))
        g0 = jax.tree_util.tree_map(jnp.zeros_like, p)

        def interval(state: Any, k: Any) -> tuple[Any, None]:
            a, g = state
            a = a + cts_all[k]
            start, end = grid[k], grid[k - 1]
            # An empty interval (t0 saved, or a repeated save time) has no steps.
            span = jnp.where(start == end, end + 0.0, start)
            out = diffrax.diffeqsolve(
                term,
                cfg.method.build(),
                span,
                end,
                None,
                (a, g),
                args=(sol, p, lo, hi),
                stepsize_controller=controller,
                max_steps=cfg.max_steps,
                throw=True,
                saveat=diffrax.SaveAt(t1=True),
            )
            a1, g1 = jax.tree_util.tree_map(lambda x: x[-1], out.ys)
            return (a1, g1), None

        m = grid.shape[0]
        (a, g), _ = jax.lax.scan(
            interval, (jnp.zeros_like(ct[0]), g0), jnp.arange(m - 1, 0, -1)
        )
        return (a + cts_all[0], g, None, None)

    solve.defvjp(fwd, bwd, symbolic_zeros=True)
    return solve(y0, p, times, ts)


_ADJOINT_TIMES = (
    "sensealg=dk.ContinuousAdjoint() with an implicit alg on backend='jax' "
    "differentiates with respect to u0 and p only, not tspan, saveat, rtol or "
    "atol. Use sensealg=dk.ReverseThroughSolver() or dk.CheckpointedAdjoint() "
    "for gradients with respect to times."
)


_FORWARD_MODE_TIMES = (
    "sensealg=dk.ForwardMode() on backend='jax' differentiates with respect to u0 "
    "and p only, not tspan, saveat, rtol or atol. Use "
    "sensealg=dk.ReverseThroughSolver() or dk.CheckpointedAdjoint() for gradients "
    "with respect to times."
)


class _Programs(LRUCache):
    """A bounded LRU cache of compiled programs, keyed by problem structure."""

    def get(self, key: Any, fn: Callable[..., Any]) -> Callable[..., Any]:  # pyright: ignore[reportIncompatibleMethodOverride]
        """``jax.jit(fn)``, compiled once per key."""
        return super().get(key, lambda: jax.jit(fn))


_PROGRAMS = _Programs(_CACHE_SIZE)


def _vjp_program(
    cfg: _Config, u0: Any, p: Any, scalars: Any, ts: Any, grid: Any
) -> tuple[Any, Any, Any]:
    """The solve with its pullback (a `jax.tree_util.Partial` holding the
    residuals, so it can leave the compiled program), for `dk.vjp`."""

    def solve(u0: Any, p: Any) -> tuple[Any, Any]:
        ts_out, ys, counts = _program(cfg, u0, p, scalars, ts, grid)
        return ys, (ts_out, counts)

    return jax.vjp(solve, u0, p, has_aux=True)


# Applies a pullback from `_vjp_program`; its function is the same object for
# every call of one compiled program, so this compiles once per structure.
_PULLBACK = jax.jit(lambda pullback, cotangent: pullback(cotangent))


# The compiled programs (with their arguments) run while `JaxBackend.peak_memory`
# watches; None when nobody does.
_WATCHED: contextvars.ContextVar[list[tuple[Any, tuple[Any, ...]]] | None] = (
    contextvars.ContextVar("diffeqkit_jax_watched", default=None)
)


def _run(program: Any, *args: Any) -> Any:
    """``program(*args)``, noted for `JaxBackend.peak_memory` when it watches."""
    watched = _WATCHED.get()
    if watched is not None:
        watched.append((program, args))
    return program(*args)


def _buffer_bytes(program: Any, args: tuple[Any, ...]) -> int | None:
    """XLA's buffer assignment of `program` at `args`: its arguments, outputs and
    temporaries, less the outputs that reuse an argument's buffer. The program is
    in jit's cache already, so lowering and compiling it again only looks it up."""
    analysis = program.lower(*args).compile().memory_analysis()
    if analysis is None:  # a platform without the analysis
        return None
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )


# ---------------------------------------------------------------------------------
# Inputs: dtype, device, conversion.
# ---------------------------------------------------------------------------------


def _x64() -> bool:
    return bool(jax.config.jax_enable_x64)  # pyright: ignore[reportAttributeAccessIssue]


def _state_dtype(req: SolveRequest) -> str:
    """The solve's dtype; float64 without JAX's x64 mode raises."""
    x64 = _x64()
    dtype = req.state_dtype(default="float64" if x64 else "float32")
    if dtype == "float64" and not x64:
        why = (
            "dtype='float64' was asked for"
            if req.dtype is not None
            else "u0 is a float64 array"
        )
        raise UnsupportedError(
            f"{why}, but JAX's 64-bit mode is off (jax_enable_x64=False), so JAX "
            "would silently compute in float32. Enable it once at the start of your "
            'program with jax.config.update("jax_enable_x64", True), or pass '
            "dtype='float32'."
        )
    return dtype


def _visible_devices() -> list[str]:
    names = []
    for platform in dict.fromkeys(d.platform for d in jax.devices()):
        kind = "cuda" if platform == "gpu" else platform
        names += [f"{kind}:{i}" for i, _ in enumerate(jax.devices(platform))]
    return names


@functools.cache
def _named_device(name: str) -> Any:
    kind, _, index = name.partition(":")
    platform = "gpu" if kind == "cuda" else kind
    try:
        devices = jax.devices(platform)
    except RuntimeError:  # no backend of that platform
        devices = []
    i = int(index or 0)
    if i >= len(devices):
        raise unavailable_device(
            name,
            "jax",
            f"JAX sees: {listing(_visible_devices())}",
            "Pass one of those, or device=None to run where the inputs live (a GPU "
            'needs the CUDA build of jax: pip install "jax[cuda12]").',
        )
    return devices[i]


def _default_device() -> Any:
    configured = jax.config.jax_default_device  # pyright: ignore[reportAttributeAccessIssue]
    if isinstance(configured, jax.Device):
        return configured
    if isinstance(configured, str):
        return jax.devices(configured)[0]
    return jax.devices()[0]


def _placement(req: SolveRequest, leaves: list[Any]) -> tuple[Any, bool]:
    """The device asked for, else that of the JAX inputs, else JAX's default; and
    whether the inputs must be put there. When it is the default device and the
    JAX inputs live there, the compiled call itself moves the host data, an order
    of magnitude faster than `jax.device_put`."""
    arrays = [x for x in (req.u0, *leaves) if isinstance(x, jax.Array)]
    if req.device is not None:
        device = _named_device(req.device)
    elif arrays:
        device = next(iter(arrays[0].devices()))
    else:
        device = _default_device()
    here = all(x.devices() == {device} for x in arrays)
    return device, not (here and device == _default_device())


def _host(x: Any, dtype: str | None) -> Any:
    """A non-JAX value as a NumPy array: floating in `dtype`, integers in JAX's
    integer width (int32 unless x64 is on)."""
    arr = np.asarray(to_numpy(x))
    if arr.dtype.kind == "f" and dtype is not None:
        return arr.astype(dtype, copy=False)
    if arr.dtype.kind in "iub":
        return arr.astype(jax.dtypes.canonicalize_dtype(arr.dtype), copy=False)
    return arr


def _convert_leaves(leaves: list[Any], dtype: str) -> list[Any]:
    """p's leaves: JAX arrays as they are (gradients flow), others to NumPy (see
    `_host`)."""
    return [x if isinstance(x, jax.Array) else _host(x, dtype) for x in leaves]


def _traced_inputs(
    req: SolveRequest, method: _Method, dtype: str
) -> tuple[Any, Any, Any, Any, Any]:
    """``(u0, p, scalars, ts, grid)`` for a program run under a transformation or
    by `dk.vjp`: JAX values as they are, others as NumPy arrays (so p's
    Python-number leaves are differentiable 0-d arrays)."""
    grid = None
    if method.fixed_step:
        if (
            req.saveat is None
            or req.dt0 is None
            or any(isinstance(x, Tracer) for x in (req.t0, req.t1, req.saveat))
        ):
            raise UnsupportedError(
                f"alg='{req.alg.name}' (fixed step) needs tspan and saveat as "
                "concrete values under a JAX transformation: its step grid "
                "(t0 + k*dt0 merged with the save times) decides the shape of "
                "the computation. Close over tspan and saveat instead of passing "
                "them as traced arguments, or use an adaptive alg such as 'tsit5'."
            )
        t0, t1, saveat = _concrete_times(req)
        grid = np.asarray(step_grid(t0, t1, req.dt0, saveat), dtype=dtype)
    u0 = req.u0 if isinstance(req.u0, jax.Array) else _host(req.u0, dtype)
    leaves, treedef = jax.tree_util.tree_flatten(req.p)
    p = treedef.unflatten(_convert_leaves(leaves, dtype))
    if req.saveat is None:  # traced tspan, default saveat: [t0, t1]
        ts = jnp.stack([jnp.asarray(req.t0, dtype), jnp.asarray(req.t1, dtype)])
    elif isinstance(req.saveat, jax.Array):
        ts = req.saveat
    else:
        ts = np.asarray(req.saveat, dtype=dtype)
    dt0 = 0.0 if req.dt0 is None else req.dt0
    scalars = (req.t0, req.t1, req.rtol, req.atol, dt0)
    return u0, p, scalars, ts, grid


def _signature(x: Any) -> tuple[tuple[int, ...], Any]:
    return tuple(x.shape), x.dtype


def _concrete_times(req: SolveRequest) -> tuple[float, float, np.ndarray]:
    """t0, t1 and the save times (already checked by the core) as host values."""
    return float(req.t0), float(req.t1), np.asarray(req.saveat, dtype=np.float64)


# ---------------------------------------------------------------------------------
# The backend.
# ---------------------------------------------------------------------------------


class JaxBackend:
    """diffeqkit on JAX, through diffrax.

    Offers euler, midpoint, heun, rk4 (fixed step), bosh3, dopri5, tsit5, dopri8
    (adaptive explicit) and the implicit kvaerno3/4/5, kencarp3/4/5 and
    implicit_euler (stiff problems). Works eagerly and under
    ``jax.jit``, ``jax.grad`` and ``jax.vmap``; see the module docstring for what
    is compiled when and what a `Solution` says under a transformation.
    """

    name = "jax"

    def solve(self, req: SolveRequest) -> Solution:
        """Solve `req`; ``t`` and ``u`` of the `Solution` are JAX arrays.

        Raises
        ------
        UnsupportedError
            float64 without JAX's x64 mode; a device JAX does not see;
            ``throw=False`` or a fixed-step alg with traced times under a JAX
            transformation.
        InvalidProblemError
            ``f(u0, p, t0)`` has the wrong shape or dtype, or is not finite.
        SolveError
            The integration failed and ``req.throw`` is True.
        """
        dtype = _state_dtype(req)
        method = _ALGS[req.alg.name]
        leaves, treedef = jax.tree_util.tree_flatten(req.p)
        values = (req.u0, *leaves, req.t0, req.t1, req.saveat, req.rtol, req.atol)
        if any(isinstance(x, Tracer) for x in values):
            return self._solve_traced(req, method, dtype)

        # Per-call work is kept to NumPy conversions, a dictionary lookup, one
        # compiled call and one transfer back (the eager path is benchmarked).
        device, put = _placement(req, leaves)
        u0 = req.u0 if isinstance(req.u0, jax.Array) else _host(req.u0, dtype)
        leaves = _convert_leaves(leaves, dtype)
        t0, t1, saveat = _concrete_times(req)
        grid = (
            np.asarray(step_grid(t0, t1, req.dt0, saveat), dtype=dtype)
            if method.fixed_step and req.dt0 is not None
            else None
        )
        ts = saveat.astype(dtype, copy=False)
        dt0 = 0.0 if req.dt0 is None else req.dt0
        scalars = np.array([t0, t1, req.rtol, req.atol, dt0], dtype=dtype)
        args = (u0, treedef.unflatten(leaves), scalars, ts, grid)
        program = self._program(req, method, dtype, u0, args[1], ts, grid, device)
        t, u, info = _run(program, *(jax.device_put(args, device) if put else args))
        info = np.asarray(info)
        code, naccept, nreject, rhs_finite = (int(v) for v in info[:4])
        if not rhs_finite:
            raise rhs_nonfinite_error(req.t0)
        return conclude(
            req,
            t=t,
            u=u,
            stats={
                "nfev": _nfev(method, naccept, nreject),
                "naccept": naccept,
                "nreject": nreject,
            },
            status=_STATUSES[code],
            t_reached=float(info[4:].view(dtype)[0]),
        )

    def _solve_traced(self, req: SolveRequest, method: _Method, dtype: str) -> Solution:
        """`solve` under a JAX transformation: the program inlines into the trace."""
        if not req.throw:
            raise UnsupportedError(
                "throw=False is not supported under a JAX transformation (jax.jit, "
                "jax.grad, jax.vmap, ...): the status of the solve is a traced value "
                "and cannot be read while tracing. Call dk.solve outside the "
                "transformation to get the status and partial solution, or keep "
                "throw=True: a failed solve then raises when the compiled program runs."
            )
        u0, p, scalars, ts, grid = _traced_inputs(req, method, dtype)
        program = self._program(req, method, dtype, u0, p, ts, grid, None, "traced")
        t, u, _ = program(u0, p, scalars, ts, grid)
        # Only a successful solve returns at all (diffrax raises at run time).
        stats = {"nfev": None, "naccept": None, "nreject": None}
        return conclude(req, t=t, u=u, stats=stats, status="success")

    def vjp(self, req: SolveRequest) -> tuple[Solution, Pullback]:
        """Solve, and return the pullback by ``req.sensealg`` (`dk.vjp`).

        One compiled program (cached like `solve`'s) runs the solve and keeps what
        the reverse pass needs; a second one, compiled once per structure, runs
        the pullback. Gradients are JAX arrays: ``du0`` of u0's shape, ``dp``
        with p's structure.
        """
        dtype = _state_dtype(req)
        method = _ALGS[req.alg.name]
        leaves = jax.tree_util.tree_leaves(req.p)
        values = (req.u0, *leaves, req.t0, req.t1, req.saveat, req.rtol, req.atol)
        if any(isinstance(x, Tracer) for x in values):
            raise UnsupportedError(
                "dk.vjp cannot run under a JAX transformation; inside jax.jit, "
                "jax.grad or jax.vmap call dk.solve and differentiate it with "
                "jax.grad or jax.vjp instead (the sensealg does the work there too)."
            )
        device, _ = _placement(req, leaves)
        u0, p, scalars, ts, grid = _traced_inputs(req, method, dtype)
        program = self._program(req, method, dtype, u0, p, ts, grid, device, "vjp")
        u0, p, scalars, ts, grid = jax.device_put((u0, p, scalars, ts, grid), device)
        u, pullback, (t, counts) = _run(program, u0, p, scalars, ts, grid)
        code, naccept, nreject = (int(v) for v in np.asarray(counts))
        sol = conclude(
            req,
            t=t,
            u=u,
            stats={
                "nfev": _nfev(method, naccept, nreject),
                "naccept": naccept,
                "nreject": nreject,
            },
            status=_STATUSES[code],
        )

        def pull(cotangent: Any) -> tuple[Any, Any]:
            ct = jax.device_put(jnp.asarray(cotangent, dtype=u.dtype), device)
            try:
                return jax.block_until_ready(_run(_PULLBACK, pullback, ct))
            except jax.errors.JaxRuntimeError as err:
                raise SolveError(backward_failed(req.sensealg, str(err))) from err

        return sol, pull

    def loss_grad(
        self, loss: Callable[[Solution], Any], sol: Solution, req: SolveRequest
    ) -> tuple[Any, Any]:
        """``loss(sol)`` and its gradient with respect to ``sol.u``, by JAX."""
        del req
        return jax.value_and_grad(lambda u: loss(dataclasses.replace(sol, u=u)))(sol.u)

    @staticmethod
    def _program(
        req: SolveRequest,
        method: _Method,
        dtype: str,
        u0: Any,
        p: Any,
        ts: Any,
        grid: Any,
        device: Any,
        mode: str = "eager",
    ) -> Callable[..., Any]:
        """The cached compiled program for this problem structure."""
        leaves, treedef = jax.tree_util.tree_flatten(p)
        # An eager solve is not differentiated: one program serves every sensealg.
        sensealg = None if mode == "eager" else req.sensealg
        adaptive_dt0 = not method.fixed_step and req.dt0 is not None
        # The core asks for landing where the shared tableau's dense output is weak;
        # diffrax's interpolants are not the shared ones, so their own orders count.
        land = not method.fixed_step and (method.lands_on_saves or req.land_on_saves)
        key = (
            req.f,
            req.jac,
            req.alg.name,
            _signature(u0),
            treedef,
            tuple(_signature(x) for x in leaves),
            len(ts),
            None if grid is None else len(grid),
            req.max_steps,
            adaptive_dt0,
            land,
            device,
            mode,
            sensealg,
            dtype,
        )
        cfg = _Config(
            req.f, method, dtype, req.max_steps, adaptive_dt0, land, mode, sensealg
        )
        run = _vjp_program if mode == "vjp" else _program
        return _PROGRAMS.get(key, functools.partial(run, cfg))

    def describe(self) -> dict[str, Any]:
        """Visible devices, JAX's default platform and whether x64 is on."""
        return {
            "devices": _visible_devices(),
            "default_backend": jax.default_backend(),
            "x64": _x64(),
        }

    def synchronize(self, tree: Any) -> None:
        """Wait for JAX's asynchronous dispatch to finish computing `tree`."""
        jax.block_until_ready(tree)

    def peak_memory(
        self, fn: Callable[[], Any], like: Any
    ) -> tuple[float | None, str | None]:
        """XLA's buffer assignment of the largest compiled program the call ran:
        that program's arguments, outputs and temporaries (``memory_analysis()`` of
        the compiled program), on any device.

        XLA plans every buffer of a program before it runs, so this is that
        program's footprint exactly, not a sample. Arrays held outside the
        programs (the inputs before conversion, results kept after) are not in
        it. It is used because nothing else is honest: XLA's CPU allocator offers
        no peak at all, and a GPU's ``peak_bytes_in_use`` cannot be reset, so it
        covers the whole process's life. For `dk.vjp` the programs are the solve,
        whose outputs include the residuals the pullback keeps (for
        ``ReverseThroughSolver``, diffrax's buffer of ``max_steps`` checkpoints),
        and the pullback. None when the call ran no compiled program of this
        backend (a solve under a JAX transformation runs inside the caller's).
        """
        del like
        watched: list[tuple[Any, tuple[Any, ...]]] = []
        token = _WATCHED.set(watched)
        try:
            self.synchronize(fn())
        finally:
            _WATCHED.reset(token)
        sizes = [_buffer_bytes(program, args) for program, args in watched]
        known = [size for size in sizes if size is not None]
        if not known:
            return None, None
        return max(known) / 2**20, "xla buffer assignment"


BACKEND = JaxBackend()
