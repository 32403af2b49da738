"""Explicit Runge-Kutta methods on torch: tableaux, one step, the two drivers.

The tableaux are the shared ones (`diffeqkit._tableaux`). One step is a pure
function (`rk_step`, `fixed_step`), shared by the drivers and the replays of
`_replay`. `AdaptiveRK` integrates under error control (RMS norm, the standard
controller and first-step rule), `FixedRK` on the grid `diffeqkit._saveat.step_grid`.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np
import torch

from ..._algs import ALGS
from ..._errors import invalid
from ..._saveat import step_grid
from ..._tableaux import get_tableau
from .._protocol import SolveRequest

# No limit on the number of steps (the default where a caller gives none).
NO_LIMIT = 2**31 - 1
# The controller's constants: safety factor, largest and smallest step ratio.
_SAFETY, _IFACTOR, _DFACTOR = 0.9, 10.0, 0.2


class StoppedError(RuntimeError):
    """The integration cannot go on; `status` is a diffeqkit status name and `t`
    the solver time reached."""

    def __init__(self, status: str, alg: str, t: float) -> None:
        super().__init__(f"{alg}: integration stopped at t={t:.6g}: {status}")
        self.status = status
        self.t = t


class Recorder(Protocol):
    """What a run reports each accepted step to: its start time, start state and
    size. It may also have ``accepted(state)``, called by adaptive drivers after
    each accepted step with the new `State` (that step's dense output)."""

    def step(self, t0: torch.Tensor, y0: torch.Tensor, dt: torch.Tensor) -> None: ...


def tensor(x: Any, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """A NumPy array(-like) as a new tensor: copied, as it may be read-only or have
    negative strides, which torch cannot wrap."""
    return torch.as_tensor(np.array(x), dtype=dtype, device=device)


# ---------------------------------------------------------------------------------
# The vector field.
# ---------------------------------------------------------------------------------


class Rhs:
    """``func(t, y)`` over the user's ``f(u, p, t)``, counting calls.

    ``first``, when given, is ``f`` already evaluated at ``(t0, u0)``: the drivers
    evaluate there first, so the first call returns it (and counts it).
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

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> Any:
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


# ---------------------------------------------------------------------------------
# Tableaux as torch tensors, cached per (alg, dtype, device).
# ---------------------------------------------------------------------------------


class Tableau(NamedTuple):
    """An adaptive explicit tableau with the FSAL row appended: stage ``i + 1`` is
    evaluated at ``t0 + alpha[i] h`` with weights ``beta[i]`` on stages ``0..i``;
    the last row is ``b`` at ``alpha = 1``, so its input is ``y1`` and its value
    the next step's first stage. ``error`` weights all ``s + 1`` stages."""

    alpha: torch.Tensor
    beta: list[torch.Tensor]
    error: torch.Tensor


def tableau_name(alg: str) -> str:
    name = ALGS[alg].tableau
    if name is None:
        raise ValueError(f"{alg} is not built from a shared tableau")
    return name


@functools.cache
def adaptive_tableau(
    alg: str, dtype: torch.dtype, device: torch.device
) -> tuple[Tableau, torch.Tensor]:
    """The `Tableau` of an adaptive alg and its dense-output matrix ``p``
    (``s + 1`` rows: the stages and ``f(t1, y1)``, as SciPy's ``K``)."""
    tab = get_tableau(tableau_name(alg))
    if tab.e is None:
        raise ValueError(f"{alg}: an adaptive method needs error coefficients e")

    def as_tensor(x: Any) -> torch.Tensor:
        return tensor(x, dtype, device)

    rows = [tab.a[i, :i] for i in range(1, tab.n_stages)]
    return (
        Tableau(
            alpha=as_tensor([*tab.c[1:], 1.0]),
            beta=[as_tensor(row) for row in [*rows, tab.b]],
            error=as_tensor(tab.e),
        ),
        as_tensor(tab.p),
    )


# Nonzero weights of a linear combination of stages, as (stage index, weight as a
# float, weight as used in arithmetic): a float, or a constant lifted by `Lift`.
Combination = tuple[tuple[int, float, Any], ...]
# A fixed-step tableau: the stages (c_i as a float, c_i as used, a[i, :i]) and b.
FixedTableau = tuple[tuple[tuple[float, Any, Combination], ...], Combination]
# Turns a constant tensor into one of the same value that takes part in the
# computation the way its inputs do (see `_forward`); the identity elsewhere.
Lift = Callable[[torch.Tensor], torch.Tensor]


def no_lift(x: torch.Tensor) -> torch.Tensor:
    return x


@functools.cache
def fixed_tableau(alg: str) -> FixedTableau:
    """The stages ``(c_i, a[i, :i])`` and weights ``b`` of `alg`'s tableau, with
    the zero coefficients dropped, as Python floats (cheapest to apply per step).
    For an adaptive alg these are its own ``b`` weights, not the error estimate."""
    tab = get_tableau(tableau_name(alg))
    stages = tuple(
        (float(tab.c[i]), float(tab.c[i]), _nonzero(tab.a[i, :i]))
        for i in range(1, tab.n_stages)
    )
    return stages, _nonzero(tab.b)


def lifted_fixed_tableau(alg: str, device: torch.device, lift: Lift) -> FixedTableau:
    """`fixed_tableau` with its coefficients as lifted float64 0-d tensors."""
    stages, weights = fixed_tableau(alg)

    def value(x: float) -> torch.Tensor:
        return lift(torch.tensor(x, dtype=torch.float64, device=device))

    def combination(ws: Combination) -> Combination:
        return tuple((j, w, value(w)) for j, w, _ in ws)

    return (
        tuple((c, value(c), combination(ws)) for c, _, ws in stages),
        combination(weights),
    )


def _nonzero(weights: np.ndarray) -> Combination:
    return tuple((j, float(w), float(w)) for j, w in enumerate(weights) if w != 0.0)


def _combine(weights: Combination, ks: list[torch.Tensor]) -> torch.Tensor:
    """``sum_j w_j * ks[j]`` over the nonzero weights."""
    terms = [ks[j] if w == 1.0 else value * ks[j] for j, w, value in weights]
    return functools.reduce(torch.add, terms)


# ---------------------------------------------------------------------------------
# One step of each kind, and dense output, as pure functions.
# ---------------------------------------------------------------------------------


def rk_step(
    func: Any,
    y0: torch.Tensor,
    f0: torch.Tensor,
    t0: torch.Tensor,
    dt: torch.Tensor,
    t1: torch.Tensor,
    tableau: Tableau,
    estimate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One step of an FSAL `Tableau`: ``(y1, f(t1, y1), error estimate or None,
    stages K stacked on the last axis)``. Time runs in the state's dtype."""
    t_dtype = y0.abs().dtype
    t0, dt, t1 = t0.to(t_dtype), dt.to(t_dtype), t1.to(t_dtype)
    ks = [f0]
    yi = y0
    for alpha_i, beta_i in zip(tableau.alpha, tableau.beta, strict=True):
        ti = t1 if alpha_i == 1.0 else t0 + alpha_i * dt
        stacked = torch.stack(ks, dim=-1)
        yi = y0 + torch.sum(stacked * (beta_i * dt), dim=-1).view_as(f0)
        ks.append(func(ti, yi))
    k = torch.stack(ks, dim=-1)
    error = torch.sum(k * (dt * tableau.error), dim=-1) if estimate else None
    # FSAL: the last stage is evaluated at (t1, y1), so y1 is its input.
    return yi, ks[-1], error, k


def dense_coefficients(
    y0: torch.Tensor, k: torch.Tensor, p: torch.Tensor, dt: torch.Tensor
) -> list[torch.Tensor]:
    """Coefficients of ``y(t0 + x h) = y0 + sum_j c_j x^j`` from the tableau's
    dense output ``p``, in the form `interpolate` reads."""
    # k: (*shape, s + 1), the stages K; p: (s + 1, q).
    coeffs = torch.matmul(k, p) * dt.type_as(y0)
    return [y0, *coeffs.unbind(-1)]


def interpolate(
    coeffs: Sequence[torch.Tensor], t0: torch.Tensor, t1: torch.Tensor, t: Any
) -> torch.Tensor:
    """``sum_j coeffs[j] x^j`` at ``x = (t - t0) / (t1 - t0)``."""
    x = ((t - t0) / (t1 - t0)).to(coeffs[0].dtype)
    total = coeffs[0] + x * coeffs[1]
    power = x
    for c in coeffs[2:]:
        power = power * x
        total = total + power * c
    return total


def fixed_step(
    tableau: FixedTableau,
    func: Any,
    t0: torch.Tensor,
    dt: torch.Tensor,
    t1: torch.Tensor,
    y0: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of a fixed-step tableau: ``(y1 - y0, f(t0, y0))``."""
    stages, weights = tableau
    h = dt.to(y0.dtype)
    ks = [func(t0, y0)]
    for c, c_value, combination in stages:
        # A stage at c = 1 evaluates at the grid point itself, not t0 + dt.
        ti = t1 if c == 1.0 else t0 + c_value * dt
        ks.append(func(ti, y0 + h * _combine(combination, ks)))
    return h * _combine(weights, ks), ks[0]


# A step: (func, y0, f0 or None, t0, dt, t1) -> (y1, f1 or None, read), where
# read(t) is the saved value at a time t in (t0, t1] read off that step.
Stepper = Callable[..., tuple[torch.Tensor, Any, Callable[[torch.Tensor], Any]]]


def fsal_stepper(advance: Callable[..., tuple[Any, Any, list[Any]]]) -> Stepper:
    """The `Stepper` of an adaptive method whose step is ``advance(func, y0, f0,
    t0, dt, t1) -> (y1, f(t1, y1), dense coefficients)``: it evaluates ``f0``
    where the replay has none, and reads saved values off the dense output."""

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
        return y1, f1, lambda t: interpolate(coeffs, t0, t1, t)

    return step


# ---------------------------------------------------------------------------------
# Error control.
# ---------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """The root mean square of `x`; 0 for an empty tensor."""
    if x.numel() == 0:
        return x.new_zeros(())
    return x.abs().pow(2).mean().sqrt()


def error_ratio(
    error: torch.Tensor,
    rtol: torch.Tensor,
    atol: torch.Tensor,
    y0: torch.Tensor,
    y1: torch.Tensor,
    norm: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The norm of the error relative to ``atol + rtol * max(|y0|, |y1|)``: the
    step is accepted when it is at most 1."""
    return norm(error / (atol + rtol * torch.max(y0.abs(), y1.abs()))).abs()


@torch.no_grad()
def next_step_size(
    dt: torch.Tensor,
    ratio: torch.Tensor,
    order: int,
    safety: torch.Tensor,
    ifactor: torch.Tensor,
    dfactor: torch.Tensor,
) -> torch.Tensor:
    """``dt`` scaled by ``safety * ratio**(-1/order)``, between ``dfactor`` (1 when
    the step was accepted) and ``ifactor``; ``ratio = 0`` gives ``ifactor`` and
    ``ratio = inf`` gives ``dfactor``."""
    ratio = ratio.type_as(dt)
    lowest = torch.where(ratio < 1, torch.ones_like(dfactor), dfactor)
    exponent = torch.tensor(order, dtype=dt.dtype, device=dt.device).reciprocal()
    factor = torch.min(ifactor, torch.max(safety / ratio**exponent, lowest))
    return dt * factor


def initial_step(
    func: Any,
    t0: torch.Tensor,
    y0: torch.Tensor,
    f0: torch.Tensor,
    order: int,
    rtol: torch.Tensor,
    atol: torch.Tensor,
    norm: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The first step size of Hairer, Norsett & Wanner (Solving ODEs I, II.4):
    from the sizes of ``y0``, ``f0`` and a difference quotient of ``f`` after one
    Euler step, for a method of local error order ``order + 1``. Branch-free
    (no host sync; compiled blocks call it too)."""
    scale = atol + torch.abs(y0) * rtol
    d0 = norm(y0 / scale).abs()
    d1 = norm(f0 / scale).abs()
    small = torch.tensor(1e-6, dtype=y0.dtype, device=y0.device)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), small, 0.01 * d0 / d1).abs()
    f1 = func(t0 + h0, y0 + h0 * f0)
    d2 = torch.abs(norm((f1 - f0) / scale) / h0)
    h1 = torch.where(
        (d1 <= 1e-15) & (d2 <= 1e-15),
        torch.max(small, h0 * 1e-3),
        (0.01 / torch.max(d1, d2)) ** (1.0 / float(order + 1)),
    )
    return torch.min(100 * h0, h1.abs()).to(t0.dtype)


# ---------------------------------------------------------------------------------
# The drivers.
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
    compile_s: float | None = None  # seconds compiling (the compiled engine)


class State(NamedTuple):
    """An adaptive run after its last accepted step ``[t0, t1]``: the state and
    ``f`` at ``t1``, the next step size and the step's dense output."""

    y: torch.Tensor
    f: torch.Tensor
    t0: torch.Tensor
    t1: torch.Tensor
    dt: torch.Tensor
    coeffs: list[torch.Tensor]


def _nan_rows(rows: list[torch.Tensor], y0: torch.Tensor, total: int) -> torch.Tensor:
    """`rows` stacked, padded with NaN rows up to `total`."""
    nan = torch.full_like(y0, math.nan)
    return torch.stack([*rows, *([nan] * (total - len(rows)))])


class AdaptiveRK:
    """An adaptive explicit Runge-Kutta method of the shared tableaux.

    ``begin(t0)`` then ``advance(t)`` for increasing ``t``: steps until ``t`` is
    passed, then reads ``u(t)`` off the last step's dense output. Steps landing on
    ``step_t`` end exactly there. A trial step whose state or error is not finite
    is rejected as if its error were infinite (the step shrinks by the smallest
    factor); more than ``max_steps`` steps, or a step smaller than 10 ulps of
    ``t`` (SciPy's rule), raise `StoppedError` or what ``stop(status, t, nsteps)``
    returns. No gradient flows through the step sizes.
    """

    alg: ClassVar[str]
    # The controller's exponent is 1/order (error order + 1).
    order: ClassVar[int]

    def __init__(
        self,
        func: Any,
        y0: torch.Tensor,
        rtol: Any,
        atol: Any,
        *,
        first_step: Any = None,
        max_steps: int = NO_LIMIT,
        step_t: torch.Tensor | None = None,
        stop: Callable[[str, float, int], Exception] | None = None,
        norm: Callable[[torch.Tensor], torch.Tensor] = rms_norm,
        n_implicit: int | None = None,
    ) -> None:
        del n_implicit  # implicit methods only
        device = y0.device
        self.func = func
        self.y0 = y0
        self.norm = norm

        def time(x: Any) -> torch.Tensor:
            return torch.as_tensor(x, dtype=torch.float64, device=device)

        self.rtol, self.atol = time(rtol), time(atol)
        self.safety, self.ifactor, self.dfactor = (
            time(_SAFETY),
            time(_IFACTOR),
            time(_DFACTOR),
        )
        self.first_step = None if first_step is None else time(first_step)
        self.step_t = step_t
        self.max_steps = max_steps
        self.stop = stop
        self.nsteps = 0
        self.naccept = 0
        self.on_step: Callable[..., Any] | None = None
        self.on_accept: Callable[[State], Any] | None = None
        self.state: State
        self._landings: list[torch.Tensor] = []
        self._next_landing = 0
        self._nonfinite = False
        self._prepare(y0.dtype, device)

    def _prepare(self, dtype: torch.dtype, device: torch.device) -> None:
        self.tableau, self.p = adaptive_tableau(self.alg, dtype, device)

    def begin(self, t0: torch.Tensor) -> None:
        """Start at ``(t0, y0)``: evaluate ``f`` there and pick the first step."""
        f0 = self.func(t0, self.y0)
        if self.first_step is None:
            dt = initial_step(
                self.func,
                t0,
                self.y0,
                f0,
                self.order - 1,
                self.rtol,
                self.atol,
                self.norm,
            )
        else:
            dt = self.first_step
        # The automatic first step is a function of y0 and f0: hold it fixed, as
        # every later step size is.
        self.state = State(self.y0, f0, t0, t0, dt.detach(), [self.y0])
        if self.step_t is not None:
            landings = torch.sort(self.step_t[self.step_t >= t0]).values
            self._landings = list(landings.unbind(0))
            where = bisect.bisect(landings.tolist(), float(t0))
            self._next_landing = min(where, len(self._landings) - 1)

    def advance(self, t: torch.Tensor) -> torch.Tensor:
        """``u(t)`` for a time ``t`` past the last one asked for."""
        while t > self.state.t1:
            self.state = self._step(self.state)
        state = self.state
        return interpolate(state.coeffs, state.t0, state.t1, t)

    def _step(self, state: State) -> State:
        t, dt = state.t1, state.dt
        if self.nsteps >= self.max_steps:
            raise self._stopped("max_steps_reached", t)
        # False for a NaN step too.
        if not bool(dt >= 10 * (torch.nextafter(t, t.new_tensor(math.inf)) - t)):
            status = "nonfinite" if self._nonfinite else "step_size_too_small"
            raise self._stopped(status, t)
        self.nsteps += 1
        return self._attempt(state)

    def _attempt(self, state: State) -> State:
        """One trial step from the end of `state`, accepted or not."""
        y0, f0, t0, dt = state.y, state.f, state.t1, state.dt
        t1 = t0 + dt
        landing = False
        if self._landings:
            target = self._landings[self._next_landing]
            landing = bool(t0 < target) and bool(target < t1)
            if landing:
                t1 = target
                dt = t1 - t0
        y1, f1, error, dense = self._trial(y0, f0, t0, dt, t1)
        ratio = error_ratio(error, self.rtol, self.atol, y0, y1, self.norm)
        finite = torch.isfinite(ratio) & torch.isfinite(y1).all()
        ratio = torch.where(finite, ratio, math.inf)
        dt_next = next_step_size(
            dt, ratio, self.order, self.safety, self.ifactor, self.dfactor
        )
        if not bool(ratio <= 1):
            self._nonfinite = not bool(finite)
            return state._replace(dt=dt_next)
        self._nonfinite = False
        self.naccept += 1
        if self.on_step is not None:
            self.on_step(t0, y0, dt)
        if landing and self._next_landing != len(self._landings) - 1:
            self._next_landing += 1
        new = State(y1, f1, t0, t1, dt_next, dense())
        if self.on_accept is not None:
            self.on_accept(new)
        return new

    def _trial(
        self,
        y0: torch.Tensor,
        f0: torch.Tensor,
        t0: torch.Tensor,
        dt: torch.Tensor,
        t1: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Callable[[], list[Any]]]:
        """``(y1, f1, error estimate, dense output on demand)`` of one step."""
        y1, f1, error, k = rk_step(self.func, y0, f0, t0, dt, t1, self.tableau)
        if error is None:  # pragma: no cover - asked for
            raise RuntimeError("no error estimate")
        return y1, f1, error, lambda: dense_coefficients(y0, k, self.p, dt)

    def _stopped(self, status: str, t: torch.Tensor) -> Exception:
        if self.stop is not None:
            return self.stop(status, float(t), self.nsteps)
        return StoppedError(status, self.alg, float(t))

    @classmethod
    def run(
        cls,
        rhs: Rhs,
        y0: torch.Tensor,
        times: torch.Tensor,
        req: SolveRequest,
        recorder: Recorder | None = None,
    ) -> Run:
        """Integrate through `times` (``times[0]`` is t0, ``times[-1]`` t1),
        stopping cleanly; `recorder` sees every accepted step."""
        solver = cls(
            rhs,
            y0,
            req.rtol,
            req.atol,
            first_step=req.dt0,
            max_steps=req.max_steps,
            # The last step lands on t1 instead of overshooting it and
            # interpolating back: f is never evaluated beyond t1 (where it may be
            # undefined). Where the dense output is weaker than the steps
            # (dopri8), every save time is a step end.
            step_t=times[1:] if req.land_on_saves else times[-1:],
        )
        if recorder is not None:
            solver.on_step = recorder.step
            solver.on_accept = getattr(recorder, "accepted", None)
        solver.begin(times[0])
        rows = [y0]
        status, reached = "success", None
        try:
            for t in times[1:]:
                rows.append(solver.advance(t))
        except StoppedError as stop:
            status, reached = stop.status, stop.t
        return Run(
            _nan_rows(rows, y0, times.shape[0]),
            status,
            reached,
            solver.naccept,
            solver.nsteps - solver.naccept,
            rhs.nfev,
            len(rows),
            float(solver.state.t1),
            getattr(solver, "njev", None),
            getattr(solver, "nlu", None),
        )

    @classmethod
    def stepper(
        cls, dtype: torch.dtype, device: torch.device, lift: Lift = no_lift
    ) -> Stepper:
        """One step as a pure function (see `Stepper`), for replays; its
        constants go through `lift`."""
        tableau, p = adaptive_tableau(cls.alg, dtype, device)
        tableau = Tableau(
            lift(tableau.alpha), [lift(b) for b in tableau.beta], tableau.error
        )
        p = lift(p)

        def advance(
            func: Any, y0: torch.Tensor, f0: torch.Tensor, t0: Any, dt: Any, t1: Any
        ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
            y1, f1, _, k = rk_step(func, y0, f0, t0, dt, t1, tableau, estimate=False)
            return y1, f1, dense_coefficients(y0, k, p, dt)

        return fsal_stepper(advance)


class FixedRK:
    """A fixed-step explicit Runge-Kutta method of the shared tableaux, stepping
    on `diffeqkit._saveat.step_grid` (``t0 + k*dt0`` merged with the save times),
    so every saved value is a step value."""

    alg: ClassVar[str]

    @classmethod
    def grid(cls, times: torch.Tensor, dt0: float) -> tuple[torch.Tensor, np.ndarray]:
        """The step grid through `times`, as a tensor and in NumPy."""
        ts = times.detach().cpu().numpy().astype(np.float64)
        grid = step_grid(float(ts[0]), float(ts[-1]), dt0, ts)
        return torch.as_tensor(grid, dtype=times.dtype, device=times.device), grid

    @classmethod
    def march(
        cls,
        func: Any,
        y: torch.Tensor,
        grid: torch.Tensor,
        on_step: Callable[..., Any] | None = None,
    ) -> list[torch.Tensor]:
        """The states at ``grid[1:]``, stepping from `y` at ``grid[0]``."""
        tableau = fixed_tableau(cls.alg)
        states = []
        for t0, t1 in itertools.pairwise(grid):
            dt = t1 - t0
            if on_step is not None:
                on_step(t0, y, dt)
            dy, _ = fixed_step(tableau, func, t0, dt, t1, y)
            y = y + dy
            states.append(y)
        return states

    @classmethod
    def run(
        cls,
        rhs: Rhs,
        y0: torch.Tensor,
        times: torch.Tensor,
        req: SolveRequest,
        recorder: Recorder | None = None,
    ) -> Run:
        """Integrate through `times`; a step to a non-finite state stops the solve
        at the last finite step (rows after it are NaN); `recorder` sees every
        step."""
        if req.dt0 is None:
            raise ValueError("a fixed-step solve needs dt0")  # the core checks it
        grid, grid_np = cls.grid(times, req.dt0)
        states = cls.march(rhs, y0, grid, None if recorder is None else recorder.step)
        nsteps = len(states)
        where = np.searchsorted(grid_np, times.detach().cpu().numpy())
        finite = (
            torch.stack([torch.isfinite(y).all() for y in states])
            if states
            else torch.ones(0, dtype=torch.bool)
        )
        if bool(finite.all()):
            u = torch.stack([y0, *(states[k - 1] for k in where[1:])])
            return Run(u, "success", None, nsteps, 0, rhs.nfev, len(where), grid_np[-1])
        good = int(torch.nonzero(~finite)[0, 0])  # finite steps before the first bad
        rows = [y0, *(states[k - 1] for k in where[1:] if k <= good)]
        t_good = float(grid_np[good])
        return Run(
            _nan_rows(rows, y0, len(where)),
            "nonfinite",
            t_good,
            good,
            0,
            rhs.nfev,
            len(rows),
            t_good,
        )

    @classmethod
    def stepper(
        cls, dtype: torch.dtype, device: torch.device, lift: Lift = no_lift
    ) -> Stepper:
        """One step as a pure function (see `Stepper`), for replays; its
        constants go through `lift`. Saved values are step values: every save
        time is a grid point."""
        del dtype
        tableau = (
            fixed_tableau(cls.alg)
            if lift is no_lift
            else lifted_fixed_tableau(cls.alg, device, lift)
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
            dy, _ = fixed_step(tableau, func, t0, dt, t1, y0)
            y1 = y0 + dy
            return y1, None, lambda t: y1

        return step


Solver = type[AdaptiveRK] | type[FixedRK]


@functools.cache
def adaptive_solver(alg: str) -> type[AdaptiveRK]:
    """The `AdaptiveRK` of an explicit adaptive alg."""
    tab = get_tableau(tableau_name(alg))
    # The standard controller exponent is 1/(error_order + 1).
    order = tab.order if tab.error_order is None else tab.error_order + 1
    name = f"{alg.capitalize()}Adaptive"
    return type(
        name, (AdaptiveRK,), {"alg": alg, "order": order, "__module__": __name__}
    )


@functools.cache
def fixed_solver(alg: str) -> type[FixedRK]:
    """The `FixedRK` stepping with `alg`'s own ``b`` weights (a fixed-step alg, or
    an adaptive one run with ``adaptive=False``)."""
    name = f"{alg.capitalize()}Fixed"
    return type(name, (FixedRK,), {"alg": alg, "__module__": __name__})
