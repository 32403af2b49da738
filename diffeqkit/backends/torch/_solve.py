"""The solvers: diffeqkit's tableaux on torchdiffeq's machinery, and the plain solve.

Requirements met here:

- The adaptive algs subclass torchdiffeq's `RKAdaptiveStepsizeODESolver` and the
  fixed-step ones its `FixedGridODESolver`, registered in torchdiffeq's ``SOLVERS``
  as ``"diffeqkit_<alg>"`` (see the package docstring).
- No gradient flows through the step-size controller: torchdiffeq's controller
  (``_optimal_step_size``) already runs under ``no_grad``, but its initial step
  selection (``_select_initial_step``, used when ``dt0`` is None) is an
  ordinary differentiable function of ``y0`` and ``f(t0, y0)``, and every later
  time ``t0 + dt`` inherits its gradient. `_AdaptiveRK` detaches that first step,
  so every time (and step size) is a constant and a gradient through the steps is
  that of the discrete solution with the steps held fixed.
- One step of each method is also a pure function (`_rk_step`, `_fixed_step`):
  the fixed-step solver steps with it; the adaptive step repeats torchdiffeq's
  ``_runge_kutta_step`` op for op, without its in-place stage buffer (which
  ``torch.func`` transforms refuse), so a replay of recorded steps reproduces
  the forward states bit for bit (a test checks it) and runs under
  ``torch.func.vmap``/``jvp``.
- A run can be watched by a recorder: it sees every accepted step's start time,
  start state and size (torchdiffeq's ``callback_accept_step`` for adaptive algs,
  ``callback_step`` for fixed-step ones), which is all `_replay` needs; an
  adaptive run also hands a recorder with an ``accepted`` method the solver
  state after each accepted step (that step's dense output), which is what
  `_interpolating` keeps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, cast

import numpy as np
import torch
from torchdiffeq._impl.interp import _interp_evaluate
from torchdiffeq._impl.misc import _null_callback, _rms_norm
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver, _ButcherTableau
from torchdiffeq._impl.solvers import FixedGridODESolver

from ..._algs import ALGS
from ..._arrays import dtype_name, to_numpy
from ..._errors import invalid, listing, unavailable_device
from ..._problem import check_rhs_output
from ..._pytree import leaves, tree_map
from ..._saveat import step_grid
from ..._solution import Solution
from ..._tableaux import get_tableau
from .._protocol import SolveRequest, conclude

_DTYPES: Mapping[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
}
# torchdiffeq's own default for max_num_steps: effectively no limit.
_NO_LIMIT = 2**31 - 1


class _StoppedError(RuntimeError):
    """The integration cannot go on; `status` is a diffeqkit status name."""

    def __init__(self, status: str, alg: str, t: float) -> None:
        super().__init__(f"diffeqkit_{alg}: integration stopped at t={t:.6g}: {status}")
        self.status = status
        self.t = t


class _Recorder(Protocol):
    """What a run reports each accepted step to (see `_replay.Recorder`). It may
    also have ``accepted(state)``, called by adaptive algs after each accepted
    step with torchdiffeq's ``_RungeKuttaState``."""

    def step(self, t0: torch.Tensor, y0: torch.Tensor, dt: torch.Tensor) -> None: ...


# ---------------------------------------------------------------------------------
# Tableaux as torch tensors, cached per (alg, dtype, device).
# ---------------------------------------------------------------------------------


@functools.cache
def _adaptive_tableau(
    alg: str, dtype: torch.dtype, device: torch.device
) -> tuple[_ButcherTableau, torch.Tensor]:
    """torchdiffeq's tableau and the dense-output matrix ``p`` of an adaptive alg.

    torchdiffeq's stages are ours with the row ``K[s] = f(t + h, y1)`` appended as
    a last stage at ``c = 1`` with weights ``b``; it recognises that row (``c_sol``
    = ``b`` padded with 0) and reuses it as the next step's first stage, so its
    ``k`` is exactly SciPy's ``K`` (``s + 1`` rows) and ``e`` applies unchanged.
    """
    tab = get_tableau(_tableau_name(alg))
    if tab.e is None:
        raise ValueError(f"{alg}: an adaptive method needs error coefficients e")

    def tensor(x: Any) -> torch.Tensor:
        return _tensor(x, dtype, device)

    s = tab.n_stages
    rows = [tab.a[i, :i] for i in range(1, s)]
    tableau = _ButcherTableau(
        alpha=tensor([*tab.c[1:], 1.0]),
        beta=[tensor(row) for row in [*rows, tab.b]],
        c_sol=tensor([*tab.b, 0.0]),
        c_error=tensor(tab.e),
    )
    return tableau, tensor(tab.p)


# Nonzero weights of a linear combination of stages, as (stage index, weight as a
# float, weight as used in arithmetic): a float, or a constant lifted by `Lift`.
_Combination = tuple[tuple[int, float, Any], ...]
# A fixed-step tableau: the stages (c_i as a float, c_i as used, a[i, :i]) and b.
_FixedTableau = tuple[tuple[tuple[float, Any, _Combination], ...], _Combination]
# Turns a constant tensor into one of the same value that takes part in the
# computation the way its inputs do (see `_forward`); the identity elsewhere.
Lift = Callable[[torch.Tensor], torch.Tensor]


def no_lift(x: torch.Tensor) -> torch.Tensor:
    return x


@functools.cache
def _fixed_tableau(alg: str) -> _FixedTableau:
    """The stages ``(c_i, a[i, :i])`` and weights ``b`` of a fixed-step alg, with
    the zero coefficients dropped, as Python floats (cheapest to apply per step)."""
    tab = get_tableau(_tableau_name(alg))
    stages = tuple(
        (float(tab.c[i]), float(tab.c[i]), _nonzero(tab.a[i, :i]))
        for i in range(1, tab.n_stages)
    )
    return stages, _nonzero(tab.b)


def _lifted_fixed_tableau(alg: str, device: torch.device, lift: Lift) -> _FixedTableau:
    """`_fixed_tableau` with its coefficients as lifted float64 0-d tensors."""
    stages, weights = _fixed_tableau(alg)

    def value(x: float) -> torch.Tensor:
        return lift(torch.tensor(x, dtype=torch.float64, device=device))

    def combination(ws: _Combination) -> _Combination:
        return tuple((j, w, value(w)) for j, w, _ in ws)

    return (
        tuple((c, value(c), combination(ws)) for c, _, ws in stages),
        combination(weights),
    )


def _nonzero(weights: np.ndarray) -> _Combination:
    return tuple((j, float(w), float(w)) for j, w in enumerate(weights) if w != 0.0)


def _combine(weights: _Combination, ks: list[torch.Tensor]) -> torch.Tensor:
    """``sum_j w_j * ks[j]`` over the nonzero weights."""
    terms = [ks[j] if w == 1.0 else value * ks[j] for j, w, value in weights]
    return functools.reduce(torch.add, terms)


def _tableau_name(alg: str) -> str:
    name = ALGS[alg].tableau
    if name is None:
        raise ValueError(f"{alg} is not built from a shared tableau")
    return name


# ---------------------------------------------------------------------------------
# One step of each kind, as pure functions.
# ---------------------------------------------------------------------------------

# A step: (func, y0, f0 or None, t0, dt, t1) -> (y1, f1 or None, read), where
# read(t) is the saved value at a time t in (t0, t1] read off that step.
Stepper = Callable[..., tuple[torch.Tensor, Any, Callable[[torch.Tensor], Any]]]


def fsal_stepper(advance: Callable[..., tuple[Any, Any, list[Any]]]) -> Stepper:
    """The `Stepper` of an adaptive method whose step is ``advance(func, y0, f0,
    t0, dt, t1) -> (y1, f(t1, y1), dense coefficients)``: it evaluates ``f0``
    where the replay has none, and interpolates with torchdiffeq's evaluator."""

    def step(
        func: Any,
        y0: torch.Tensor,
        f0: torch.Tensor | None,
        t0: torch.Tensor,
        dt: torch.Tensor,
        t1: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], Any]]:
        first: torch.Tensor = func(t0, y0) if f0 is None else f0
        y1, f1, coeffs = advance(func, y0, first, t0, dt, t1)
        return y1, f1, lambda t: _interp_evaluate(coeffs, t0, t1, t)

    return step


def _rk_step(
    func: Any,
    y0: torch.Tensor,
    f0: torch.Tensor,
    t0: torch.Tensor,
    dt: torch.Tensor,
    t1: torch.Tensor,
    tableau: _ButcherTableau,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchdiffeq's ``_runge_kutta_step`` (for an FSAL tableau) without the error
    estimate, with the same operations in the same order, so the same bits; its
    stages are stacked afresh instead of written into a buffer in place."""
    t_dtype = y0.abs().dtype
    t0, dt, t1 = t0.to(t_dtype), dt.to(t_dtype), t1.to(t_dtype)
    ks = [f0]
    yi = y0
    for alpha_i, beta_i in zip(tableau.alpha, tableau.beta, strict=True):
        ti = t1 if alpha_i == 1.0 else t0 + alpha_i * dt
        stacked = torch.stack(ks, dim=-1)
        yi = y0 + torch.sum(stacked * (beta_i * dt), dim=-1).view_as(f0)
        ks.append(func(ti, yi))
    # FSAL: the last stage is evaluated at (t1, y1), so y1 is its input.
    return yi, ks[-1], torch.stack(ks, dim=-1)


def _dense_coefficients(
    y0: torch.Tensor, k: torch.Tensor, p: torch.Tensor, dt: torch.Tensor
) -> list[torch.Tensor]:
    """Coefficients of ``y(t0 + x h) = y0 + sum_j c_j x^j`` from the tableau's
    dense output ``p``, in the form torchdiffeq's `_interp_evaluate` reads."""
    # k: (*shape, s + 1), the stages K; p: (s + 1, q).
    coeffs = torch.matmul(k, p) * dt.type_as(y0)
    return [y0, *coeffs.unbind(-1)]


def _fixed_step(
    tableau: _FixedTableau,
    func: Any,
    t0: torch.Tensor,
    dt: torch.Tensor,
    t1: torch.Tensor,
    y0: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of a fixed-step alg: ``(y1 - y0, f(t0, y0))``."""
    stages, weights = tableau
    h = dt.to(y0.dtype)
    ks = [func(t0, y0)]
    for c, c_value, combination in stages:
        # A stage at c = 1 evaluates at the grid point itself, not t0 + dt.
        ti = t1 if c == 1.0 else t0 + c_value * dt
        ks.append(func(ti, y0 + h * _combine(combination, ks)))
    return h * _combine(weights, ks), ks[0]


# ---------------------------------------------------------------------------------
# The vector field as torchdiffeq calls it.
# ---------------------------------------------------------------------------------


class _Rhs:
    """torchdiffeq's ``func(t, y)`` over the user's ``f(u, p, t)``, counting calls.

    ``first``, when given, is ``f`` already evaluated at ``(t0, u0)``: both
    torchdiffeq solvers evaluate there first, so the first call returns it instead
    of evaluating ``f`` again (and counts it: the solver uses that evaluation).
    ``perturb`` (torchdiffeq's nudge of ``t`` by one ulp around jumps) is ignored:
    diffeqkit has no jump times, and ``f`` sees the exact stage times, as on the
    other backends.
    """

    def __init__(
        self,
        f: Callable[..., Any],
        p: Any,
        dtype: torch.dtype,
        first: Any = None,
        jac: Callable[..., Any] | None = None,
    ) -> None:
        self.f = f
        self.p = p
        self.dtype = dtype
        self.nfev = 0
        self._first = first
        # The user's df/du (``prob.jac``, in solver time), for implicit algs.
        self.jac = jac
        # torchdiffeq calls these hooks; its own no-op object, so that odeint's
        # _check_inputs also sees "no callback" when handed this object.
        self.callback_step: Callable[..., Any] = _null_callback
        self.callback_accept_step: Callable[..., Any] = _null_callback
        self.callback_reject_step: Callable[..., Any] = _null_callback

    def __call__(self, t: torch.Tensor, y: torch.Tensor, perturb: Any = None) -> Any:
        self.nfev += 1
        first = self._first
        if first is not None:
            self._first = None
            return first
        return self.f(y, self.p, t.to(self.dtype))

    def raw(self, t: torch.Tensor, y: torch.Tensor) -> Any:
        """``f`` itself, uncounted: what implicit algs differentiate for their
        Jacobian (its evaluations are counted as ``njev``, not ``nfev``)."""
        return self.f(y, self.p, t.to(self.dtype))

    def jacobian(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``prob.jac`` at ``(t, y)`` as an ``(n, n)`` matrix, ``n = y.numel()``."""
        if self.jac is None:
            raise RuntimeError("no jac was given")  # pragma: no cover
        jac = self.jac(y, self.p, t.to(self.dtype))
        n = y.numel()
        if not isinstance(jac, torch.Tensor) or jac.numel() != n * n:
            raise invalid(
                "jac",
                f"must return df/du of shape u.shape + u.shape ({n * n} numbers "
                "in all)",
                jac,
                "Return a tensor of shape (*u.shape, *u.shape), or leave jac=None "
                "to differentiate f.",
            )
        return jac.reshape(n, n).to(y.dtype)


def _reversed(f: Callable[..., Any]) -> Callable[..., Any]:
    """``f`` in negated time ``s = -t`` (``du/ds = -f(u, p, -s)``), as odeint does."""

    def f_reversed(u: Any, p: Any, s: Any) -> Any:
        return -f(u, p, -s)

    return f_reversed


# ---------------------------------------------------------------------------------
# The solver classes.
# ---------------------------------------------------------------------------------


class Run(NamedTuple):
    """A driven solve: the state at the integration times (NaN where not reached)
    and its outcome."""

    u: torch.Tensor
    status: str
    t_reached: float | None  # solver time where it stopped; None on success
    naccept: int
    nreject: int
    nfev: int
    reached: int  # rows of `u` reached (the rest are NaN)
    t_end: float  # solver time at the end of the last accepted step
    njev: int | None = None  # Jacobian evaluations (implicit algs)
    nlu: int | None = None  # LU factorisations (implicit algs)


class _AdaptiveRK(RKAdaptiveStepsizeODESolver):
    """An adaptive explicit Runge-Kutta method of the shared tableaux.

    torchdiffeq's stepper and step-size controller with four changes: the
    tableau comes from `diffeqkit._tableaux`; the interpolant is the tableau's
    dense output; the automatic first step carries no gradient (see the module
    docstring); steps are counted (``nsteps``, ``naccept``), and more than
    ``max_steps`` steps, an underflowing step size or a non-finite state raise
    `_StoppedError` (torchdiffeq asserts on the latter two, or loops forever under
    ``python -O``), or the error ``stop(status, t, nsteps)`` returns. ``sink``, a
    list, receives the solver object, so a caller of ``odeint`` can read its step
    counts afterwards.
    """

    alg: str

    def __init__(
        self,
        func: Any,
        y0: torch.Tensor,
        rtol: Any,
        atol: Any,
        *,
        max_steps: int = _NO_LIMIT,
        sink: list[Any] | None = None,
        stop: Callable[[str, float, int], Exception] | None = None,
        **options: Any,
    ) -> None:
        # Set before torchdiffeq's __init__, whose .to(dtype, device) of the tableau
        # and of `mid` then returns these very tensors. `mid` is its midpoint
        # weights; here it carries the dense-output matrix p instead.
        self.tableau, self.mid = self._tables(y0.dtype, y0.device)
        options.setdefault("norm", _rms_norm)
        super().__init__(func, y0, rtol, atol, **options)
        self.max_steps = max_steps
        self.nsteps = 0
        self.naccept = 0
        self.stop = stop
        # Called with the solver state after each accepted step, whose ``t0``,
        # ``t1`` and ``interp_coeff`` are that step's dense output (a recorder's
        # ``accepted``; `_interpolating` keeps them).
        self.on_accept: Callable[[Any], None] | None = None
        if sink is not None:
            sink.append(self)

    @classmethod
    def _tables(
        cls, dtype: torch.dtype, device: torch.device
    ) -> tuple[_ButcherTableau, torch.Tensor]:
        """torchdiffeq's tableau and what it keeps as ``mid`` (see `__init__`)."""
        return _adaptive_tableau(cls.alg, dtype, device)

    def _before_integrate(self, t: torch.Tensor) -> None:
        super()._before_integrate(t)
        # The automatic first step is a differentiable function of y0 and f0:
        # hold it fixed, as every later step size is (torchdiffeq computes those
        # under no_grad).
        self.rk_state = self.rk_state._replace(dt=self.rk_state.dt.detach())

    def _adaptive_step(self, rk_state: Any) -> Any:
        t, dt = rk_state.t1, rk_state.dt
        if self.nsteps >= self.max_steps:
            raise self._stopped("max_steps_reached", t)
        # False for a NaN, zero or underflowing step alike; only then do we look
        # closer. torchdiffeq's own check is an assert (gone under python -O).
        if not bool(t + dt > t):
            raise self._stopped(self._failure(rk_state), t)
        self.nsteps += 1
        try:
            new = self._attempt(rk_state)
        except AssertionError as err:  # torchdiffeq's checks of y and dt
            raise self._stopped(self._failure(rk_state), t) from err
        # A rejected step hands back the very same end time tensor.
        if new.t1 is not t:
            self.naccept += 1
            if self.on_accept is not None:
                self.on_accept(new)
        return new

    def _attempt(self, rk_state: Any) -> Any:
        """One step attempt: torchdiffeq's, for an explicit tableau."""
        return super()._adaptive_step(rk_state)

    def _stopped(self, status: str, t: torch.Tensor) -> Exception:
        """`_StoppedError`, or what ``stop(status, t, nsteps)`` makes of it (a
        solve run by torchdiffeq inside a backward pass, which cannot be caught
        and turned into a partial solution)."""
        if self.stop is not None:
            return self.stop(status, float(t.detach()), self.nsteps)
        return _StoppedError(status, self.alg, float(t.detach()))

    @staticmethod
    def _failure(rk_state: Any) -> str:
        finite = bool(torch.isfinite(rk_state.dt)) and bool(
            torch.isfinite(rk_state.y1).all()
        )
        return "step_size_too_small" if finite else "nonfinite"

    def _interp_fit(
        self, y0: torch.Tensor, y1: torch.Tensor, k: torch.Tensor, dt: torch.Tensor
    ) -> list[torch.Tensor]:
        """The tableau's dense output (see `_dense_coefficients`)."""
        return _dense_coefficients(y0, k, self.mid, dt)

    @classmethod
    def run(
        cls,
        rhs: _Rhs,
        y0: torch.Tensor,
        times: torch.Tensor,
        req: SolveRequest,
        recorder: _Recorder | None = None,
    ) -> Run:
        """Integrate through `times` (``times[0]`` is t0, ``times[-1]`` t1),
        stopping cleanly; `recorder` sees every accepted step."""
        if recorder is not None:
            rhs.callback_accept_step = recorder.step
        solver = cls(
            rhs,
            y0,
            req.rtol,
            req.atol,
            first_step=req.dt0,
            max_steps=req.max_steps,
            # The last step lands on t1 instead of overshooting it and
            # interpolating back: f is never evaluated beyond t1 (where it may be
            # undefined) and u(t1) is a step value, as on the other backends.
            # Where the dense output is weaker than the steps (dopri8), every
            # save time is a step end.
            step_t=times[1:] if req.land_on_saves else times[-1:],
        )
        if recorder is not None:
            solver.on_accept = getattr(recorder, "accepted", None)
        solver._before_integrate(times)
        rows = [y0]
        status, reached = "success", None
        try:
            for t in times[1:]:
                rows.append(solver._advance(t))
        except _StoppedError as stop:
            status, reached = stop.status, stop.t
        nrows = len(rows)
        if nrows < times.shape[0]:
            nan = torch.full_like(y0, math.nan)
            rows.extend([nan] * (times.shape[0] - nrows))
        return Run(
            torch.stack(rows),
            status,
            reached,
            solver.naccept,
            solver.nsteps - solver.naccept,
            rhs.nfev,
            nrows,
            float(solver.rk_state.t1),
            getattr(solver, "njev", None),
            getattr(solver, "nlu", None),
        )

    @classmethod
    def stepper(
        cls, dtype: torch.dtype, device: torch.device, lift: Lift = no_lift
    ) -> Stepper:
        """One step as a pure function (see `Stepper`), for replays; its
        constants go through `lift`."""
        tableau, p = _adaptive_tableau(cls.alg, dtype, device)
        tableau = tableau._replace(
            alpha=lift(tableau.alpha), beta=[lift(b) for b in tableau.beta]
        )
        p = lift(p)

        def advance(
            func: Any, y0: torch.Tensor, f0: torch.Tensor, t0: Any, dt: Any, t1: Any
        ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
            y1, f1, k = _rk_step(func, y0, f0, t0, dt, t1, tableau)
            return y1, f1, _dense_coefficients(y0, k, p, dt)

        return fsal_stepper(advance)


class _FixedRK(FixedGridODESolver):
    """A fixed-step explicit Runge-Kutta method of the shared tableaux.

    torchdiffeq's grid stepper; the grid is `diffeqkit._saveat.step_grid` (``t0 +
    k*dt0`` merged with the save times), also when run by ``odeint`` with
    ``options={"step_size": dt0}``, so every save time is a step end. ``sink`` as
    for `_AdaptiveRK`; ``max_steps`` is accepted and unused (the core checks the
    grid against it).
    """

    alg: str

    def __init__(
        self,
        func: Any,
        y0: torch.Tensor,
        *,
        max_steps: int = _NO_LIMIT,
        sink: list[Any] | None = None,
        **options: Any,
    ) -> None:
        del max_steps
        super().__init__(func, y0, **options)
        self.nsteps = 0
        if sink is not None:
            sink.append(self)

    @property
    def naccept(self) -> int:
        return self.nsteps

    @staticmethod
    def _grid_constructor_from_step_size(step_size: Any) -> Callable[..., Any]:
        return functools.partial(_step_grid, float(step_size))

    def _step_func(  # pyright: ignore[reportIncompatibleMethodOverride]
        self,
        func: Any,
        t0: torch.Tensor,
        dt: torch.Tensor,
        t1: torch.Tensor,
        y0: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.nsteps += 1
        return _fixed_step(_fixed_tableau(self.alg), func, t0, dt, t1, y0)

    @classmethod
    def run(
        cls,
        rhs: _Rhs,
        y0: torch.Tensor,
        times: torch.Tensor,
        req: SolveRequest,
        recorder: _Recorder | None = None,
    ) -> Run:
        """Integrate through `times`; rows from the first non-finite one on are NaN;
        `recorder` sees every step."""
        if recorder is not None:
            rhs.callback_step = recorder.step
        solver = cls(rhs, y0, step_size=req.dt0, rtol=req.rtol, atol=req.atol)
        u = solver.integrate(times)
        nrows = u.shape[0]
        finite = torch.isfinite(u.reshape(nrows, -1)).all(dim=1)
        t_end = float(times[-1])
        if bool(finite.all()):
            return Run(u, "success", None, solver.nsteps, 0, rhs.nfev, nrows, t_end)
        # The state blew up between the last finite row and the first bad one.
        bad = int(torch.nonzero(~finite)[0, 0])
        keep = (torch.arange(nrows, device=u.device) < bad).reshape(
            -1, *([1] * y0.dim())
        )
        u = torch.where(keep, u, torch.full_like(u, math.nan))
        t_bad = float(times[bad - 1])
        return Run(u, "nonfinite", t_bad, solver.nsteps, 0, rhs.nfev, bad, t_end)

    @classmethod
    def stepper(
        cls, dtype: torch.dtype, device: torch.device, lift: Lift = no_lift
    ) -> Stepper:
        """One step as a pure function (see `Stepper`), for replays; its
        constants go through `lift`. Saved values are step values: every save
        time is a grid point."""
        del dtype
        tableau = (
            _fixed_tableau(cls.alg)
            if lift is no_lift
            else _lifted_fixed_tableau(cls.alg, device, lift)
        )

        def step(
            func: Any,
            y0: torch.Tensor,
            f0: Any,
            t0: torch.Tensor,
            dt: torch.Tensor,
            t1: torch.Tensor,
        ) -> tuple[torch.Tensor, None, Callable[[torch.Tensor], Any]]:
            del f0  # not FSAL: every step evaluates f at its start
            dy, _ = _fixed_step(tableau, func, t0, dt, t1, y0)
            y1 = y0 + dy
            return y1, None, lambda t: y1

        return step


def _step_grid(dt0: float, func: Any, y0: torch.Tensor, t: torch.Tensor) -> Any:
    """torchdiffeq grid constructor: `step_grid` over the times asked for."""
    ts = t.detach().cpu().numpy().astype(np.float64)
    grid = step_grid(float(ts[0]), float(ts[-1]), dt0, ts)
    return torch.as_tensor(grid, dtype=t.dtype, device=t.device)


Solver = type[_AdaptiveRK] | type[_FixedRK]


def _solver_class(alg: str) -> Solver:
    base = _FixedRK if ALGS[alg].fixed_step else _AdaptiveRK
    # torchdiffeq's step-size exponent is 1/order; the standard one is
    # 1/(error_order + 1), which is what this sets (equal to `order` here).
    tab = get_tableau(_tableau_name(alg))
    order = tab.order if tab.error_order is None else tab.error_order + 1
    name = f"Diffeqkit{alg.capitalize()}Solver"
    namespace = {"alg": alg, "order": order, "__module__": __name__}
    return cast("Solver", type(name, (base,), namespace))


# The Rosenbrock methods build on `_AdaptiveRK`, defined above.
from ._implicit import IMPLICIT_SOLVERS  # noqa: E402

# The algs this backend offers (declared in the registry's SPECS["torch"]).
ALG_SOLVERS: Mapping[str, Solver] = {
    **{
        alg: _solver_class(alg)
        for alg in (
            "euler",
            "midpoint",
            "heun",
            "rk4",
            "bosh3",
            "dopri5",
            "tsit5",
            "dopri8",
        )
    },
    **IMPLICIT_SOLVERS,
}

# New keys only, namespaced: torchdiffeq's own methods are untouched.
for _alg, _cls in ALG_SOLVERS.items():
    SOLVERS[f"diffeqkit_{_alg}"] = _cls


# ---------------------------------------------------------------------------------
# Inputs: dtype, device, conversion.
# ---------------------------------------------------------------------------------


def visible_devices() -> list[str]:
    return ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]


def solve_device(req: SolveRequest) -> torch.device:
    """The device asked for, else where the inputs live, else torch's default."""
    if req.device is None:
        for x in [req.u0, *leaves(req.p)]:
            if isinstance(x, torch.Tensor):
                return x.device
        return torch.get_default_device()
    kind, _, index = req.device.partition(":")
    if kind == "cuda" and (
        not torch.cuda.is_available() or int(index or 0) >= torch.cuda.device_count()
    ):
        raise unavailable_device(
            req.device,
            "torch",
            f"torch sees: {listing(visible_devices())}",
            "Pass one of those, or device=None to run where the inputs live.",
        )
    return torch.device(req.device)


def state_dtype(req: SolveRequest) -> torch.dtype:
    """The dtype of the solve: lists get torch's default float."""
    return _DTYPES[req.state_dtype(default=dtype_name(torch.get_default_dtype()))]


def to_state(u0: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(u0, torch.Tensor):
        return u0.to(device=device, dtype=dtype)  # keeps u0's autograd graph
    return _tensor(to_numpy(u0), dtype, device)


def to_param(x: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Tensors as they are (moved to the device); floats to the state dtype;
    integers stay integer."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device)
    arr = np.asarray(to_numpy(x))
    return _tensor(arr, dtype if arr.dtype.kind == "f" else None, device)


def _tensor(x: Any, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """A NumPy array(-like) as a new tensor: copied, as it may be read-only or have
    negative strides, which torch cannot wrap."""
    return torch.as_tensor(np.array(x), dtype=dtype, device=device)


def _integration_times(req: SolveRequest) -> tuple[np.ndarray, int]:
    """``[t0, *saveat, t1]`` without repeats, and where the save rows start.

    The solve always runs to ``t1`` (as on the other backends), whatever the save
    times, so that success means the same everywhere.
    """
    ts = np.asarray(req.saveat, dtype=np.float64)
    head = [] if ts[0] == req.t0 else [req.t0]
    tail = [] if ts[-1] == req.t1 else [req.t1]
    return np.concatenate([head, ts, tail]), len(head)


def replace_leaves(tree: Any, new: list[Any]) -> Any:
    """`tree` with its leaves (as `leaves` lists them) replaced by `new`."""
    it = iter(new)
    return tree_map(lambda _: next(it), tree)


def requires_grad(req: SolveRequest) -> bool:
    """Whether autograd is recording and u0 or a tensor of p requires grad."""
    if not torch.is_grad_enabled():
        return False
    return any(
        isinstance(x, torch.Tensor) and x.requires_grad
        for x in [req.u0, *leaves(req.p)]
    )


# ---------------------------------------------------------------------------------
# A solve, set up once for every gradient method.
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """A request turned into tensors, in the solver's time.

    Backward integration (``t1 < t0``) runs in negated time: `f` is then
    ``-f(u, p, -s)``, `du0` its value at ``t0`` and `times` negated, as
    torchdiffeq's ``odeint`` does.
    """

    y0: torch.Tensor
    p: Any
    f: Callable[..., Any]  # the user's f in solver time
    du0: torch.Tensor  # f(y0, p, t0) in solver time
    times: torch.Tensor  # float64: [t0, *saveat, t1] without repeats, solver time
    lead: int  # the row of times where the save times start
    dtype: torch.dtype
    device: torch.device
    backward: bool
    jac: Callable[..., Any] | None = None  # prob.jac in solver time

    def rhs(self, first: bool = True, p: Any = None) -> _Rhs:
        """The vector field for torchdiffeq (``first``: reuse `du0` once)."""
        return _Rhs(
            self.f,
            self.p if p is None else p,
            self.dtype,
            self.du0 if first else None,
            self.jac,
        )


def prepare(req: SolveRequest, *, graph: bool) -> Setup:
    """Convert the inputs and check ``f(u0, p, t0)``; `graph`: evaluate it with
    autograd recording (for a solve differentiated through its steps)."""
    dtype = state_dtype(req)
    device = solve_device(req)
    y0 = to_state(req.u0, dtype, device)
    p = req.convert_p(functools.partial(to_param, dtype=dtype, device=device))
    t0 = torch.tensor(req.t0, dtype=dtype, device=device)
    with torch.set_grad_enabled(graph and torch.is_grad_enabled()):
        du0 = req.f(y0, p, t0)
    check_rhs_output(du0, y0, req.t0)
    backward = req.t1 < req.t0
    times, lead = _integration_times(req)
    f, jac = req.f, req.jac
    if backward:
        f, du0, times = _reversed(req.f), -du0, -times
        jac = None if jac is None else _reversed(jac)
    return Setup(
        y0=y0,
        p=p,
        f=f,
        du0=du0,
        times=torch.as_tensor(times, dtype=torch.float64, device=device),
        lead=lead,
        dtype=dtype,
        device=device,
        backward=backward,
        jac=jac,
    )


def finish(req: SolveRequest, setup: Setup, run: Run, u: torch.Tensor) -> Solution:
    """The `Solution` of a run; `u` the state at every integration time (``run.u``
    or a differentiable copy of it)."""
    m = len(req.saveat)
    reached = run.t_reached
    if reached is not None and setup.backward:
        reached = -reached
    return conclude(
        req,
        t=_tensor(req.saveat, setup.dtype, setup.device),
        u=u[setup.lead : setup.lead + m],
        stats=run_stats(run),
        status=run.status,
        t_reached=req.t1 if reached is None else reached,
    )


def run_stats(run: Run) -> dict[str, Any]:
    """``nfev``, ``naccept``, ``nreject``; and ``njev``, ``nlu`` for implicit algs."""
    stats: dict[str, Any] = {
        "nfev": run.nfev,
        "naccept": run.naccept,
        "nreject": run.nreject,
    }
    if run.njev is not None:
        stats["njev"] = run.njev
        stats["nlu"] = run.nlu
    return stats


def run_steps(
    req: SolveRequest, setup: Setup, recorder: _Recorder | None = None
) -> Run:
    """Integrate `setup` with the alg of `req`."""
    solver = ALG_SOLVERS[req.alg.name]
    return solver.run(setup.rhs(), setup.y0, setup.times, req, recorder)


def solve_plain(req: SolveRequest) -> Solution:
    """The solve itself; differentiable through its steps when autograd records
    (ReverseThroughSolver)."""
    setup = prepare(req, graph=True)
    run = run_steps(req, setup)
    return finish(req, setup, run, run.u)
